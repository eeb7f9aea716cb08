"""Capture word-by-word attention over image patches while a captioner generates (greedy, KV cache).

Only the captured layer(s) materialise attention; every other layer keeps its fused kernel:
- PEFT captioner (`captionlab.models.captioner.Captioner`): the GPT decoder's per-layer `capture` hook.
- LLaVA (`captionlab.models.llava.LlavaCaptioner`): the captured layer's `self_attn` gets its own config copy
  with `_attn_implementation="eager"` (the shared config is never touched) and a forward hook reads its
  attention weights; a pre-hook turns the sdpa-style mask (None or bool) the model built into eager's additive
  mask. Everything is restored afterwards, also on errors.

The map of generated token t is the attention row of the query that *predicts* t (prefill: the last prompt
position; then the single query of each cached step), restricted to the image patch keys (CLS excluded) and
laid out on the patch grid. Values are raw attention weights (the share of the row's mass on each patch).

Attention rollout (`rollout=True`, Abnar & Zuidema 2020) needs every layer's full attention matrix: it runs
one extra forward over prompt + caption per image with all layers materialising (L x H x T^2 floats, L times
the single-layer capture) and multiplies the head-averaged, residual-mixed matrices 0.5 A + 0.5 I.
"""

from __future__ import annotations

import copy
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from captionlab.attention.grids import Heads, center_crop_square, image_token_span, infer_grid, reduce_heads
from captionlab.errors import ConfigError

LayerSpec = int | Sequence[int] | str


@dataclass
class AttentionResult:
    """One image's caption and, per displayed unit (word or token), an attention map over the patch grid."""

    tokens: list[str]  # displayed units: words (default) or sub-word tokens
    maps: np.ndarray  # (n_units, gh, gw) raw attention on the image patches, heads/layers reduced
    grid: tuple[int, int]
    image: Image.Image | None  # the (centre-cropped) image the maps are laid over
    caption: str
    layer: int | list[int] | str  # layer index, list of averaged layers, or "rollout"
    heads: Heads
    name: str | None = None  # image name (file stem), used for file names
    token_ids: list[int] = field(default_factory=list)
    token_strs: list[str] = field(default_factory=list)  # sub-word tokens as decoded pieces
    head_maps: np.ndarray | None = None  # (n_tokens, n_heads, gh, gw) per token, layers averaged
    word_groups: list[list[int]] = field(default_factory=list)  # token indices of each word
    unit: str = "words"

    @property
    def token_maps(self) -> np.ndarray:
        """(n_tokens, gh, gw): per sub-word token, heads reduced as `heads`."""
        if self.head_maps is None:
            return self._rollout_token_maps()
        return reduce_heads(torch.from_numpy(self.head_maps), self.heads).numpy()

    def with_heads(self, heads: Heads) -> "AttentionResult":
        """The same capture with another head reduction ("mean", "max", index) — no recomputation."""
        if self.head_maps is None:
            raise ConfigError("this result keeps no per-head maps (rollout): recapture with other heads")
        return replace(self, heads=heads)._with_unit(self.unit)

    def as_tokens(self) -> "AttentionResult":
        """One map per sub-word token."""
        return self._with_unit("tokens")

    def as_words(self) -> "AttentionResult":
        """One map per word (sub-word token maps averaged)."""
        return self._with_unit("words")

    def _with_unit(self, unit: str) -> "AttentionResult":
        if unit not in ("words", "tokens"):
            raise ConfigError(f"unit must be 'words' or 'tokens', got {unit!r}")
        tmaps = self.token_maps if self.head_maps is not None else self._rollout_token_maps()
        if unit == "tokens":
            return replace(self, tokens=list(self.token_strs), maps=tmaps, unit="tokens")
        words = ["".join(self.token_strs[i] for i in g).strip() for g in self.word_groups]
        return replace(self, tokens=words, maps=_merge(tmaps, self.word_groups), unit="words")

    def _rollout_token_maps(self) -> np.ndarray:
        if self.unit == "tokens":
            return self.maps
        raise ConfigError("a word-level rollout result cannot be split into tokens: capture with unit='tokens'")


