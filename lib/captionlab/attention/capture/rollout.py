"""Attention rollout (Abnar & Zuidema 2020) for both backends: one extra full forward per image with every layer
materialising (L x H x T^2 floats), then the product of head-averaged, residual-mixed matrices 0.5 A + 0.5 I."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from captionlab.attention.capture.gpt import captioner_lm_decoder, gpt_attention_modules, gpt_capture
from captionlab.attention.capture.result import AttentionResult, _merge
from captionlab.attention.grids import image_token_span


@torch.no_grad()
def rollout_captioner(captioner: Any, res: AttentionResult, unit: str) -> AttentionResult:
    """Attention rollout over all decoder layers for one captured caption (one extra full forward)."""
    mods = gpt_attention_modules(captioner.decoder)
    prefix = captioner_lm_decoder(captioner, [res.image]).prefix_embeds  # visual tokens + bos
    ids = torch.tensor([res.token_ids], dtype=torch.long, device=captioner.device)
    embeds = torch.cat([prefix, captioner.decoder.embed_tokens(ids).to(prefix.dtype)], dim=1)
    P = captioner.decoder.config.prefix_len
    mats: dict[int, Tensor] = {}

    def keep(j: int) -> Callable[[Tensor], None]:
        def fn(att: Tensor) -> None:
            a = att[0, :, :, P:].float().mean(0)  # drop learned prefix keys (they have no query rows)
            mats[j] = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        return fn

    with gpt_capture(captioner.decoder, {j: keep(j) for j in range(len(mods))}):
        captioner.decoder(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                          device=embeds.device))
    roll = rollout([mats[j] for j in range(len(mods))])
    start, end = captioner.image_key_span()
    rows = prefix.shape[1] - 1 + torch.arange(len(res.token_ids))
    tmaps = roll[rows, start - P:end - P].reshape(len(rows), *res.grid).cpu().numpy()
    return rollout_result(res, tmaps, unit)


def rollout(mats: list[Tensor]) -> Tensor:
    """Product of row-normalised 0.5 A + 0.5 I over layers (first layer applied first)."""
    T = mats[0].shape[-1]
    eye = torch.eye(T, device=mats[0].device)
    roll = eye
    for a in mats:
        a = 0.5 * a + 0.5 * eye
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    return roll


def rollout_result(res: AttentionResult, token_maps: np.ndarray, unit: str) -> AttentionResult:
    base = replace(res, head_maps=None, layer="rollout", heads="mean", maps=token_maps.astype(np.float32),
                   tokens=list(res.token_strs), unit="tokens")
    if unit == "tokens":
        return base
    words = ["".join(res.token_strs[i] for i in g).strip() for g in res.word_groups]
    return replace(base, tokens=words, maps=_merge(base.maps, res.word_groups), unit="words")


@torch.no_grad()
def rollout_llava(llava: Any, res: AttentionResult, prompt: str, system: str | None, unit: str) -> AttentionResult:
    """Attention rollout over all language-model layers for one captured reply (one teacher-forced forward)."""
    from captionlab.attention.capture.hf import hf_capture, llava_attention_modules

    mods = llava_attention_modules(llava.model)
    inputs = llava.prepare_inputs([res.image], prompt, system)
    L = inputs["input_ids"].shape[1]
    gen = torch.tensor([res.token_ids], dtype=torch.long, device=inputs["input_ids"].device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], gen], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(gen)], dim=1)
    mats: dict[int, Tensor] = {}

    def keep(j: int) -> Callable[[Tensor], None]:
        return lambda att: mats.__setitem__(j, att[0].float().mean(0))

    with hf_capture(mods, {j: keep(j) for j in range(len(mods))}):
        llava.model(**inputs, use_cache=False)
    roll = rollout([mats[j] for j in range(len(mods))])
    s, e = image_token_span(inputs["input_ids"][0].cpu(), llava.image_token_id)
    rows = L - 1 + torch.arange(len(res.token_ids))
    tmaps = roll[rows, s:e].reshape(len(rows), *res.grid).cpu().numpy()
    return rollout_result(res, tmaps, unit)
