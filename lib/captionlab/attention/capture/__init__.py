"""Capture word-by-word attention over image patches while a captioner generates (greedy, KV cache).

Modules by responsibility:
- `result`: `AttentionResult` (maps per word / token, head and unit views) and `merge_words`.
- `common`: image inputs, layer specs, the per-step recorder, result assembly.
- `gpt`: the PEFT captioner backend (our GPT decoder's per-layer `capture` hook).
- `hf`: LLaVA / any HF model, through a capture function registered with transformers' `AttentionInterface`.
- `rollout`: attention rollout (Abnar & Zuidema 2020) for both backends.

The map of generated token t is the attention row of the query that *predicts* t (prefill: the last prompt
position; then the single query of each cached step), restricted to the image patch keys (CLS excluded) and
laid out on the patch grid. Values are raw attention weights (the share of the row's mass on each patch).
"""

from __future__ import annotations

from typing import Any, Sequence

from captionlab.attention.capture.common import LayerSpec
from captionlab.attention.capture.gpt import (capture_captioner, capture_captioner_layers, captioner_attention_modules,
                                              gpt_attention_modules, gpt_capture)
from captionlab.attention.capture.hf import (capture_llava, capture_llava_layers, hf_capture, llava_attention_modules,
                                             llava_decoder_layers)
from captionlab.attention.capture.result import AttentionResult, merge_words
from captionlab.attention.capture.rollout import rollout

__all__ = ["AttentionResult", "LayerSpec", "capture", "capture_layers", "capture_captioner",
           "capture_captioner_layers", "capture_llava", "capture_llava_layers", "captioner_attention_modules",
           "gpt_attention_modules", "gpt_capture", "hf_capture", "is_llava", "llava_attention_modules",
           "llava_decoder_layers", "merge_words", "num_heads", "num_layers", "rollout"]


def is_llava(model: Any) -> bool:
    """True for a LlavaCaptioner-like object (has .processor, .model and image_token_id)."""
    return hasattr(model, "processor") and hasattr(model, "image_token_id") and hasattr(model, "model")


def _prompt(prompt: str | None) -> str:
    if prompt is not None:
        return prompt
    from captionlab.models.llava import DEFAULT_PROMPT

    return DEFAULT_PROMPT


def capture(model: Any, images: Sequence[Any], prompt: str | None = None, **kw: Any) -> list[AttentionResult]:
    """`capture_llava` for a LlavaCaptioner (needs `prompt`), `capture_captioner` otherwise."""
    if is_llava(model):
        return capture_llava(model, images, _prompt(prompt), **kw)
    return capture_captioner(model, images, **kw)


def capture_layers(model: Any, images: Sequence[Any], layers: LayerSpec = "all", prompt: str | None = None,
                   **kw: Any) -> dict[int, list[AttentionResult]]:
    """`capture_llava_layers` / `capture_captioner_layers` by model kind: {layer: [results]} in one pass."""
    if is_llava(model):
        return capture_llava_layers(model, images, _prompt(prompt), layers, **kw)
    return capture_captioner_layers(model, images, layers, **kw)


def num_layers(model: Any) -> int:
    """Number of decoder layers that can be captured."""
    if is_llava(model):
        return len(llava_decoder_layers(model.model))
    return len(captioner_attention_modules(model))


def num_heads(model: Any) -> int:
    """Attention heads per captured layer."""
    if is_llava(model):
        return int(model.model.config.text_config.num_attention_heads)
    return int(captioner_attention_modules(model)[0].n_head)
