"""Browsing attention: an ipywidgets browser (word slider, method / layer / head selectors) and a static word slider.

- `attention_browser(source)` renders each frame to PNG into an `ipywidgets.Image`, so it works under any
  matplotlib backend (Agg included); it offers every layer of its source and every method, starting at
  `start_layer` (the notebook's `attention_layer`).
- `word_slider(result)` is a self-contained HTML output (frames as base64 PNG, a few lines of plain JavaScript,
  no external script): it works in the static HTML report and offline. It is hidden when printing, where the
  PNG series (`attention_series`) stands in. `save_frames` writes one PNG per word.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from captionlab.attention.figures import attention_series, heatmap, overlay, quiet_glyphs, save_figure

if TYPE_CHECKING:
    from captionlab.attention.capture import AttentionResult


class ResultCache:
    """Results per layer, captured on first use (one generation pass per layer); heads re-reduced without recompute."""

    methods: tuple[str, ...] = ("raw",)

    def __init__(self, compute: Callable[[int], "AttentionResult"], layers: Sequence[int] | None = None) -> None:
        self.compute = compute
        self.by_layer: dict[int, "AttentionResult"] = {}
        self._layers = list(layers) if layers is not None else None

    @property
    def layers(self) -> list[int]:
        """The layers this cache can show."""
        return self._layers if self._layers is not None else (sorted(self.by_layer) or [0])

    def get(self, layer: int, heads: Any = "mean", method: str = "raw") -> "AttentionResult":
        """The result at `layer` with `heads` ("mean", "max" or an index)."""
        if method != "raw":
            raise ValueError(f"a generation-time capture has raw attention only, not {method!r}")
        if layer not in self.by_layer:
            self.by_layer[layer] = self.compute(layer)
        return self.by_layer[layer].with_heads(heads)


class ExplanationCache:
    """Teacher-forced explanations of one image + caption by method (computed on first use, all layers at once)."""

    def __init__(self, model: Any, image: Any, caption: Any, prompt: str | None = None,
                 methods: Sequence[str] | None = None, unit: str = "words") -> None:
        from captionlab.attention.capture import num_layers
        from captionlab.attention.explain import METHODS

        self.model, self.image, self.caption, self.prompt, self.unit = model, image, caption, prompt, unit
        self.n_layers = num_layers(model)
        self.methods = tuple(methods or METHODS)
        self.by_method: dict[str, dict[int, "AttentionResult"]] = {}

    @property
    def layers(self) -> list[int]:
        """Every layer of the model."""
        return list(range(self.n_layers))

    def get(self, layer: int, heads: Any = "mean", method: str = "raw") -> "AttentionResult":
        """The explanation by `method` at `layer` (heads apply to raw attention)."""
        from captionlab.attention.explain import explain_all

        if method not in self.by_method:
            per = explain_all(self.model, self.image, self.caption, [method], "all", "mean", self.unit, self.prompt)
            self.by_method[method] = {j: r for (_, j), r in per.items()}
            if not self.by_method[method]:
                raise ValueError(f"method {method!r} does not apply to this model (cross-attention conditioning)")
        res = self.by_method[method][layer % self.n_layers]
        return res.with_heads(heads) if method == "raw" else res


def cache_for(model: Any, image: Any, prompt: str | None = None, layers: Sequence[int] | str | None = "all",
              **capture_kw: Any) -> ResultCache:
    """A ResultCache for one image of a PEFT captioner or LLaVA; `layers` ("all" by default) are captured now in
    one generation pass; None captures lazily."""
    from captionlab.attention.capture import capture, capture_layers, num_layers

    all_layers = list(range(num_layers(model)))
    cache = ResultCache(lambda layer: capture(model, [image], prompt=prompt, layer=layer, progress=False,
                                              **capture_kw)[0], layers=all_layers)
    if layers:
        wanted = all_layers if layers == "all" else list(layers)  # type: ignore[arg-type]
        per = capture_layers(model, [image], wanted, prompt=prompt, progress=False, **capture_kw)
        cache.by_layer.update({j: res[0] for j, res in per.items()})
    return cache


def frame_png(result: "AttentionResult", i: int, alpha: float = 0.5, cmap: str = "jet", dpi: int = 100,
              size: float = 3.2) -> bytes:
    """Word i's overlay as PNG bytes (a bare Figure rendered by Agg: no pyplot, any backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size, size), layout="constrained")
    has = 0 <= i < len(result.tokens)
    overlay(fig.subplots(), result.image, heatmap(result, i) if has else None,
            title=result.tokens[i] if has else "", alpha=alpha, cmap=cmap)
    buf = io.BytesIO()
    with quiet_glyphs():
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def attention_browser(source: Any, layers: Sequence[int] | None = None, n_heads: int | None = None,
                      alpha: float = 0.5, cmap: str = "jet", start_layer: int = -1,
                      methods: Sequence[str] | None = None, start_method: str | None = None) -> Any:
    """An ipywidgets box: method / layer / head dropdowns and a word slider above a PNG of the chosen word.

    `source`: an ExplanationCache (every method), a ResultCache (raw captures) or one AttentionResult."""
    import ipywidgets as w

    if not hasattr(source, "get"):
        fixed = source
        source = ResultCache(lambda layer: fixed)
        source.by_layer[fixed.layer if isinstance(fixed.layer, int) else 0] = fixed
    layers = list(layers) if layers is not None else list(source.layers)
    methods = list(methods or source.methods)
    if start_layer in layers:
        start = start_layer
    elif -len(layers) <= start_layer < 0:
        start = layers[start_layer]
    else:
        raise ValueError(f"start_layer {start_layer} is not one of the layers {layers}")
    first = source.get(start, "mean", start_method or methods[0])
    n_heads = n_heads or (first.head_maps.shape[1] if first.head_maps is not None else 1)
    method_dd = w.Dropdown(options=methods, value=start_method or methods[0], description="method")
    layer_dd = w.Dropdown(options=layers, value=start, description="layer")
    head_dd = w.Dropdown(options=["mean", "max", *range(n_heads)], value="mean", description="heads")
    word = w.IntSlider(min=0, max=max(len(first.tokens) - 1, 0), value=0, description="word")
    label = w.Label()
    image = w.Image(format="png")

    def redraw(_: Any = None) -> None:
        head_dd.disabled = method_dd.value != "raw"
        res = source.get(layer_dd.value, head_dd.value if method_dd.value == "raw" else "mean", method_dd.value)
        word.max = max(len(res.tokens) - 1, 0)
        i = min(word.value, word.max)
        label.value = f"{res.caption}  ->  [{res.tokens[i] if res.tokens else ''}]"
        image.value = frame_png(res, i, alpha=alpha, cmap=cmap)

    for ctl in (method_dd, layer_dd, head_dd, word):
        ctl.observe(redraw, names="value")
    redraw()

    def static() -> str:
        head = head_dd.value if method_dd.value == "raw" else "mean"
        return word_slider(source.get(layer_dd.value, head, method_dd.value), alpha=alpha, cmap=cmap).html

    return _browser_class()([w.HBox([method_dd, layer_dd, head_dd]), word, label, image], static=static)


