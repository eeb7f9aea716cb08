"""Attention figures: the image then one overlay per word (heat map upsampled bilinear to the image)."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from captionlab.attention.grids import normalize, upsample
from captionlab.errors import DataError
from captionlab.utils import atomic_path

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from captionlab.attention.capture import AttentionResult


def heatmap(result: "AttentionResult", i: int, norm: str = "minmax") -> np.ndarray:
    """Word i's map upsampled (bilinear) to the image size and normalised for display, (H, W) in [0, 1]."""
    size = (result.image.height, result.image.width) if result.image is not None else result.grid
    return normalize(upsample(result.maps[i], size), norm)


@contextlib.contextmanager
def quiet_glyphs() -> Iterator[None]:
    """Silence matplotlib's "Glyph ... missing from font" warnings (random-weight captions hold any Unicode;
    the glyph is drawn as a box either way)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        yield


def overlay(ax: "Axes", image: Any, heat: np.ndarray | None, title: str = "", alpha: float = 0.5,
            cmap: str = "jet") -> None:
    """Draw `image` on `ax` with `heat` (same size, [0, 1]) on top; no ticks."""
    if image is not None:
        ax.imshow(image)
    if heat is not None:
        ax.imshow(heat, cmap=cmap, alpha=alpha if image is not None else 1.0, vmin=0.0, vmax=1.0,
                  interpolation="nearest")
    ax.set_title(title, fontsize=10, parse_math=False)  # model text: a "$" is not mathtext
    ax.set_xticks([])
    ax.set_yticks([])


def attention_series(result: "AttentionResult", cols: int = 5, alpha: float = 0.5, cmap: str = "jet",
                     norm: str = "minmax", panel_size: float = 2.2, title: str | None = None) -> "Figure":
    """The image, then one overlay per word (word as title), `cols` panels per row; the title names the caption,
    method, layer, heads and patch grid."""
    from matplotlib.figure import Figure

    n = len(result.tokens) + 1
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(panel_size * cols, panel_size * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    overlay(axes[0, 0], result.image, None, title="<image>")
    for i, word in enumerate(result.tokens, start=1):
        overlay(axes[i // cols, i % cols], result.image, heatmap(result, i - 1, norm), title=word, alpha=alpha,
                cmap=cmap)
    for j in range(n, rows * cols):
        axes[j // cols, j % cols].axis("off")
    layer = result.layer if not isinstance(result.layer, list) else ",".join(map(str, result.layer))
    method = getattr(result, "method", None)
    how = (f"{method}, " if method else "") + f"layer {layer}" + (f", heads {result.heads}" if method in (None, "raw") else "")
    how += ", {}x{} patches".format(*result.grid)
    fig.suptitle(title if title is not None else f"{result.name or ''}: \"{result.caption}\" ({how})",
                 fontsize=11, parse_math=False)
    return fig


def series_path(out_dir: str | os.PathLike, name: str) -> Path:
    """The PNG path of an image's series: `bike.jpg` -> out_dir/bike.png."""
    return Path(out_dir) / (Path(name).stem + ".png")


def save_figure(fig: "Figure", path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        with quiet_glyphs():
            fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def save_series(result: "AttentionResult", out_dir: str | os.PathLike, name: str | None = None, dpi: int = 100,
                **kw: Any) -> Path:
    """Write `attention_series(result)` to out_dir/<image stem>.png (atomic); return the path."""
    name = name or result.name
    if not name:
        raise DataError("save_series: the result has no image name; pass name=")
    return save_figure(attention_series(result, **kw), series_path(out_dir, name), dpi=dpi)


def top_last_pairs(per_image: "pd.DataFrame", k: int = 1, score: str = "CLIPScore",
                   key: str | None = None) -> "pd.DataFrame":
    """The k best and k worst images by `score`: DataFrame [which ("top"/"last"), rank, <key>, <score>, ...].

    `key` is the image-name column (default: the first of stem / image / file_name / image_id, else the index).
    """
    import pandas as pd

    if score not in per_image.columns:
        raise DataError(f"top_last_pairs: no {score!r} column (columns: {list(per_image.columns)})")
    df = per_image.reset_index() if key is None and not any(
        c in per_image.columns for c in ("stem", "image", "file_name", "image_id")) else per_image.copy()
    key = key or next(c for c in ("stem", "image", "file_name", "image_id", "index") if c in df.columns)
    df = df.dropna(subset=[score])
    ordered = df.sort_values(score, ascending=False, kind="stable")
    k = min(k, len(ordered))
    top = ordered.head(k).assign(which="top", rank=range(1, k + 1))
    last = ordered.iloc[::-1].head(k).assign(which="last", rank=range(1, k + 1))
    out = pd.concat([top, last], ignore_index=True)
    return out[["which", "rank", key, score] + [c for c in out.columns if c not in ("which", "rank", key, score)]]
