"""Capture backend of the PEFT captioner (our GPT decoder): the per-layer `capture` hook of its attention modules.

Only the captured layers materialise attention; every other layer keeps its fused kernel. The map of generated
token t is the attention row of the query that predicts t, restricted to the image patch keys.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from captionlab.attention.capture.common import LayerSpec, Recorder, as_images, build_results, resolve_layers, strip_eos
from captionlab.attention.capture.result import AttentionResult
from captionlab.attention.grids import Heads
from captionlab.errors import ConfigError


def gpt_attention_modules(decoder: torch.nn.Module, cross: bool = False) -> list[torch.nn.Module]:
    """The decoder's `CausalSelfAttention` modules (or, with `cross`, its `GatedCrossAttention` modules) in
    layer order (works through peft wrappers)."""
    from captionlab.models.decoder import CausalSelfAttention, GatedCrossAttention

    kind = GatedCrossAttention if cross else CausalSelfAttention
    mods = [m for m in decoder.modules() if isinstance(m, kind)]
    if not mods:
        raise ConfigError(f"{type(decoder).__name__}: no {kind.__name__} layers to capture")
    return mods


def captioner_attention_modules(captioner: Any) -> list[torch.nn.Module]:
    """The layers whose attention reaches the image: self-attention (prefix conditioning) or the gated
    cross-attention layers (cross conditioning; layer i is the i-th cross-attention layer)."""
    return gpt_attention_modules(captioner.decoder, cross=bool(getattr(captioner, "cross", False)))


@contextmanager
def gpt_capture(decoder: torch.nn.Module, hooks: dict[int, Callable[[Tensor], None]],
                cross: bool = False) -> Iterator[None]:
    """Set `capture` hooks on decoder layers {index: fn} for the duration of the block (then unset)."""
    mods = gpt_attention_modules(decoder, cross)
    try:
        for i, fn in hooks.items():
            mods[i].capture = fn
        yield
    finally:
        for i in hooks:
            mods[i].capture = None


def _captioner_grid(captioner: Any) -> tuple[int, int]:
    """The patch grid the decoder sees (after any visual pooling), checked against the image key span."""
    grid = tuple(captioner.image_grid()) if hasattr(captioner, "image_grid") else tuple(captioner.encoder.grid)
    start, end = captioner.image_key_span()
    if end - start != grid[0] * grid[1]:
        raise ConfigError(f"captioner image key span {(start, end)} does not hold the {grid} patch grid")
    return int(grid[0]), int(grid[1])


def captioner_lm_decoder(captioner: Any, pil: list[Image.Image]) -> Any:
    """The captioner's decoding object (prompt = visual prefix + bos, or bos with cross states) for `pil`."""
    return captioner.lm_decoder(captioner.visual_embeds(pixel_values=captioner.encoder.preprocess(pil)))


@torch.no_grad()
def capture_captioner_layers(captioner: Any, images: Sequence[Any], layers: LayerSpec = "all", heads: Heads = "mean",
                             unit: str = "words", max_new_tokens: int | None = None,
                             repetition_penalty: float = 1.0, batch_size: int = 16, progress: bool = True,
                             min_new_tokens: int = 0) -> dict[int, list[AttentionResult]]:
    """One greedy generation pass capturing each of `layers` separately: {layer: [AttentionResult per image]}."""
    from captionlab.decode import greedy_search

    pil, names = as_images(images)
    cross = bool(getattr(captioner, "cross", False))
    mods = gpt_attention_modules(captioner.decoder, cross)
    idx = resolve_layers(layers, len(mods))
    grid = _captioner_grid(captioner)
    start, end = captioner.image_key_span()
    tok = captioner.tokenizer
    max_new = max_new_tokens or captioner.config.max_caption_tokens + 1
    was_training = captioner.training
    captioner.eval()
    out: dict[int, list[AttentionResult]] = {i: [] for i in idx}
    try:
        for i in tqdm(range(0, len(pil), batch_size), desc="attention", unit="batch", disable=not progress):
            chunk = pil[i:i + batch_size]
            decoder = captioner_lm_decoder(captioner, chunk)
            recs = {j: Recorder(torch.full((len(chunk),), start), end - start) for j in idx}
            with gpt_capture(captioner.decoder, dict(recs), cross):
                seqs = greedy_search(decoder, max_new_tokens=max_new,
                                     eos_token_id=tok.eos_token_id, repetition_penalty=repetition_penalty,
                                     min_new_tokens=min_new_tokens)
            ids = strip_eos(seqs, tok.eos_token_id)
            for j in idx:
                out[j] += build_results({j: recs[j]}, ids, tok, pil, names, grid, j, heads, unit, offset=i)
    finally:
        captioner.train(was_training)
    return out


def capture_captioner(captioner: Any, images: Sequence[Any], layer: LayerSpec = -1, heads: Heads = "mean",
                      unit: str = "words", max_new_tokens: int | None = None, repetition_penalty: float = 1.0,
                      batch_size: int = 16, rollout: bool = False, progress: bool = True,
                      min_new_tokens: int = 0) -> list[AttentionResult]:
    """Greedy captions with per-word attention maps of the PEFT captioner at `layer` (an index, a list to average,
    or "all" to average every layer) reduced over `heads`; `rollout=True` adds attention-rollout maps instead.
    With cross conditioning, layer i is the decoder's i-th gated cross-attention layer."""
    if rollout and getattr(captioner, "cross", False):
        raise ConfigError("attention rollout follows self-attention paths to a visual prefix: it needs "
                          "conditioning='prefix' (this captioner uses cross-attention; capture its layers instead)")
    mods = captioner_attention_modules(captioner)
    idx = resolve_layers(layer, len(mods))
    per = capture_captioner_layers(captioner, images, idx, heads, "tokens", max_new_tokens, repetition_penalty,
                                   batch_size, progress, min_new_tokens)
    results = []
    for n in range(len(per[idx[0]])):
        first = per[idx[0]][n]
        hm = np.mean([per[j][n].head_maps for j in idx], axis=0)
        label: int | list[int] = idx[0] if isinstance(layer, (int, np.integer)) else idx
        results.append(replace(first, head_maps=hm, layer=label)._with_unit(unit))
    if rollout:
        from captionlab.attention.capture.rollout import rollout_captioner

        results = [rollout_captioner(captioner, r, unit) for r in results]
    return results
