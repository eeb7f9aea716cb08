"""CLIPScore and RefCLIPScore (Hessel et al., 2021), batched over any CLIP backend.

CLIPScore(c, v)       = w * max(cos(E_img(v), E_txt(c)), 0), w = 2.5; the corpus score is the mean over images.
RefCLIPScore(c, R, v) = harmonic mean of CLIPScore(c, v) and max(max_r cos(E_txt(c), E_txt(r)), 0)
(as in Hessel et al.'s reference implementation, the text-text term is not rescaled by w; `ref_weight` changes that).
Like the course evaluator, captions are embedded as written (no "A photo depicts" prefix unless `prefix` is given).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from captionlab.errors import ConfigError
from captionlab.models.clip import ClipBackend, load_clip
from captionlab.utils import atomic_path, cache_dir

W = 2.5


def _embedding_cache_file(clip: ClipBackend, paths: Sequence[str | os.PathLike], batch_size: int) -> Path:
    """Where `encode_image_files` keeps these embeddings: keyed by the CLIP (spec, its files' sizes and mtimes,
    device, dtype), the batch size (it changes the last bits) and each image's path, size and mtime."""
    from captionlab.models.clip import _fingerprint
    from captionlab.models.features import hash_image_files

    try:
        files = _fingerprint(clip.name)
    except ConfigError:  # a backend built by hand under a name that is no spec
        files = ""
    h = hashlib.sha256(f"{clip.name}\n{files}\n{clip.device}\n{clip.dtype}\n{batch_size}".encode())
    hash_image_files(h, paths)
    return cache_dir() / "clip_images" / f"{h.hexdigest()[:20]}.npy"


def encode_image_files(clip: ClipBackend, paths: Sequence[str | os.PathLike], batch_size: int = 64,
                       progress: bool = True, cache: bool = True) -> torch.Tensor:
    """Embed image files batch by batch (only one batch decoded at a time): (N, D) L2-normalised.

    With `cache`, the embeddings are stored under $CAPTIONLAB_CACHE/clip_images/ and reused exactly by later
    evaluations of the same images (02's attempts, 01's prompt-study cells and 03's decodings all score one set)."""
    from captionlab.data.images import load_image

    file = _embedding_cache_file(clip, paths, batch_size) if cache else None
    if file is not None and file.exists():
        try:
            return torch.from_numpy(np.load(file))
        except (OSError, ValueError):  # a damaged entry: computed again and replaced
            pass
    out = [torch.zeros(0, clip.embed_dim)]
    for i in tqdm(range(0, len(paths), batch_size), desc="CLIPScore images", disable=not progress or len(paths) <= batch_size,
                  leave=False):
        out.append(clip.encode_images([load_image(p) for p in paths[i:i + batch_size]], batch_size=batch_size))
    emb = torch.cat(out)
    if file is not None:
        with atomic_path(file, suffix=".npy") as tmp:
            np.save(tmp, emb.numpy())
    return emb


def _as_embeddings(clip: ClipBackend, images: Sequence[Any] | torch.Tensor, batch_size: int) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return torch.nn.functional.normalize(images.float(), dim=-1)
    if all(isinstance(x, (str, os.PathLike)) for x in images):
        return encode_image_files(clip, list(images), batch_size)
    return clip.encode_images(list(images), batch_size=batch_size)


def clip_scores(clip: ClipBackend | str, images: Sequence[Any] | torch.Tensor, captions: Sequence[str],
                references: Sequence[Sequence[str]] | None = None, batch_size: int = 64, w: float = W,
                ref_weight: float = 1.0, prefix: str = "") -> dict[str, np.ndarray]:
    """Per-item scores: {"clipscore": (N,)} plus {"refclipscore", "ref_sim"} when `references` are given.

    `images` are PIL images, image paths, or precomputed (N, D) image embeddings; item i pairs images[i] with
    captions[i] (and references[i])."""
    clip = load_clip(clip)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    img = _as_embeddings(clip, images, batch_size)
    txt = clip.encode_texts([prefix + c for c in captions], batch_size=max(batch_size, 256))
    cos = (img * txt).sum(-1).double().numpy()
    out = {"clipscore": w * np.maximum(cos, 0.0)}
    if references is not None:
        if len(references) != len(captions):
            raise ValueError(f"{len(references)} reference lists but {len(captions)} captions")
        flat = [r for refs in references for r in refs]
        owner = np.repeat(np.arange(len(references)), [len(r) for r in references])
        if any(len(r) == 0 for r in references):
            raise ValueError("every item needs at least one reference for RefCLIPScore")
        ref = clip.encode_texts(flat, batch_size=max(batch_size, 256))
        sims = (ref * txt[torch.from_numpy(owner)]).sum(-1).double().numpy()
        best = np.full(len(captions), -np.inf)
        np.maximum.at(best, owner, sims)
        ref_sim = ref_weight * np.maximum(best, 0.0)
        out["ref_sim"] = ref_sim
        out["refclipscore"] = harmonic_mean(out["clipscore"], ref_sim)
    return out


def harmonic_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise 2ab/(a+b), 0 where a+b == 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    s = a + b
    return np.divide(2 * a * b, s, out=np.zeros_like(s), where=s > 0)


class ClipScore:
    """CLIPScore in pycocoevalcap's shape: `compute_score(gts, res)` with `images[key]` the image of each key.

    gts are unused (CLIPScore is reference-free); res is {key: [caption]} or {key: caption}."""

    name = "CLIPScore"

    def __init__(self, clip: ClipBackend | str, images: Mapping[Hashable, Any], batch_size: int = 64,
                 w: float = W, prefix: str = "") -> None:
        self.clip, self.images, self.batch_size, self.w, self.prefix = load_clip(clip), images, batch_size, w, prefix

    def _inputs(self, res: Mapping[Hashable, Any]) -> tuple[list[Hashable], list[Any], list[str]]:
        keys = list(res)
        missing = [k for k in keys if k not in self.images]
        if missing:
            raise KeyError(f"no image for {len(missing)} key(s), e.g. {missing[:5]}")
        caps = [res[k] if isinstance(res[k], str) else res[k][0] for k in keys]
        return keys, [self.images[k] for k in keys], caps

    def compute_score(self, gts: Mapping[Hashable, Any] | None, res: Mapping[Hashable, Any]) -> tuple[float, np.ndarray]:
        """(mean CLIPScore, per-key scores in `res` order)."""
        keys, imgs, caps = self._inputs(res)
        s = clip_scores(self.clip, imgs, caps, batch_size=self.batch_size, w=self.w, prefix=self.prefix)["clipscore"]
        return float(s.mean()) if len(s) else float("nan"), s

    def method(self) -> str:
        return self.name


class RefClipScore(ClipScore):
    """RefCLIPScore in pycocoevalcap's shape: `compute_score(gts, res)`, gts = {key: [reference, ...]}."""

    name = "RefCLIPScore"

    def compute_score(self, gts: Mapping[Hashable, Any], res: Mapping[Hashable, Any]) -> tuple[float, np.ndarray]:
        """(mean RefCLIPScore, per-key scores in `res` order)."""
        keys, imgs, caps = self._inputs(res)
        s = clip_scores(self.clip, imgs, caps, references=[list(gts[k]) for k in keys], batch_size=self.batch_size,
                        w=self.w, prefix=self.prefix)["refclipscore"]
        return float(s.mean()) if len(s) else float("nan"), s
