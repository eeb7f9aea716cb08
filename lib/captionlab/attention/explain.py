"""Explain a given caption: teacher-forced maps over image patches, per word, by one of several methods.

    exp = explain(model, image, "a red star and a purple circle", method="relevancy", layer=-1)
    attention_series(exp)                      # same figures as generation-time captures

One forward over prompt + caption (any caption: the scored one, a reference, an edited one) materialises every
layer's attention with its autograd graph; the caption token t is explained at the query row that predicts it.
Methods:
- `raw`: attention probabilities at `layer` (index, list to average, "all"), heads "mean" / "max" / an index;
  equal to the generation-time capture of `captionlab.attention.capture` for a caption the model generated.
- `rollout` (Abnar & Zuidema 2020): product of row-normalised 0.5 A + 0.5 I, heads averaged, layers 0..`layer`.
- `grad`: one layer's gradient-weighted attention E_h[(dy_t/dA * A)^+] (y_t = the logit of token t).
- `relevancy` (Chefer et al. 2021, self-attention rule): R = I; for layers 0..`layer`: R += E_h[(dy_t/dA * A)^+] R.
Rollout and relevancy run over self-attention between the sequence tokens (learned prefix-tuning keys, which
have no query rows, are dropped). With cross-attention conditioning `raw`, `grad` and `relevancy` apply, the
latter by Chefer et al.'s encoder-decoder rules: text self-relevancy R_tt = I and text-image relevancy R_ti = 0;
a cross-attention layer adds R_tt'^T Abar_ti (R_tt' = R_tt with its residual part row-normalised), the decoder's
self-attention then propagates both (R_tt += Abar_tt R_tt, R_ti += Abar_tt R_ti); the map at cross layer j is
R_ti after the decoder blocks up to the next cross layer (the last one: after the whole decoder).

Backends: the PEFT captioner (our GPT's per-layer `capture` hook) and HF LLaVA (the capture package's
`hf_capture`: every language-model layer computes its probabilities explicitly, with gradients, through the
registered attention function; the vision tower keeps sdpa).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from captionlab.attention.capture import (AttentionResult, gpt_attention_modules, gpt_capture, is_llava,
                                          hf_capture, llava_attention_modules, merge_words)
from captionlab.attention.grids import Heads, center_crop_square, image_token_span, infer_grid
from captionlab.errors import ConfigError

METHODS = ("raw", "rollout", "grad", "relevancy")
EMPTY_CAPTION = "an image"  # = captionlab.models.captioner.EMPTY_CAPTION (what an immediate eos is captioned as)


@dataclass
class Explanation(AttentionResult):
    """An AttentionResult that also names the method that made its maps."""

    method: str = "raw"


@dataclass
class Trace:
    """One teacher-forced forward of one image + caption: every layer's attention and the caption logits."""

    atts: list[Tensor]  # per layer (1, H, T_query, T_keys): the tensors of the forward graph (when traced)
    logits: Tensor  # (T_query, vocab)
    rows: Tensor  # (n,) query row predicting caption token i
    token_ids: list[int]
    span: tuple[int, int]  # image patch keys on the key axis
    key_offset: int  # leading key columns without query rows (prefix tuning), dropped for rollout/relevancy
    grid: tuple[int, int]
    image: Image.Image
    self_attention: bool  # False for cross-attention layers (no rollout; relevancy by the encoder-decoder rules)
    text_atts: list[Tensor] | None = None  # cross conditioning: the decoder's self-attention per block (1, H, T, T)
    order: list[tuple[str, int]] | None = None  # cross: forward order of ("cross", j) / ("self", block) layers


# ------------------------------------------------------------------------------------------- backends


def _pil(image: Any) -> Image.Image:
    from captionlab.data.images import load_image

    return image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)


def caption_ids(model: Any, caption: str | Sequence[int]) -> list[int]:
    """The caption's token ids (a string is tokenised without special tokens; ids pass through)."""
    if not isinstance(caption, str):
        return [int(t) for t in caption]
    tok = model.processor.tokenizer if is_llava(model) else model.tokenizer
    ids = tok(caption, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"caption {caption!r} has no tokens")
    return list(ids)