def _merge(token_maps: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    gh, gw = token_maps.shape[-2:]
    if not groups:
        return np.zeros((0, gh, gw), dtype=np.float32)
    return np.stack([token_maps[g].mean(axis=0) for g in groups]).astype(np.float32)


def merge_words(token_ids: Sequence[int], tokenizer: Any) -> tuple[list[str], list[list[int]]]:
    """Decoded piece of every token and the token groups forming words (a word starts after whitespace).

    Pieces come from incremental decoding (text of ids[:i+1] minus text of ids[:i]), so byte-level BPE and
    SentencePiece tokenizers both work; whitespace-only pieces and tokens that decode to nothing (special
    tokens) join the current word; punctuation glued to a word stays with it.
    """
    pieces: list[str] = []
    prev = ""
    for i in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[: i + 1]), skip_special_tokens=True)
        pieces.append(text[len(prev):] if text.startswith(prev) else text)
        prev = text
    groups: list[list[int]] = []
    text = ""
    for i, p in enumerate(pieces):
        starts_word = bool(p.strip()) and (not groups or p[:1].isspace() or text[-1:].isspace())
        if starts_word:
            groups.append([i])
        elif groups:
            groups[-1].append(i)
        else:
            groups.append([i])
        text += p
    groups = [g for g in groups if "".join(pieces[i] for i in g).strip()]
    return pieces, groups


# --------------------------------------------------------------------------------------------- inputs


def _as_images(images: Sequence[Any]) -> tuple[list[Image.Image], list[str]]:
    from captionlab.data.images import load_image

    pil, names = [], []
    for i, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            pil.append(load_image(im))
            names.append(Path(im).stem)
        elif isinstance(im, Image.Image):
            pil.append(im.convert("RGB"))
            fname = getattr(im, "filename", "") or ""
            names.append(Path(fname).stem if fname else f"image{i}")
        else:
            raise ConfigError(f"images must be PIL images or paths, got {type(im).__name__}")
    return pil, names


def _resolve_layers(layer: LayerSpec, n_layers: int) -> list[int]:
    if layer == "all":
        return list(range(n_layers))
    if isinstance(layer, str):
        raise ConfigError(f"layer must be an index, a list of indices or 'all', got {layer!r}")
    items = [layer] if isinstance(layer, (int, np.integer)) else list(layer)  # type: ignore[arg-type]
    out = []
    for i in items:
        if not -n_layers <= int(i) < n_layers:
            raise ConfigError(f"layer {i} out of range: the decoder has {n_layers} layers")
        out.append(int(i) % n_layers)
    if not out:
        raise ConfigError("no layer to capture")
    return out


class _Recorder:
    """Keeps, per forward call, the last query row on the image keys of every batch row: (B, H, n_img)."""

    def __init__(self, starts: Tensor, n_img: int) -> None:
        self.index = starts[:, None] + torch.arange(n_img)[None, :]  # (B, n_img) key positions
        self.steps: list[Tensor] = []

    def __call__(self, att: Tensor) -> None:
        row = att[:, :, -1, :].detach()  # (B, H, K): the query predicting the next token
        idx = self.index.to(row.device)[:, None, :].expand(-1, row.shape[1], -1)
        self.steps.append(row.gather(-1, idx).float().cpu())

    def per_row(self, b: int, n: int) -> np.ndarray:
        """(n, H, n_img) for batch row b's first n generated tokens."""
        if n == 0:
            n_heads = self.steps[0].shape[1] if self.steps else 1
            return np.zeros((0, n_heads, self.index.shape[1]), np.float32)
        if len(self.steps) < n:
            raise RuntimeError(f"captured {len(self.steps)} steps but {n} tokens were generated")
        return torch.stack([s[b] for s in self.steps[:n]]).numpy()


