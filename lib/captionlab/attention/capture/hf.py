"""Capture backend of HF models (LLaVA and any transformers model) through transformers' `AttentionInterface`.

`hf_capture(modules, hooks)` switches the captured modules' config to the registered attention function
"captionlab_capture" for the block (restored afterwards, also on errors) and arms `hooks` for the wanted
attention modules. That function materialises the attention probabilities only for armed modules, passes them
to the hook and computes the layer output from them; every other module (and any call outside a capture block)
goes to transformers' sdpa. The matching mask function (registered with `AttentionMaskInterface`) is sdpa's, so
the model builds the masks sdpa expects. Keys already hold the cache, so query/key lengths come from the
tensors; nothing reads cache internals or model-specific keyword names.

The hook gets (B, H, q, kv) probabilities, not detached: with `use_cache=False` a plain forward inside
`hf_capture` gives every armed layer's full teacher-forced matrix (rollout, gradient relevancy).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from captionlab.attention.capture.common import LayerSpec, Recorder, as_images, build_results, resolve_layers, strip_eos
from captionlab.attention.capture.result import AttentionResult
from captionlab.attention.grids import Heads, image_token_span, infer_grid
from captionlab.errors import ConfigError

ATTN_NAME = "captionlab_capture"
Hook = Callable[[Tensor], None]
_ACTIVE: ContextVar[dict[int, Hook] | None] = ContextVar("captionlab_capture_hooks", default=None)


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * groups, T, D) for grouped-query attention."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_probs(query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float | None) -> Tensor:
    """Softmax attention probabilities (B, H, q, kv) in float32 from an sdpa-style mask: None (causal, the queries
    being the last q keys), boolean (True = attend) or additive float."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    low = torch.finfo(scores.dtype).min
    if attention_mask is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=scores.device)[:, None]
        allowed = torch.arange(kv_len, device=scores.device)[None, :] <= q_pos
        scores = scores.masked_fill(~allowed, low)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :kv_len], low)
    else:
        scores = scores + attention_mask[..., :kv_len].float()
    return scores.softmax(-1)


def capture_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                              **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """The registered attention function: explicit probabilities for armed modules, sdpa for all others."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    hooks = _ACTIVE.get()
    hook = hooks.get(id(module)) if hooks else None
    if hook is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    probs = attention_probs(query, key, attention_mask, scaling).to(query.dtype)
    hook(probs)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, q, H, D) as every HF attention returns
    return out, probs


def register() -> str:
    """Register the capture attention function and its (sdpa) mask function with transformers; returns the name."""
    from transformers import AttentionInterface

    if ATTN_NAME not in AttentionInterface._global_mapping:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_NAME, capture_attention_forward)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


@contextmanager
def hf_capture(modules: Sequence[torch.nn.Module], hooks: dict[int, Hook]) -> Iterator[None]:
    """Within the block, `modules[i]` (HF attention modules) call `hooks[i](probs)` on every forward."""
    name = register()
    configs = {id(modules[i].config): modules[i].config for i in hooks}
    armed = {id(modules[i]): fn for i, fn in hooks.items()}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    token = _ACTIVE.set({**(_ACTIVE.get() or {}), **armed})
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]
        _ACTIVE.reset(token)


def llava_decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The language model's decoder layers of an HF LLaVA (transformers 5 and 4 layouts)."""
    for path in ("model.language_model.layers", "language_model.model.layers", "model.language_model.model.layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ConfigError(f"{type(model).__name__}: cannot find the language model's decoder layers")


def llava_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's self-attention modules in layer order."""
    return [layer.self_attn for layer in llava_decoder_layers(model)]


@torch.no_grad()
def capture_llava_layers(llava: Any, images: Sequence[Any], prompt: str | Sequence[str], layers: LayerSpec = "all",
                         heads: Heads = "mean", unit: str = "words", max_new_tokens: int = 40,
                         batch_size: int = 4, system: str | None = None, progress: bool = True,
                         generation: dict | None = None) -> dict[int, list[AttentionResult]]:
    """One greedy generation pass of LLaVA capturing each of `layers` separately: {layer: [results]}.

    `generation`: extra GenerationConfig options (e.g. repetition_penalty); decoding is always greedy."""
    pil, names = as_images(images)
    prompts = [prompt] * len(pil) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(pil):
        raise ConfigError(f"got {len(pil)} images but {len(prompts)} prompts")
    model = llava.model
    mods = llava_attention_modules(model)
    idx = resolve_layers(layers, len(mods))
    vcfg = model.config.vision_config
    expected_grid = (vcfg.image_size // vcfg.patch_size,) * 2
    gen = llava.generation_config({"max_new_tokens": max_new_tokens, **(generation or {}), "do_sample": False,
                                   "num_beams": 1})
    tok = llava.processor.tokenizer
    out: dict[int, list[AttentionResult]] = {i: [] for i in idx}
    for i in tqdm(range(0, len(pil), batch_size), desc="attention", unit="batch", disable=not progress):
        chunk = pil[i:i + batch_size]
        inputs = llava.prepare_inputs(chunk, prompts[i:i + batch_size], system)
        spans = [image_token_span(row, llava.image_token_id) for row in inputs["input_ids"].cpu()]
        n_img = {e - s for s, e in spans}
        if len(n_img) != 1:
            raise ConfigError(f"rows have different numbers of image tokens: {sorted(n_img)}")
        grid = infer_grid(n_img.pop(), expected_grid)
        starts = torch.tensor([s for s, _ in spans])  # positions in the padded row = key positions in the cache
        recs = {j: Recorder(starts, grid[0] * grid[1]) for j in idx}
        with hf_capture(mods, dict(recs)):
            seqs = model.generate(**inputs, generation_config=gen)
        new = seqs[:, inputs["input_ids"].shape[1]:].tolist()
        ids = strip_eos(new, gen.eos_token_id, gen.pad_token_id)
        for j in idx:
            out[j] += build_results({j: recs[j]}, ids, tok, pil, names, grid, j, heads, unit, offset=i)
    return out


def capture_llava(llava: Any, images: Sequence[Any], prompt: str | Sequence[str], layer: LayerSpec = -1,
                  heads: Heads = "mean", unit: str = "words", max_new_tokens: int = 40, batch_size: int = 4,
                  system: str | None = None, rollout: bool = False, progress: bool = True,
                  generation: dict | None = None) -> list[AttentionResult]:
    """Greedy LLaVA replies with per-word attention maps over the `<image>` patch tokens at `layer` (index, list
    to average, or "all"); `rollout=True` gives attention-rollout maps over all language-model layers instead."""
    idx = resolve_layers(layer, len(llava_decoder_layers(llava.model)))
    per = capture_llava_layers(llava, images, prompt, idx, heads, "tokens", max_new_tokens, batch_size, system,
                               progress, generation)
    results = []
    for n in range(len(per[idx[0]])):
        hm = np.mean([per[j][n].head_maps for j in idx], axis=0)
        label: int | list[int] = idx[0] if isinstance(layer, (int, np.integer)) else idx
        results.append(replace(per[idx[0]][n], head_maps=hm, layer=label)._with_unit(unit))
    if rollout:
        from captionlab.attention.capture.rollout import rollout_llava

        prompts = [prompt] * len(results) if isinstance(prompt, str) else list(prompt)
        results = [rollout_llava(llava, r, p, system, unit) for r, p in zip(results, prompts)]
    return results
