"""Training data: one split as (image, caption) pairs, the per-epoch order, validation scoring."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class CaptionData:
    """One split as (image, caption) pairs: image paths, stems, captions, pair -> image index."""

    image_paths: list[Path]
    stems: list[str]
    references: dict[str, list[str]]
    pair_image: list[int]
    pair_caption: list[str]


def load_split(data_root: str | os.PathLike, split: str, max_images: int = 0) -> CaptionData:
    """Read p2_data/<split>.json and its images dir as caption pairs (first `max_images` images if > 0)."""
    from captionlab.data import load_captions

    root = Path(data_root) / "p2_data"
    cs = load_captions(root / f"{split}.json")
    stems = cs.stems[:max_images] if max_images > 0 else cs.stems
    paths = [cs.image_path(root / "images" / split, s) for s in stems]
    pair_image, pair_caption = [], []
    for i, s in enumerate(stems):
        for c in cs.captions[s]:
            pair_image.append(i)
            pair_caption.append(c)
    return CaptionData(paths, stems, {s: cs.captions[s] for s in stems}, pair_image, pair_caption)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the n training pairs for `epoch` (a pure function of seed and epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def most_common_caption(train: CaptionData) -> str:
    """The most frequent training caption (the trivial baseline's prediction for every image)."""
    return Counter(train.pair_caption).most_common(1)[0][0]


def cider(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    """CIDEr-D via pycocoevalcap on lower-cased, punctuation-stripped tokens (no Java needed)."""
    import re

    from pycocoevalcap.cider.cider import Cider

    def norm(s: str) -> str:
        return " ".join(re.findall(r"[a-z0-9]+", s.lower()))

    gts = {k: [norm(c) for c in references[k]] for k in predictions}
    res = {k: [norm(v) or "empty"] for k, v in predictions.items()}
    return float(Cider().compute_score(gts, res)[0])


def evaluate_captions(predictions: dict[str, str], data: CaptionData, data_root: Path, split: str,
                      clip: str | None = None) -> dict[str, float]:
    """CIDEr (course tokenization via captionlab.metrics when available) and CLIPScore when `clip` is given.

    Empty captions (an untrained model's) are scored as the word "empty" (the evaluator refuses empty strings).
    """
    predictions = {k: v if v.strip() else "empty" for k, v in predictions.items()}
    try:
        from captionlab.data import CaptionSet
        from captionlab.metrics.evaluate import evaluate
    except ImportError:
        return {"CIDEr": cider(predictions, data.references)}
    ann = CaptionSet(captions=data.references, file_names={s: p.name for s, p in zip(data.stems, data.image_paths)},
                     image_ids={s: i for i, s in enumerate(data.stems)})
    metrics = ("CIDEr", "CLIPScore") if clip else ("CIDEr",)
    summary = evaluate(predictions, ann, data_root / "p2_data" / "images" / split, clip=clip, metrics=metrics).summary
    return {k: float(summary[k]) for k in metrics if isinstance(summary.get(k), (int, float))}