def _build_results(recorders: dict[int, _Recorder], token_ids: list[list[int]], tokenizer: Any,
                   pil: list[Image.Image], names: list[str], grid: tuple[int, int], layer: LayerSpec,
                   heads: Heads, unit: str, offset: int = 0) -> list[AttentionResult]:
    out = []
    gh, gw = grid
    for b, ids in enumerate(token_ids):
        per_layer = [rec.per_row(b, len(ids)) for rec in recorders.values()]
        hm = np.mean(per_layer, axis=0)
        hm = hm.reshape(len(ids), hm.shape[1], gh, gw).astype(np.float32)
        pieces, groups = merge_words(ids, tokenizer)
        caption = tokenizer.decode(ids, skip_special_tokens=True).strip()
        res = AttentionResult(tokens=[], maps=np.zeros((0, gh, gw), np.float32), grid=grid,
                              image=center_crop_square(pil[offset + b]), caption=caption,
                              layer=layer if isinstance(layer, (int, str)) else list(layer), heads=heads,
                              name=names[offset + b], token_ids=list(ids), token_strs=pieces, head_maps=hm,
                              word_groups=groups, unit=unit)
        out.append(res._with_unit(unit))
    return out


def _strip_eos(seqs: Sequence[Sequence[int]], eos: int | Sequence[int] | None, pad: int | None = None) -> list[list[int]]:
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    if pad is not None:
        stops.add(pad)
    out = []
    for s in seqs:
        s = [int(t) for t in s]
        cut = next((i for i, t in enumerate(s) if t in stops), len(s))
        out.append(s[:cut])
    return out


# --------------------------------------------------------------------------------- PEFT captioner (GPT)


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


def _captioner_lm_decoder(captioner: Any, pil: list[Image.Image]) -> Any:
    """The captioner's decoding object (prompt = visual prefix + bos, or bos with cross states) for `pil`."""
    return captioner.lm_decoder(captioner.visual_embeds(pixel_values=captioner.encoder.preprocess(pil)))


@torch.no_grad()
def capture_captioner_layers(captioner: Any, images: Sequence[Any], layers: LayerSpec = "all", heads: Heads = "mean",
                             unit: str = "words", max_new_tokens: int | None = None,
                             repetition_penalty: float = 1.0, batch_size: int = 16, progress: bool = True,
                             min_new_tokens: int = 0) -> dict[int, list[AttentionResult]]:
    """One greedy generation pass capturing each of `layers` separately: {layer: [AttentionResult per image]}."""
    from captionlab.decode import greedy_search

    pil, names = _as_images(images)
    cross = bool(getattr(captioner, "cross", False))
    mods = gpt_attention_modules(captioner.decoder, cross)
    idx = _resolve_layers(layers, len(mods))
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
            decoder = _captioner_lm_decoder(captioner, chunk)
            recs = {j: _Recorder(torch.full((len(chunk),), start), end - start) for j in idx}
            with gpt_capture(captioner.decoder, dict(recs), cross):
                seqs = greedy_search(decoder, max_new_tokens=max_new,
                                     eos_token_id=tok.eos_token_id, repetition_penalty=repetition_penalty,
                                     min_new_tokens=min_new_tokens)
            ids = _strip_eos(seqs, tok.eos_token_id)
            for j in idx:
                out[j] += _build_results({j: recs[j]}, ids, tok, pil, names, grid, j, heads, unit, offset=i)
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
    idx = _resolve_layers(layer, len(mods))
    per = capture_captioner_layers(captioner, images, idx, heads, "tokens", max_new_tokens, repetition_penalty,
                                   batch_size, progress, min_new_tokens)
    results = []
    for n in range(len(per[idx[0]])):
        first = per[idx[0]][n]
        hm = np.mean([per[j][n].head_maps for j in idx], axis=0)
        label: int | list[int] = idx[0] if isinstance(layer, (int, np.integer)) else idx
        results.append(replace(first, head_maps=hm, layer=label)._with_unit(unit))
    if rollout:
        results = [_rollout_captioner(captioner, r, unit) for r in results]
    return results


@torch.no_grad()
def _rollout_captioner(captioner: Any, res: AttentionResult, unit: str) -> AttentionResult:
    """Attention rollout over all decoder layers for one captured caption (one extra full forward)."""
    mods = gpt_attention_modules(captioner.decoder)
    prefix = _captioner_lm_decoder(captioner, [res.image]).prefix_embeds  # visual tokens + bos
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
    roll = _rollout([mats[j] for j in range(len(mods))])
    start, end = captioner.image_key_span()
    rows = prefix.shape[1] - 1 + torch.arange(len(res.token_ids))
    tmaps = roll[rows, start - P:end - P].reshape(len(rows), *res.grid).cpu().numpy()
    return _rollout_result(res, tmaps, unit)


