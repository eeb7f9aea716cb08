"""`evaluate(predictions, annotations, images_dir, clip)`: the course's CIDEr + CLIPScore (and friends), per-image
tables, strict input checks, atomic outputs."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from captionlab.errors import ConfigError, DataError, ImageLoadError
from captionlab.utils import atomic_write_json, atomic_write_text, run_metadata

CLIP_METRICS: tuple[str, ...] = ("CLIPScore", "RefCLIPScore")
ALL_METRICS: tuple[str, ...] = ("CIDEr", "CLIPScore", "RefCLIPScore", "BLEU", "METEOR", "ROUGE_L", "SPICE")
# METEOR is opt-in: its Java program loads a paraphrase table for ~10-30 s on CPU.
DEFAULT_METRICS: tuple[str, ...] = ("CIDEr", "CLIPScore", "RefCLIPScore", "BLEU", "ROUGE_L", "SPICE")
REF_SEP = " | "


@dataclass
class EvalResult:
    """Corpus `summary` (dict, JSON-ready) and the `per_image` table (one row per image, annotation order)."""

    summary: dict[str, Any]
    per_image: pd.DataFrame
    paths: dict[str, Path] = field(default_factory=dict)

    def line(self) -> str:
        """The course evaluator's line: `CIDEr: x | CLIPScore: y` (n/a for a metric that was not computed)."""
        return " | ".join(f"{m}: {self.summary.get(m, 'n/a')}" for m in ("CIDEr", "CLIPScore"))

    def _sorted(self, k: int, by: str, ascending: bool) -> pd.DataFrame:
        if by not in self.per_image.columns:
            raise KeyError(f"no per-image column {by!r}; columns: {list(self.per_image.columns)}")
        return self.per_image.sort_values([by, "stem"], ascending=[ascending, True], kind="stable").head(k)

    def top(self, k: int = 5, by: str = "cider") -> pd.DataFrame:
        """The k best images by a per-image column (ties broken by stem)."""
        return self._sorted(k, by, ascending=False)

    def bottom(self, k: int = 5, by: str = "cider") -> pd.DataFrame:
        """The k worst images by a per-image column (ties broken by stem)."""
        return self._sorted(k, by, ascending=True)

    def save(self, out_dir: str | os.PathLike, prefix: str = "eval") -> dict[str, Path]:
        """Write `<prefix>.summary.json`, `<prefix>.per_image.csv` and `<prefix>.per_image.json` atomically."""
        out = Path(out_dir)
        paths = {"summary": out / f"{prefix}.summary.json", "per_image_csv": out / f"{prefix}.per_image.csv",
                 "per_image_json": out / f"{prefix}.per_image.json"}
        records = json.loads(self.per_image.to_json(orient="records", force_ascii=False))
        atomic_write_json(paths["per_image_json"], records)
        flat = self.per_image.assign(references=self.per_image["references"].map(REF_SEP.join))
        atomic_write_text(paths["per_image_csv"], flat.to_csv(index=False))
        atomic_write_json(paths["summary"], {**self.summary, "outputs": {k: str(v) for k, v in paths.items()}})
        self.paths = paths
        return paths


def load_result(summary_path: str | os.PathLike) -> EvalResult:
    """Read back an EvalResult written by `EvalResult.save` (from its summary JSON)."""
    from captionlab.data.captions import read_json

    summary_path = Path(summary_path)
    summary = read_json(summary_path, "evaluation summary")
    per_image_path = Path(summary.get("outputs", {}).get("per_image_json", ""))
    if not per_image_path.is_file():
        per_image_path = summary_path.with_name(summary_path.name.replace(".summary.json", ".per_image.json"))
    records = read_json(per_image_path, f"per-image results (next to {summary_path.name})")
    return EvalResult(summary=summary, per_image=pd.DataFrame.from_records(records))


# ----------------------------------------------------------------------------------------------------------
# Input checks


def _few(items: Sequence[Any], n: int = 5) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(x) for x in list(items)[:n]) + more


def _check_predictions(preds: Any, stems: Sequence[str], source: str) -> dict[str, str]:
    from captionlab.data.captions import check_prediction_keys

    if not isinstance(preds, Mapping):
        raise DataError(f"{source}: predictions must be a dict {{file_stem: caption}}, got {type(preds).__name__}")
    bad_keys = [k for k in preds if not isinstance(k, str)]
    if bad_keys:
        raise DataError(f"{source}: {len(bad_keys)} prediction key(s) are not strings: {_few(bad_keys)}")
    not_str = sorted(k for k, v in preds.items() if not isinstance(v, str))
    if not_str:
        raise DataError(f"{source}: {len(not_str)} caption(s) are not strings: {_few(not_str)} "
                        f"(e.g. {type(preds[not_str[0]]).__name__})")
    check_prediction_keys(preds, stems, source)
    empty = sorted(k for k, v in preds.items() if not v.strip())
    if empty:
        raise DataError(f"{source}: {len(empty)} caption(s) are empty: {_few(empty)}")
    return {s: preds[s] for s in stems}


