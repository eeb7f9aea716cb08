"""An ipywidgets attention browser (word slider, layer and head selectors) and its static fallback.

Widgets render blank in static HTML (nbconvert / the PDF report), so notebooks also call `save_frames`, which
writes one PNG per word, and show `attention_series` figures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from captionlab.attention.figures import attention_series, heatmap, overlay, save_figure

if TYPE_CHECKING:
    from captionlab.attention.capture import AttentionResult


class ResultCache:
    """Results per layer, captured on first use (one generation pass per layer); heads re-reduced without recompute."""

    def __init__(self, compute: Callable[[int], "AttentionResult"]) -> None:
        self.compute = compute
        self.by_layer: dict[int, "AttentionResult"] = {}

    def get(self, layer: int, heads: Any = "mean") -> "AttentionResult":
        """The result at `layer` with `heads` ("mean", "max" or an index)."""
        if layer not in self.by_layer:
            self.by_layer[layer] = self.compute(layer)
        return self.by_layer[layer].with_heads(heads)


def cache_for(model: Any, image: Any, prompt: str | None = None, layers: Sequence[int] | None = None,
              **capture_kw: Any) -> ResultCache:
    """A ResultCache for one image of a PEFT captioner or LLaVA; `layers` given are captured now in one pass."""
    from captionlab.attention.capture import capture, capture_layers

    cache = ResultCache(lambda layer: capture(model, [image], prompt=prompt, layer=layer, progress=False,
                                              **capture_kw)[0])
    if layers:
        per = capture_layers(model, [image], list(layers), prompt=prompt, progress=False, **capture_kw)
        cache.by_layer.update({j: res[0] for j, res in per.items()})
    return cache


def attention_browser(source: ResultCache | "AttentionResult", layers: Sequence[int] | None = None,
                      n_heads: int | None = None, alpha: float = 0.5, cmap: str = "jet") -> Any:
    """An ipywidgets box: word slider + layer / head dropdowns above the overlay of the chosen word."""
    import ipywidgets as w
    from matplotlib.figure import Figure

    if not isinstance(source, ResultCache):
        fixed = source
        source = ResultCache(lambda layer: fixed)
        source.by_layer[fixed.layer if isinstance(fixed.layer, int) else 0] = fixed
    layers = list(layers) if layers is not None else sorted(source.by_layer) or [0]
    first = source.get(layers[-1])
    n_heads = n_heads or (first.head_maps.shape[1] if first.head_maps is not None else 1)
    layer_dd = w.Dropdown(options=layers, value=layers[-1], description="layer")
    head_dd = w.Dropdown(options=["mean", "max", *range(n_heads)], value="mean", description="heads")
    word = w.IntSlider(min=0, max=max(len(first.tokens) - 1, 0), value=0, description="word")
    label = w.Label()
    out = w.Output()

    def redraw(_: Any = None) -> None:
        res = source.get(layer_dd.value, head_dd.value)
        word.max = max(len(res.tokens) - 1, 0)
        i = min(word.value, word.max)
        label.value = f"{res.caption}  ->  [{res.tokens[i] if res.tokens else ''}]"
        fig = Figure(figsize=(3.2, 3.2), layout="constrained")
        overlay(fig.subplots(), res.image, heatmap(res, i) if res.tokens else None,
                title=res.tokens[i] if res.tokens else "", alpha=alpha, cmap=cmap)
        with out:
            out.clear_output(wait=True)
            from IPython.display import display

            display(fig)

    for ctl in (layer_dd, head_dd, word):
        ctl.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([layer_dd, head_dd]), word, label, out])


def save_frames(result: "AttentionResult", out_dir: str | os.PathLike, name: str | None = None,
                alpha: float = 0.5, cmap: str = "jet", dpi: int = 100) -> list[Path]:
    """Static fallback: one PNG per word, out_dir/<stem>/<index>_<word>.png, plus the series <stem>.png."""
    from matplotlib.figure import Figure

    stem = Path(name or result.name or "image").stem
    folder = Path(out_dir) / stem
    paths = []
    for i, token in enumerate(result.tokens):
        fig = Figure(figsize=(3.2, 3.2), layout="constrained")
        overlay(fig.subplots(), result.image, heatmap(result, i), title=token, alpha=alpha, cmap=cmap)
        safe = "".join(ch if ch.isalnum() else "_" for ch in token.strip())[:30] or "tok"
        paths.append(save_figure(fig, folder / f"{i:02d}_{safe}.png", dpi=dpi))
    paths.append(save_figure(attention_series(result, alpha=alpha, cmap=cmap), Path(out_dir) / f"{stem}.png",
                             dpi=dpi))
    return paths