def _rollout(mats: list[Tensor]) -> Tensor:
    """Product of row-normalised 0.5 A + 0.5 I over layers (first layer applied first)."""
    T = mats[0].shape[-1]
    eye = torch.eye(T, device=mats[0].device)
    roll = eye
    for a in mats:
        a = 0.5 * a + 0.5 * eye
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    return roll


def _rollout_result(res: AttentionResult, token_maps: np.ndarray, unit: str) -> AttentionResult:
    base = replace(res, head_maps=None, layer="rollout", heads="mean", maps=token_maps.astype(np.float32),
                   tokens=list(res.token_strs), unit="tokens")
    if unit == "tokens":
        return base
    words = ["".join(res.token_strs[i] for i in g).strip() for g in res.word_groups]
    return replace(base, tokens=words, maps=_merge(base.maps, res.word_groups), unit="words")


# ----------------------------------------------------------------------------------------------- LLaVA


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


def _eager_mask(mask: Tensor | None, q_len: int, kv_len: int, batch: int, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """Eager's additive (B, 1, q, kv) mask from what sdpa / flash got: None (causal), 2-D padding, or 4-D bool."""
    if mask is not None and mask.dim() == 4 and mask.dtype != torch.bool:
        return mask  # already additive
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    allowed = (torch.arange(kv_len, device=device)[None, :] <= q_pos)[None, None].expand(batch, 1, q_len, kv_len)
    if mask is not None and mask.dim() == 4:
        allowed = mask.to(device)[..., :kv_len].expand(batch, 1, q_len, kv_len)
    elif mask is not None and mask.dim() == 2:
        allowed = allowed & mask.bool().to(device)[:, None, None, -kv_len:]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


@contextmanager
def eager_layers(layers: Sequence[torch.nn.Module], hooks: dict[int, Callable[[Tensor], None]]) -> Iterator[None]:
    """Switch `layers[i].self_attn` to eager (own config copy) and call hooks[i](attn_weights) on each forward."""
    with ExitStack() as stack:
        for i, fn in hooks.items():
            attn = layers[i].self_attn
            original = attn.config
            own = copy.copy(original)
            own._attn_implementation = "eager"
            attn.config = own
            stack.callback(setattr, attn, "config", original)

            def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                past = kwargs.get("past_key_values")
                q_len = hidden.shape[1]
                past_len = int(past.get_seq_length(module.layer_idx)) if past is not None else 0
                kwargs["attention_mask"] = _eager_mask(kwargs.get("attention_mask"), q_len, past_len + q_len,
                                                       hidden.shape[0], hidden.dtype, hidden.device)
                return args, kwargs

            def post(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any, fn=fn) -> None:
                weights = output[1] if isinstance(output, tuple) else None
                if weights is None:
                    raise RuntimeError("captured layer returned no attention weights (not eager?)")
                fn(weights)

            stack.callback(attn.register_forward_pre_hook(pre, with_kwargs=True).remove)
            stack.callback(attn.register_forward_hook(post, with_kwargs=True).remove)
        yield


@torch.no_grad()
def capture_llava_layers(llava: Any, images: Sequence[Any], prompt: str | Sequence[str], layers: LayerSpec = "all",
                         heads: Heads = "mean", unit: str = "words", max_new_tokens: int = 40,
                         batch_size: int = 4, system: str | None = None, progress: bool = True,
                         generation: dict | None = None) -> dict[int, list[AttentionResult]]:
    """One greedy generation pass of LLaVA capturing each of `layers` separately: {layer: [results]}.

    `generation`: extra GenerationConfig options (e.g. repetition_penalty); decoding is always greedy."""
    pil, names = _as_images(images)
    prompts = [prompt] * len(pil) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(pil):
        raise ConfigError(f"got {len(pil)} images but {len(prompts)} prompts")
    model = llava.model
    layer_mods = llava_decoder_layers(model)
    idx = _resolve_layers(layers, len(layer_mods))
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
        starts = torch.tensor([s for s, _ in spans])
        recs = {j: _Recorder(starts, grid[0] * grid[1]) for j in idx}
        with eager_layers(layer_mods, dict(recs)):
            seqs = model.generate(**inputs, generation_config=gen)
        new = seqs[:, inputs["input_ids"].shape[1]:].tolist()
        ids = _strip_eos(new, gen.eos_token_id, gen.pad_token_id)
        for j in idx:
            out[j] += _build_results({j: recs[j]}, ids, tok, pil, names, grid, j, heads, unit, offset=i)
    return out


def capture_llava(llava: Any, images: Sequence[Any], prompt: str | Sequence[str], layer: LayerSpec = -1, heads: Heads = "mean",
                  unit: str = "words", max_new_tokens: int = 40, batch_size: int = 4, system: str | None = None,
                  rollout: bool = False, progress: bool = True, generation: dict | None = None) -> list[AttentionResult]:
    """Greedy LLaVA replies with per-word attention maps over the `<image>` patch tokens at `layer` (index, list
    to average, or "all"); `rollout=True` gives attention-rollout maps over all language-model layers instead."""
    n_layers = len(llava_decoder_layers(llava.model))
    idx = _resolve_layers(layer, n_layers)
    per = capture_llava_layers(llava, images, prompt, idx, heads, "tokens", max_new_tokens, batch_size, system,
                               progress, generation)
    results = []
    for n in range(len(per[idx[0]])):
        hm = np.mean([per[j][n].head_maps for j in idx], axis=0)
        label: int | list[int] = idx[0] if isinstance(layer, (int, np.integer)) else idx
        results.append(replace(per[idx[0]][n], head_maps=hm, layer=label)._with_unit(unit))
    if rollout:
        prompts = [prompt] * len(results) if isinstance(prompt, str) else list(prompt)
        results = [_rollout_llava(llava, r, p, system, unit) for r, p in zip(results, prompts)]
    return results


@torch.no_grad()
def _rollout_llava(llava: Any, res: AttentionResult, prompt: str, system: str | None, unit: str) -> AttentionResult:
    """Attention rollout over all language-model layers for one captured reply (one extra full forward)."""
    layers = llava_decoder_layers(llava.model)
    inputs = llava.prepare_inputs([res.image], prompt, system)
    L = inputs["input_ids"].shape[1]
    gen = torch.tensor([res.token_ids], dtype=torch.long, device=inputs["input_ids"].device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], gen], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(gen)], dim=1)
    mats: dict[int, Tensor] = {}

    def keep(j: int) -> Callable[[Tensor], None]:
        return lambda att: mats.__setitem__(j, att[0].float().mean(0))

    with eager_layers(layers, {j: keep(j) for j in range(len(layers))}):
        llava.model(**inputs, use_cache=False)
    roll = _rollout([mats[j] for j in range(len(layers))])
    s, e = image_token_span(inputs["input_ids"][0].cpu(), llava.image_token_id)
    rows = L - 1 + torch.arange(len(res.token_ids))
    tmaps = roll[rows, s:e].reshape(len(rows), *res.grid).cpu().numpy()
    return _rollout_result(res, tmaps, unit)