def _captioner_forward(cap: Any, images: list[Image.Image], ids: list[int], keep: bool,
                       text: dict[int, Tensor] | None = None) -> tuple[Tensor, list[Tensor], Tensor]:
    """(logits (B, T, V), per-layer attention (B, H, T, K) if keep, rows) of captioner prompt + caption; with
    cross conditioning, `text` (if given) also receives the decoder's self-attention per block."""
    vis = cap.visual_embeds(pixel_values=cap.encoder.preprocess(images))
    B = vis.shape[0]
    tok_ids = torch.tensor([[cap.tokenizer.bos_token_id] + ids] * B, dtype=torch.long, device=cap.device)
    tokens = cap.decoder.embed_tokens(tok_ids).to(vis.dtype)
    mods = gpt_attention_modules(cap.decoder, cap.cross)
    atts: dict[int, Tensor] = {}
    hooks = {j: (lambda a, j=j: atts.__setitem__(j, a)) for j in range(len(mods))} if keep else {}
    text_hooks: dict[int, Any] = {}
    if cap.cross and keep and text is not None:
        n_self = len(gpt_attention_modules(cap.decoder, False))
        text_hooks = {b: (lambda a, b=b: text.__setitem__(b, a)) for b in range(n_self)}
    with gpt_capture(cap.decoder, hooks, cap.cross), gpt_capture(cap.decoder, text_hooks, False):
        if cap.cross:
            embeds = tokens
            if keep:
                embeds = embeds.detach().requires_grad_(True)
            out = cap.decoder(inputs_embeds=embeds, cross_states=vis)
            rows = torch.arange(len(ids))
        else:
            embeds = torch.cat([vis, tokens], dim=1)
            if keep:
                embeds = embeds.detach().requires_grad_(True)
            out = cap.decoder(inputs_embeds=embeds)
            rows = vis.shape[1] + torch.arange(len(ids))
    return out.logits, [atts[j] for j in sorted(atts)], rows


