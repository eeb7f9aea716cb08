"""Token -> patch bookkeeping: image-token spans, key-axis slices to patch grids, head reduction, normalisation,
upsampling to image size, and masks pooled to the patch grid.

Conventions: a patch grid is (gh, gw), row-major (the order ViT / CLIP flatten patches in); key position
`start + r * gw + c` of an image span `(start, end)` is patch (r, c). Upsampling is bilinear with
`align_corners=False`, i.e. each patch value sits at its patch centre (what `F.interpolate` does for images).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from captionlab.errors import ConfigError

Heads = str | int  # "mean" | "max" | a head index


def image_token_span(input_ids: Sequence[int] | torch.Tensor, image_token_id: int) -> tuple[int, int]:
    """(start, end) of the contiguous run of `image_token_id` in one row of input ids (raises if absent/split)."""
    ids = torch.as_tensor(input_ids).reshape(-1)
    pos = (ids == image_token_id).nonzero().reshape(-1)
    if pos.numel() == 0:
        raise ConfigError(f"no image token (id {image_token_id}) in input_ids: was the prompt built with an image?")
    start, end = int(pos[0]), int(pos[-1]) + 1
    if end - start != pos.numel():
        raise ConfigError(f"image tokens (id {image_token_id}) are not contiguous in input_ids: "
                          f"{pos.numel()} tokens spread over positions {start}..{end - 1} (several images?)")
    return start, end


def infer_grid(n_patches: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The patch grid for `n_patches` image tokens: `grid` when it matches, else the square root (or an error)."""
    if grid is not None and grid[0] * grid[1] == n_patches:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(n_patches)
    if side * side == n_patches:
        return side, side
    raise ConfigError(f"{n_patches} image tokens do not form the patch grid {grid} nor a square grid")


def patch_of_key(position: int, span: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """The (row, col) patch of key `position` inside the image span `(start, end)` of a (gh, gw) grid."""
    start, end = span
    if not start <= position < end:
        raise IndexError(f"key position {position} is outside the image span {span}")
    if end - start != grid[0] * grid[1]:
        raise ConfigError(f"image span {span} has {end - start} keys, grid {grid} needs {grid[0] * grid[1]}")
    return divmod(position - start, grid[1])


def key_of_patch(row: int, col: int, span: tuple[int, int], grid: tuple[int, int]) -> int:
    """The key position of patch (row, col): the inverse of `patch_of_key`."""
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        raise IndexError(f"patch ({row}, {col}) is outside the grid {grid}")
    return span[0] + row * grid[1] + col


def span_to_grid(att: torch.Tensor | np.ndarray, span: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor | np.ndarray:
    """Slice the key axis (last) of `att` to the image span and reshape it to (..., gh, gw)."""
    start, end = span
    if end - start != grid[0] * grid[1]:
        raise ConfigError(f"image span {span} has {end - start} keys, grid {grid} needs {grid[0] * grid[1]}")
    part = att[..., start:end]
    return part.reshape(*part.shape[:-1], grid[0], grid[1])


def reduce_heads(att: torch.Tensor, heads: Heads, dim: int = 1) -> torch.Tensor:
    """Reduce the head axis `dim`: "mean", "max" or one head index (kept out of the result's shape)."""
    if heads == "mean":
        return att.mean(dim=dim)
    if heads == "max":
        return att.amax(dim=dim)
    if isinstance(heads, (int, np.integer)) and not isinstance(heads, bool):
        n = att.shape[dim]
        if not -n <= int(heads) < n:
            raise ConfigError(f"head index {heads} out of range for {n} heads")
        return att.select(dim, int(heads))
    raise ConfigError(f"heads must be 'mean', 'max' or a head index, got {heads!r}")


def normalize(m: np.ndarray, mode: str = "sum") -> np.ndarray:
    """Normalise a map over its last two axes: "sum" (to 1), "max" (peak 1) or "minmax" (to [0, 1])."""
    m = np.asarray(m, dtype=np.float32)
    if mode == "sum":
        s = m.sum(axis=(-2, -1), keepdims=True)
        return m / np.where(s > 0, s, 1.0)
    if mode == "max":
        s = m.max(axis=(-2, -1), keepdims=True)
        return m / np.where(s > 0, s, 1.0)
    if mode == "minmax":
        lo, hi = m.min(axis=(-2, -1), keepdims=True), m.max(axis=(-2, -1), keepdims=True)
        return (m - lo) / np.where(hi > lo, hi - lo, 1.0)
    raise ConfigError(f"normalize mode must be 'sum', 'max' or 'minmax', got {mode!r}")


def upsample(m: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Upsample (..., gh, gw) maps to (..., H, W) = `size` (bilinear, align_corners=False, or "nearest")."""
    m = np.asarray(m, dtype=np.float32)
    lead = m.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(m.reshape(-1, 1, *m.shape[-2:])))
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(t, size=tuple(size), mode=mode, **kw)
    return out.reshape(*lead, *size).numpy()


def mask_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch covered by a boolean (H, W) mask, as (gh, gw) (area pooling; H, W need not divide)."""
    t = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(t, tuple(grid))[0, 0].numpy()


def center_crop_square(img: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """The central square of an image or (H, W[, C]) array: the region CLIP-style preprocessing keeps."""
    if isinstance(img, Image.Image):
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return img if w == h else img.crop((left, top, left + s, top + s))
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return img[top:top + s, left:left + s]