@functools.cache
def _browser_class() -> type:
    """An ipywidgets VBox whose display bundle also holds the static word slider of its current selection
    (text/html), which a saved page shows where the live widget cannot run."""
    import ipywidgets as w

    class AttentionBrowser(w.VBox):  # type: ignore[misc]
        def __init__(self, children: list, static: Callable[[], str]) -> None:
            super().__init__(children)
            self._static = static

        def _repr_mimebundle_(self, **kwargs: Any) -> Any:
            data = super()._repr_mimebundle_(**kwargs)
            if isinstance(data, dict):
                data["text/html"] = self._static()
            return data

    return AttentionBrowser


# ------------------------------------------------------------------------------------- static slider

_SLIDER_JS = """(function(){var r=document.getElementById(%(id)s),f=JSON.parse(r.querySelector('script[type="application/json"]').textContent),
s=r.querySelector('input'),i=r.querySelector('img'),l=r.querySelector('.cl-word');
function show(){var k=+s.value;i.src='data:image/png;base64,'+f.frames[k];l.textContent=f.words[k];}
s.addEventListener('input',show);show();})();"""


class WordSlider:
    """A self-contained HTML word slider (frames embedded); displays as text/html in notebooks and nbconvert."""

    def __init__(self, html_text: str) -> None:
        self.html = html_text

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path: str | os.PathLike) -> Path:
        """Write a standalone HTML page holding the slider (atomic)."""
        from captionlab.utils import atomic_write_text

        page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>attention</title></head><body>{self.html}</body></html>"
        return atomic_write_text(path, page)


def word_slider(result: "AttentionResult", title: str | None = None, alpha: float = 0.5, cmap: str = "jet",
                dpi: int = 80) -> WordSlider:
    """A word slider over `result`'s frames: plain HTML + JavaScript, frames as base64 PNG, no external files."""
    frames = [base64.b64encode(frame_png(result, i, alpha, cmap, dpi)).decode("ascii")
              for i in range(len(result.tokens))]
    words = [str(t) for t in result.tokens]
    uid = f"cl-slider-{uuid.uuid4().hex[:12]}"
    method = getattr(result, "method", "raw")
    layer = result.layer if not isinstance(result.layer, list) else ",".join(map(str, result.layer))
    head = title if title is not None else f'{result.name or ""}: "{result.caption}" ({method}, layer {layer})'
    data = json.dumps({"frames": frames, "words": words}).replace("</", "<\\/")
    n = max(len(frames) - 1, 0)
    text = (f'<div class="captionlab-slider" id="{uid}" style="font-family:sans-serif;margin:6px 0">'
            "<style>@media print{.captionlab-slider{display:none}}</style>"
            f'<div style="font-size:0.9em">{html.escape(head)}</div>'
            f'<input type="range" min="0" max="{n}" value="0" step="1" aria-label="word" style="width:240px">'
            ' <span class="cl-word" style="font-weight:bold"></span><br>'
            '<img alt="attention frame" style="width:240px;image-rendering:auto">'
            f'<script type="application/json">{data}</script>'
            f"<script>{_SLIDER_JS % {'id': json.dumps(uid)}}</script></div>")
    return WordSlider(text)


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