def _llava_forward(llava: Any, images: list[Image.Image], ids: list[int], prompt: str, system: str | None,
                   keep: bool) -> tuple[Tensor, list[Tensor], Tensor, tuple[int, int], tuple[int, int]]:
    """(logits, per-layer attention if keep, rows, image span, grid) of LLaVA prompt + caption."""
    inputs = llava.prepare_inputs(images, prompt, system)
    L = inputs["input_ids"].shape[1]
    gen = torch.tensor([ids] * len(images), dtype=torch.long, device=inputs["input_ids"].device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], gen], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(gen)], dim=1)
    span = image_token_span(inputs["input_ids"][0].cpu(), llava.image_token_id)
    vcfg = llava.model.config.vision_config
    grid = infer_grid(span[1] - span[0], (vcfg.image_size // vcfg.patch_size,) * 2)
    if keep:
        modules = llava_attention_modules(llava.model)
        kept: dict[int, Tensor] = {}
        with hf_capture(modules, {i: (lambda p, i=i: kept.__setitem__(i, p)) for i in range(len(modules))}):
            out = llava.model(**inputs, use_cache=False)
        if sorted(kept) != list(range(len(modules))):
            raise RuntimeError(f"LLaVA: attention captured for layers {sorted(kept)} of {len(modules)}")
        atts = [kept[i] for i in range(len(modules))]
    else:
        out = llava.model(**inputs, use_cache=False)
        atts = []
    return out.logits, atts, L - 1 + torch.arange(len(ids)), span, grid


def trace(model: Any, image: Any, caption: str | Sequence[int], prompt: str | None = None,
          system: str | None = None) -> Trace:
    """Teacher-forced forward of one image + caption keeping every layer's attention and its graph."""
    pil = center_crop_square(_pil(image))
    ids = caption_ids(model, caption)
    with torch.enable_grad(), _eval(model):
        return _trace(model, pil, ids, prompt, system)


@contextmanager
def _eval(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) for the block, the previous mode restored after."""
    net = model.model if is_llava(model) else model
    was = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was)


def _trace(model: Any, pil: Image.Image, ids: list[int], prompt: str | None, system: str | None) -> Trace:
    if is_llava(model):
        from captionlab.models.llava import DEFAULT_PROMPT

        logits, atts, rows, span, grid = _llava_forward(model, [pil], ids, prompt or DEFAULT_PROMPT, system, True)
        return Trace(atts, logits[0], rows, ids, span, 0, grid, pil, True)
    grid = tuple(int(g) for g in model.image_grid())
    span = tuple(model.image_key_span())
    offset = 0 if model.cross else int(model.decoder.config.prefix_len)
    text: dict[int, Tensor] = {}
    logits, atts, rows = _captioner_forward(model, [pil], ids, True, text if model.cross else None)
    tr = Trace(atts, logits[0], rows, ids, span, offset, grid, pil, not model.cross)  # type: ignore[arg-type]
    if model.cross:
        tr.text_atts, tr.order = [text[b] for b in sorted(text)], _cross_order(model.decoder)
    return tr


def _cross_order(decoder: Any) -> list[tuple[str, int]]:
    """The forward order of a cross-conditioned decoder's attention layers: ("cross", j) and ("self", block)."""
    from captionlab.models.decoder import CausalSelfAttention, GatedCrossAttention

    order: list[tuple[str, int]] = []
    counts = {"cross": 0, "self": 0}
    for m in decoder.modules():  # a block registers its cross-attention before its self-attention
        kind = "cross" if isinstance(m, GatedCrossAttention) else "self" if isinstance(m, CausalSelfAttention) else ""
        if kind:
            order.append((kind, counts[kind]))
            counts[kind] += 1
    return order


@torch.no_grad()
def caption_logprobs(model: Any, images: Sequence[Any], caption: str | Sequence[int], prompt: str | None = None,
                     system: str | None = None, batch_size: int = 32) -> np.ndarray:
    """(n_images, n_tokens) log-probabilities of the caption's tokens given each image (teacher forcing)."""
    ids = caption_ids(model, caption)
    pil = [center_crop_square(_pil(im)) for im in images]
    out = []
    with _eval(model):
        for i in range(0, len(pil), batch_size):
            out.append(_logprobs(model, pil[i:i + batch_size], ids, prompt, system))
    return np.concatenate(out)


def _logprobs(model: Any, chunk: list[Image.Image], ids: list[int], prompt: str | None,
              system: str | None) -> np.ndarray:
    if is_llava(model):
        from captionlab.models.llava import DEFAULT_PROMPT

        logits, _, rows, _, _ = _llava_forward(model, chunk, ids, prompt or DEFAULT_PROMPT, system, False)
    else:
        logits, _, rows = _captioner_forward(model, chunk, ids, False)
    lp = logits[:, rows.to(logits.device)].float().log_softmax(-1)
    target = torch.tensor(ids, device=lp.device)[None, :, None].expand(len(chunk), -1, -1)
    return lp.gather(-1, target)[..., 0].cpu().numpy()


# -------------------------------------------------------------------------------------------- methods


def _layer_list(layer: Any, n: int) -> list[int]:
    if layer == "all":
        return list(range(n))
    items = [layer] if isinstance(layer, (int, np.integer)) else list(layer)
    if not items or any(not -n <= int(i) < n for i in items):
        raise ConfigError(f"layer {layer!r} out of range: the model has {n} layers")
    return [int(i) % n for i in items]


def _square(tr: Trace, a: Tensor) -> Tensor:
    """(H, T, T) self-attention between sequence tokens: prefix-tuning keys dropped."""
    return a[:, :, tr.key_offset:]


def raw_maps(tr: Trace, layers: Sequence[int]) -> np.ndarray:
    """(n, H, gh, gw) attention on the image patches of the caption rows, averaged over `layers`."""
    s, e = tr.span
    rows = tr.rows.to(tr.atts[0].device)
    per = [tr.atts[j].detach()[0][:, rows, s:e].float() for j in layers]
    hm = torch.stack(per).mean(0).permute(1, 0, 2)  # (n, H, n_img)
    return hm.reshape(len(tr.token_ids), hm.shape[1], *tr.grid).cpu().numpy()


def rollout_maps(tr: Trace) -> np.ndarray:
    """(L, n, gh, gw): attention rollout through layers 0..l for every l."""
    if not tr.self_attention:
        raise ConfigError("rollout follows self-attention paths to a visual prefix: it needs conditioning='prefix'")
    T = tr.atts[0].shape[-2]
    eye = torch.eye(T)
    roll = eye
    out = []
    for a in tr.atts:
        m = _square(tr, a.detach()[0].float()).mean(0).cpu()
        m = m / m.sum(-1, keepdim=True).clamp_min(1e-12)
        m = 0.5 * m + 0.5 * eye
        roll = (m / m.sum(-1, keepdim=True)) @ roll
        out.append(_image_rows(tr, roll))
    return np.stack(out)


def _image_rows(tr: Trace, r: Tensor) -> np.ndarray:
    """R[caption rows, image tokens] as (n, gh, gw); image tokens on the square (query) axis."""
    s, e = (tr.span[0] - tr.key_offset, tr.span[1] - tr.key_offset)
    return r[tr.rows][:, s:e].reshape(len(tr.token_ids), *tr.grid).numpy()


def _cam(a: Tensor, g: Tensor | None) -> Tensor:
    """E_h[(dy/dA * A)^+] of one layer's (1, H, T, K) attention: (T, K) on the CPU."""
    g = torch.zeros_like(a) if g is None else g
    return (g.detach()[0].float() * a.detach()[0].float()).clamp_min(0).mean(0).cpu()


def _residual_normalised(R: Tensor) -> Tensor:
    """Chefer et al.'s normalisation of a self-relevancy matrix: the part beyond I row-normalised, then + I."""
    eye = torch.eye(R.shape[-1])
    extra = R - eye
    return extra / extra.sum(-1, keepdim=True).clamp_min(1e-12) + eye


def _cross_relevancy(tr: Trace, cross_cams: list[Tensor], self_cams: list[Tensor]) -> list[Tensor]:
    """Text-image relevancy R_ti (T, n_visual) at each cross layer (encoder-decoder rules, module docstring)."""
    T, V = cross_cams[0].shape
    R_tt, R_ti = torch.eye(T), torch.zeros(T, V)
    out: list[Tensor] = []
    for kind, j in tr.order or []:
        if kind == "cross":
            if j > 0:
                out.append(R_ti.clone())
            R_ti = R_ti + _residual_normalised(R_tt).T @ cross_cams[j]
        else:
            cam = self_cams[j]
            R_ti, R_tt = R_ti + cam @ R_ti, R_tt + cam @ R_tt
    out.append(R_ti)
    return out


def gradient_maps(tr: Trace) -> tuple[np.ndarray, np.ndarray | None]:
    """(L, n, gh, gw) per-layer gradient-weighted attention and (L, n, gh, gw) relevancy propagated through layers
    0..l (Chefer et al. 2021; cross conditioning: its encoder-decoder rules, None without the decoder's
    self-attention); one backward pass per caption token."""
    L, n = len(tr.atts), len(tr.token_ids)
    s, e = tr.span
    grad_out = np.zeros((L, n, *tr.grid), np.float32)
    cross_rel = not tr.self_attention and bool(tr.text_atts)
    rel_out = np.zeros((L, n, *tr.grid), np.float32) if tr.self_attention or cross_rel else None
    for t in range(n):
        y = tr.logits[int(tr.rows[t]), tr.token_ids[t]]
        if cross_rel:
            both = torch.autograd.grad(y, [*tr.atts, *tr.text_atts], retain_graph=True, allow_unused=True)
            cross_cams = [_cam(a, g) for a, g in zip(tr.atts, both[:L])]
            self_cams = [_cam(a, g) for a, g in zip(tr.text_atts, both[L:])]
            for j, (cam, R) in enumerate(zip(cross_cams, _cross_relevancy(tr, cross_cams, self_cams))):
                grad_out[j, t] = cam[int(tr.rows[t]), s:e].reshape(tr.grid).numpy()
                rel_out[j, t] = R[int(tr.rows[t]), s:e].reshape(tr.grid).numpy()  # type: ignore[index]
            continue
        grads = torch.autograd.grad(y, tr.atts, retain_graph=True, allow_unused=True)
        T = tr.atts[0].shape[-2]
        R = torch.eye(T)
        for j, (a, g) in enumerate(zip(tr.atts, grads)):
            cam = _cam(a, g)  # (T, K)
            grad_out[j, t] = cam[int(tr.rows[t]), s:e].reshape(tr.grid).numpy()
            if rel_out is not None:
                R = R + cam[:, tr.key_offset:] @ R
                rel_out[j, t] = _image_rows(tr, R)[t]
    return grad_out, rel_out


def explain_all(model: Any, image: Any, caption: str | Sequence[int], methods: Sequence[str] = METHODS,
                layers: Any = "all", heads: Heads = "mean", unit: str = "words", prompt: str | None = None,
                system: str | None = None, name: str | None = None) -> dict[tuple[str, int], Explanation]:
    """{(method, layer): Explanation} for one image + caption from a single traced forward."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method(s) {bad}: choose from {METHODS}")
    tr = trace(model, image, caption, prompt, system)
    idx = _layer_list(layers, len(tr.atts))
    if not tr.self_attention:
        methods = [m for m in methods if m in ("raw", "grad", "relevancy")]
    out: dict[tuple[str, int], Explanation] = {}
    base = _base(model, tr, heads, name or _name(image))
    if "raw" in methods:
        for j in idx:
            out["raw", j] = _finish(replace(base, head_maps=raw_maps(tr, [j]), layer=j), unit)
    if "rollout" in methods:
        roll = rollout_maps(tr)
        for j in idx:
            out["rollout", j] = _finish(_token_level(base, roll[j], j, "rollout"), unit)
    if "grad" in methods or "relevancy" in methods:
        g, rel = gradient_maps(tr)
        for j in idx:
            if "grad" in methods:
                out["grad", j] = _finish(_token_level(base, g[j], j, "grad"), unit)
            if "relevancy" in methods and rel is not None:
                out["relevancy", j] = _finish(_token_level(base, rel[j], j, "relevancy"), unit)
    return out


def explain(model: Any, image: Any, caption: str | Sequence[int], method: str = "raw", layer: Any = -1,
            heads: Heads = "mean", unit: str = "words", prompt: str | None = None, system: str | None = None,
            name: str | None = None) -> Explanation:
    """Maps of `caption` on `image` by `method` at `layer` (raw: index, list to average or "all"; rollout / grad /
    relevancy: one index, rollout and relevancy propagated through layers 0..layer)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: choose from {METHODS}")
    if method == "raw" and not isinstance(layer, (int, np.integer)):
        tr = trace(model, image, caption, prompt, system)
        idx = _layer_list(layer, len(tr.atts))
        base = _base(model, tr, heads, name or _name(image))
        return _finish(replace(base, head_maps=raw_maps(tr, idx), layer=idx), unit)
    if not isinstance(layer, (int, np.integer)):
        raise ConfigError(f"method {method!r} takes one layer index (maps propagated up to it), got {layer!r}")
    res = explain_all(model, image, caption, [method], [int(layer)], heads, unit, prompt, system, name)
    if not res:
        raise ConfigError(f"method {method!r} needs self-attention to the image (prefix conditioning or LLaVA)")
    return next(iter(res.values()))


def _name(image: Any) -> str | None:
    from pathlib import Path

    if isinstance(image, Image.Image):
        fname = getattr(image, "filename", "") or ""
        return Path(fname).stem if fname else None
    return Path(image).stem


def _base(model: Any, tr: Trace, heads: Heads, name: str | None) -> Explanation:
    tok = model.processor.tokenizer if is_llava(model) else model.tokenizer
    pieces, groups = merge_words(tr.token_ids, tok)
    gh, gw = tr.grid
    return Explanation(tokens=list(pieces), maps=np.zeros((len(pieces), gh, gw), np.float32), grid=tr.grid,
                       image=tr.image, caption=tok.decode(tr.token_ids, skip_special_tokens=True).strip(),
                       layer=0, heads=heads, name=name, token_ids=list(tr.token_ids), token_strs=pieces,
                       head_maps=None, word_groups=groups, unit="tokens", method="raw")


def _token_level(base: Explanation, maps: np.ndarray, layer: int, method: str) -> Explanation:
    return replace(base, maps=maps.astype(np.float32), head_maps=None, layer=layer, heads="mean", method=method)


def _finish(res: Explanation, unit: str) -> Explanation:
    if unit not in ("words", "tokens"):
        raise ConfigError(f"unit must be 'words' or 'tokens', got {unit!r}")
    return res.as_words() if unit == "words" else res.as_tokens()  # type: ignore[return-value]


@torch.no_grad()
def generate_ids(model: Any, images: Sequence[Any], prompt: str | None = None, max_new_tokens: int | None = None,
                 batch_size: int = 16, system: str | None = None) -> list[list[int]]:
    """Greedy caption token ids (eos / padding stripped) of the captioner or LLaVA for each image; an immediate eos
    (an untrained model) gives the ids of the placeholder caption `generate` writes ("an image"), so every image
    has words to map."""
    pil = [center_crop_square(_pil(im)) for im in images]
    out: list[list[int]] = []
    with _eval(model):
        for i in range(0, len(pil), batch_size):
            chunk = pil[i:i + batch_size]
            if is_llava(model):
                from captionlab.models.llava import DEFAULT_PROMPT

                gen = model.generation_config({"max_new_tokens": max_new_tokens or 40})
                inputs = model.prepare_inputs(chunk, prompt or DEFAULT_PROMPT, system)
                seqs = model.model.generate(**inputs, generation_config=gen)[:, inputs["input_ids"].shape[1]:]
                stops = {gen.pad_token_id, *([gen.eos_token_id] if isinstance(gen.eos_token_id, int)
                                              else (gen.eos_token_id or []))}
            else:
                from captionlab.decode import greedy_search

                vis = model.visual_embeds(pixel_values=model.encoder.preprocess(chunk))
                seqs = greedy_search(model.lm_decoder(vis), max_new_tokens=max_new_tokens or
                                     model.config.max_caption_tokens + 1, eos_token_id=model.tokenizer.eos_token_id)
                stops = {model.tokenizer.eos_token_id}
            for s in (seqs.tolist() if isinstance(seqs, Tensor) else seqs):
                s = [int(t) for t in s]
                out.append(s[:next((k for k, t in enumerate(s) if t in stops), len(s))] or
                           caption_ids(model, EMPTY_CAPTION))
    return out


def attention_shares(model: Any, image: Any, caption: str | Sequence[int], prompt: str | None = None) -> list[dict[str, Any]]:
    """Per layer, where the caption rows' raw attention goes (heads and rows averaged): the visual prefix tokens
    before the patches (CLS), the image patches, everything else (text, prefix-tuning keys). Evidence for a
    model that reads the image through CLS alone."""
    tr = trace(model, image, caption, prompt)
    n_cls = 0 if is_llava(model) else int(model.n_cls)
    s, e = tr.span
    rows = tr.rows.to(tr.atts[0].device)
    out = []
    for j, a in enumerate(tr.atts):
        att = a.detach()[0][:, rows].float().mean((0, 1))  # (K,)
        cls, patches = float(att[s - n_cls:s].sum()), float(att[s:e].sum())
        out.append({"layer": j, "cls": cls, "patches": patches, "other": float(att.sum()) - cls - patches})
    return out
