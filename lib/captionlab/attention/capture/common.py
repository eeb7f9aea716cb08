"""What every capture backend shares: image inputs, layer specs, the per-step recorder and result assembly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from captionlab.attention.capture.result import AttentionResult, merge_words
from captionlab.attention.grids import Heads, center_crop_square
from captionlab.errors import ConfigError

LayerSpec = int | Sequence[int] | str


def as_images(images: Sequence[Any]) -> tuple[list[Image.Image], list[str]]:
    from captionlab.data.images import load_image

    pil, names = [], []
    for i, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            pil.append(load_image(im))
            names.append(Path(im).stem)
        elif isinstance(im, Image.Image):
            pil.append(im.convert("RGB"))
            fname = getattr(im, "filename", "") or ""
            names.append(Path(fname).stem if fname else f"image{i}")
        else:
            raise ConfigError(f"images must be PIL images or paths, got {type(im).__name__}")
    return pil, names


def resolve_layers(layer: LayerSpec, n_layers: int) -> list[int]:
    if layer == "all":
        return list(range(n_layers))
    if isinstance(layer, str):
        raise ConfigError(f"layer must be an index, a list of indices or 'all', got {layer!r}")
    items = [layer] if isinstance(layer, (int, np.integer)) else list(layer)  # type: ignore[arg-type]
    out = []
    for i in items:
        if not -n_layers <= int(i) < n_layers:
            raise ConfigError(f"layer {i} out of range: the decoder has {n_layers} layers")
        out.append(int(i) % n_layers)
    if not out:
        raise ConfigError("no layer to capture")
    return out


class Recorder:
    """Keeps, per forward call, the last query row on the image keys of every batch row: (B, H, n_img)."""

    def __init__(self, starts: Tensor, n_img: int) -> None:
        self.index = starts[:, None] + torch.arange(n_img)[None, :]  # (B, n_img) key positions
        self.steps: list[Tensor] = []

    def __call__(self, att: Tensor) -> None:
        row = att[:, :, -1, :].detach()  # (B, H, K): the query predicting the next token
        idx = self.index.to(row.device)[:, None, :].expand(-1, row.shape[1], -1)
        self.steps.append(row.gather(-1, idx).float().cpu())

    def per_row(self, b: int, n: int) -> np.ndarray:
        """(n, H, n_img) for batch row b's first n generated tokens."""
        if n == 0:
            n_heads = self.steps[0].shape[1] if self.steps else 1
            return np.zeros((0, n_heads, self.index.shape[1]), np.float32)
        if len(self.steps) < n:
            raise RuntimeError(f"captured {len(self.steps)} steps but {n} tokens were generated")
        return torch.stack([s[b] for s in self.steps[:n]]).numpy()


def build_results(recorders: dict[int, Recorder], token_ids: list[list[int]], tokenizer: Any,
                   pil: list[Image.Image], names: list[str], grid: tuple[int, int], layer: LayerSpec,
                   heads: Heads, unit: str, offset: int = 0) -> list[AttentionResult]:
    out = []
    gh, gw = grid
    for b, ids in enumerate(token_ids):
        per_layer = [rec.per_row(b, len(ids)) for rec in recorders.values()]
        hm = np.mean(per_layer, axis=0)
        hm = hm.reshape(len(ids), hm.shape[1], gh, gw).astype(np.float32)
        pieces, groups = merge_words(ids, tokenizer)
        caption = tokenizer.decode(ids, skip_special_tokens=True).strip()
        res = AttentionResult(tokens=[], maps=np.zeros((0, gh, gw), np.float32), grid=grid,
                              image=center_crop_square(pil[offset + b]), caption=caption,
                              layer=layer if isinstance(layer, (int, str)) else list(layer), heads=heads,
                              name=names[offset + b], token_ids=list(ids), token_strs=pieces, head_maps=hm,
                              word_groups=groups, unit=unit)
        out.append(res._with_unit(unit))
    return out


def strip_eos(seqs: Sequence[Sequence[int]], eos: int | Sequence[int] | None, pad: int | None = None) -> list[list[int]]:
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    if pad is not None:
        stops.add(pad)
    out = []
    for s in seqs:
        s = [int(t) for t in s]
        cut = next((i for i, t in enumerate(s) if t in stops), len(s))
        out.append(s[:cut])
    return out