def _image_paths(ann: Any, images_dir: str | os.PathLike) -> list[Path]:
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image directory not found")
    paths = [ann.image_path(images_dir, s) for s in ann.stems]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ImageLoadError(f"{images_dir}: {len(missing)} image file(s) listed in the annotations are missing: "
                             f"{_few(missing)}")
    return paths


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(predictions: Mapping[str, str] | str | os.PathLike, annotations: Any,
             images_dir: str | os.PathLike | None = None, clip: Any = None,
             metrics: Sequence[str] = DEFAULT_METRICS, batch_size: int = 64, prefix: str = "",
             params: dict | None = None, world: str | None = None, seed: int | None = None) -> EvalResult:
    """Score {stem: caption} against an annotation file (or CaptionSet) as the course does; see EvalResult.

    `clip` is a CLIP spec or ClipBackend (None skips the CLIP metrics, reported as unavailable); images come from
    `images_dir` via the annotations' file names. Raises DataError / ImageLoadError on bad inputs, before scoring."""
    from captionlab.data.captions import CaptionSet, load_captions, load_predictions
    from captionlab.metrics.cider import NGRAM_METRICS, ngram_scores

    metrics = list(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; known: {list(ALL_METRICS)}")
    ann = annotations if isinstance(annotations, CaptionSet) else load_captions(annotations)
    ann_src = str(Path(ann.path).resolve()) if ann.path else "annotations"
    if isinstance(predictions, (str, os.PathLike)):
        pred_src = str(Path(predictions).resolve())
        preds = _check_predictions(load_predictions(predictions), ann.stems, pred_src)
    else:
        pred_src = "predictions"
        preds = _check_predictions(predictions, ann.stems, pred_src)
    stems = ann.stems
    if not stems:
        raise DataError(f"{ann_src}: no images to evaluate")
    refs = {s: list(ann.captions[s]) for s in stems}

    unavailable: dict[str, str] = {}
    clip_wanted = [m for m in metrics if m in CLIP_METRICS]
    image_paths = None
    if clip_wanted:
        if clip is None:
            unavailable.update({m: "no CLIP model given (clip=None)" for m in clip_wanted})
            clip_wanted = []
        elif images_dir is None:
            raise ConfigError(f"{', '.join(clip_wanted)} need the images: pass images_dir")
        else:
            image_paths = _image_paths(ann, images_dir)

    timings: dict[str, float] = {}
    summary: dict[str, Any] = {}
    columns: dict[str, Any] = {"stem": stems, "caption": [preds[s] for s in stems]}

    ngram_wanted = [m for m in metrics if m in NGRAM_METRICS]

    def ngrams() -> tuple[dict[str, Any], dict[str, Any], dict[str, str], float]:
        t0 = time.perf_counter()
        return (*ngram_scores(refs, preds, ngram_wanted), time.perf_counter() - t0)

    # the n-gram metrics (the PTB tokenizer is a Java process) run alongside CLIPScore (torch)
    side = ThreadPoolExecutor(1, thread_name_prefix="ngram-metrics") if ngram_wanted and clip_wanted else None
    pending = side.submit(ngrams) if side is not None else None
    try:
        if clip_wanted:
            from captionlab.metrics.clipscore import clip_scores
            from captionlab.models.clip import load_clip

            t0 = time.perf_counter()
            backend = load_clip(clip)
            timings["clip_load"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores = clip_scores(backend, image_paths, columns["caption"],
                                 references=[refs[s] for s in stems] if "RefCLIPScore" in clip_wanted else None,
                                 batch_size=batch_size, prefix=prefix)
            timings["clip"] = time.perf_counter() - t0
            summary["clip_model"] = backend.name
            columns["clipscore"] = scores["clipscore"]
            summary["CLIPScore"] = float(np.mean(scores["clipscore"]))
            if "RefCLIPScore" in clip_wanted:
                columns["refclipscore"], columns["ref_clip_sim"] = scores["refclipscore"], scores["ref_sim"]
                summary["RefCLIPScore"] = float(np.mean(scores["refclipscore"]))

        if ngram_wanted:
            s, per, why, timings["ngram"] = pending.result() if pending is not None else ngrams()
            summary.update(s)
            unavailable.update(why)
            columns.update(per)
    finally:
        if side is not None:
            side.shutdown(wait=False)

    columns["references"] = [refs[s] for s in stems]
    ordered = ["stem", "caption", "cider", "clipscore", "refclipscore"]
    per_image = pd.DataFrame(columns)
    per_image = per_image[[c for c in ordered if c in per_image] + [c for c in per_image if c not in ordered]]
    for m in metrics:
        if m not in summary and m not in unavailable and not (m == "BLEU" and "Bleu_4" in summary):
            unavailable[m] = "not computed"
    summary = {
        **{k: summary[k] for k in ("CIDEr", "CLIPScore", "RefCLIPScore") if k in summary},
        **{k: v for k, v in summary.items() if k not in ("CIDEr", "CLIPScore", "RefCLIPScore")},
        "unavailable": unavailable,
        "n_images": len(stems),
        "predictions": pred_src,
        "annotations": ann_src,
        "images_dir": str(Path(images_dir).resolve()) if images_dir is not None else None,
        "metrics": metrics,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        **run_metadata(params, world, seed),
    }
    for k, v in list(summary.items()):
        if isinstance(v, float) and not math.isfinite(v):
            summary[k] = None
    return EvalResult(summary=summary, per_image=per_image)