# ---------------------------------------------------------------------------------------------- dispatch


def is_llava(model: Any) -> bool:
    """True for a LlavaCaptioner-like object (has .processor, .model and image_token_id)."""
    return hasattr(model, "processor") and hasattr(model, "image_token_id") and hasattr(model, "model")


def capture(model: Any, images: Sequence[Any], prompt: str | None = None, **kw: Any) -> list[AttentionResult]:
    """`capture_llava` for a LlavaCaptioner (needs `prompt`), `capture_captioner` otherwise."""
    if is_llava(model):
        if prompt is None:
            from captionlab.models.llava import DEFAULT_PROMPT

            prompt = DEFAULT_PROMPT
        return capture_llava(model, images, prompt, **kw)
    return capture_captioner(model, images, **kw)


def capture_layers(model: Any, images: Sequence[Any], layers: LayerSpec = "all", prompt: str | None = None,
                   **kw: Any) -> dict[int, list[AttentionResult]]:
    """`capture_llava_layers` / `capture_captioner_layers` by model kind: {layer: [results]} in one pass."""
    if is_llava(model):
        if prompt is None:
            from captionlab.models.llava import DEFAULT_PROMPT

            prompt = DEFAULT_PROMPT
        return capture_llava_layers(model, images, prompt, layers, **kw)
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
