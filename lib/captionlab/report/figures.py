"""Save-and-show helpers: every figure and table a notebook shows is also written to disk (PNG / CSV).

Static HTML cannot run ipywidgets and a kernel started with MPLBACKEND=Agg shows no inline plots, so
notebooks display figures through `show(fig, path)`: it writes the PNG atomically and displays those bytes.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Sequence

from captionlab.utils import atomic_write_bytes, atomic_write_text


def _display(obj: Any) -> None:
    try:
        from IPython.display import display
    except ImportError:  # plain python: nothing to show
        return
    display(obj)


def figure_png(fig: Any, dpi: int = 120) -> bytes:
    """A matplotlib figure as PNG bytes."""
    from captionlab.attention.figures import quiet_glyphs

    buf = io.BytesIO()
    with quiet_glyphs():
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure to `path` as PNG (atomically)."""
    return atomic_write_bytes(path, figure_png(fig, dpi))


def show(fig: Any, path: str | Path | None = None, dpi: int = 120, close: bool = True) -> Path | None:
    """Save `fig` as PNG at `path` (if given), display it as an image, close it; returns the path."""
    import matplotlib.pyplot as plt

    data = figure_png(fig, dpi)
    out = atomic_write_bytes(path, data) if path is not None else None
    try:
        from IPython.display import Image
    except ImportError:
        Image = None
    if Image is not None:
        _display(Image(data=data, format="png"))
    if close:
        plt.close(fig)
    return out


def show_image(path: str | Path) -> None:
    """Display an existing image file (e.g. a PNG written by the library)."""
    from IPython.display import Image

    _display(Image(filename=str(path)))


def _mask_cmap() -> Any:
    import matplotlib
    from matplotlib.colors import ListedColormap

    return ListedColormap(["#ffffff", *matplotlib.colormaps["tab10"].colors[:9]])


def image_grid(images: Sequence[Any], titles: Sequence[str] | None = None, ncols: int = 4,
               size: float = 2.2, wrap: int = 28) -> Any:
    """A grid of images (PIL / HxW(x3) arrays) with wrapped titles under each; returns the figure."""
    import textwrap

    import matplotlib.pyplot as plt
    import numpy as np

    n = max(1, len(images))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * 1.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.flat[i]
        arr = np.asarray(img)
        if arr.ndim == 2:  # a label mask: background white, objects in tab10 colours
            ax.imshow(arr, cmap=_mask_cmap(), vmin=0, vmax=9, interpolation="nearest")
        else:
            ax.imshow(arr, interpolation="nearest")
        if titles is not None and i < len(titles):
            ax.set_title("\n".join(textwrap.wrap(str(titles[i]), wrap)), fontsize=7, parse_math=False)
    fig.tight_layout()
    return fig


def show_table(rows: Iterable[dict[str, Any]] | Any, path: str | Path | None = None,
               floatfmt: str = "{:.4f}") -> Any:
    """Display rows (dicts or a DataFrame) as a table and write them as CSV at `path`; returns the DataFrame."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if path is not None:
        atomic_write_text(path, df.to_csv(index=False))
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() else floatfmt.format(v)
        return str(v)

    _display(df.style.format(fmt, na_rep="").hide(axis="index"))
    return df


def bar_chart(df: Any, x: str, metrics: Sequence[str], title: str = "") -> Any:
    """One bar panel per metric over the values of column `x` (e.g. a sweep's settings); returns the figure."""
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if m in df.columns]
    labels = [str(v) for v in df[x]]
    # many or long labels (e.g. 04's method x layer rows): vertical tick labels and values, wider panels
    crowded = len(labels) > 6 or max((len(t) for t in labels), default=0) * len(labels) > 40
    width = max(3.2, 0.32 * len(labels)) if crowded else 3.2
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(width * max(1, len(metrics)), 3.6 if crowded else 3.0),
                             squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ax.bar(labels, df[m], color="#4c72b0")
        ax.set_title(m)
        ax.set_xlabel(x)
        if crowded:
            ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        for i, v in enumerate(df[m]):
            label = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
            ax.annotate(label, (i, v), ha="center", va="bottom", fontsize=6 if crowded else 8,
                        rotation=90 if crowded else 0)
        if crowded:
            ax.margins(y=0.25)  # room for the vertical values above the tallest bar
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
