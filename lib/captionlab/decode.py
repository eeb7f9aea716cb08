"""Batched greedy and beam search with a KV cache: one decoding implementation for every captioner.

A decoder object holds one batch (its prompt: visual prefix embeddings, or input ids + extras) and implements

    prefill() -> (logits_last (B, V), cache)          # run the prompt, logits for the first new token
    step(next_tokens (B,), cache) -> (logits (B, V), cache)
    reorder_cache(cache, index (N,)) -> cache        # select / repeat batch rows (beam bookkeeping)
    full_logits(generated (B, t)) -> logits (B, V)   # no-cache recompute of prompt + generated (references)

`PrefixLMDecoder` wraps our GPT with inputs_embeds prefixes (visual tokens + BOS); `HFDecoder` wraps any HF
causal LM / LLaVA-like model taking (input_ids, attention_mask, **extra). `greedy_search` / `beam_search`
return, per batch row, the generated token ids without the eos. `reference_greedy` / `reference_beam` are
plain batch-1 implementations that recompute everything every step (like the course starter code); tests
and benchmarks compare against them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class Decoder(Protocol):
    """What the search functions need from a model holding one batch of prompts."""

    batch_size: int

    def prefill(self) -> tuple[Tensor, Any]: ...

    def step(self, next_tokens: Tensor, cache: Any) -> tuple[Tensor, Any]: ...

    def reorder_cache(self, cache: Any, index: Tensor) -> Any: ...

    def full_logits(self, generated: Tensor) -> Tensor: ...


# ------------------------------------------------------------------------------------------- decoders


class PrefixLMDecoder:
    """Our GPT conditioned on prefix embeddings (B, L, C) with a left-padding mask (B, L), optionally + BOS.

    `bos_token_id`: when given, its embedding is appended after the prefix (the usual "visual tokens + BOS").
    `cross_states` (B, V, C): what a decoder with gated cross-attention layers attends to; their keys/values
    are computed once and carried (and beam-reordered) in the cache.
    """

    def __init__(self, gpt: torch.nn.Module, prefix_embeds: Tensor, prefix_mask: Tensor | None = None,
                 bos_token_id: int | None = None, cross_states: Tensor | None = None) -> None:
        self.gpt = gpt
        self.cross_states = cross_states
        B, L, _ = prefix_embeds.shape
        mask = prefix_mask if prefix_mask is not None else torch.ones(B, L, dtype=torch.long)
        mask = mask.to(prefix_embeds.device).long()
        if bos_token_id is not None:
            bos = torch.full((B, 1), bos_token_id, dtype=torch.long, device=prefix_embeds.device)
            prefix_embeds = torch.cat([prefix_embeds, gpt.transformer.wte(bos).to(prefix_embeds.dtype)], dim=1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long, device=mask.device)], dim=1)
        self.prefix_embeds, self.prefix_mask = prefix_embeds, mask
        self.batch_size = B
        self.penalty_context: list[list[int]] | None = None

    @torch.no_grad()
    def prefill(self) -> tuple[Tensor, dict[str, Any]]:
        """Run the prefix; return last-position logits and the cache."""
        cross = self.gpt.cross_kv(self.cross_states) if self.cross_states is not None else None
        out = self.gpt(inputs_embeds=self.prefix_embeds, attention_mask=self.prefix_mask, use_cache=True,
                       cross_kv=cross)
        return out.logits[:, -1].float(), {"past": out.past_key_values, "mask": self.prefix_mask, "cross": cross}

    @torch.no_grad()
    def step(self, next_tokens: Tensor, cache: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Feed one token per row; return its logits and the grown cache."""
        mask = torch.cat([cache["mask"], cache["mask"].new_ones(cache["mask"].shape[0], 1)], dim=1)
        out = self.gpt(input_ids=next_tokens[:, None].to(mask.device), attention_mask=mask,
                       past_key_values=cache["past"], use_cache=True, cross_kv=cache["cross"])
        return out.logits[:, -1].float(), {"past": out.past_key_values, "mask": mask, "cross": cache["cross"]}

    def reorder_cache(self, cache: dict[str, Any], index: Tensor) -> dict[str, Any]:
        """Select batch rows `index` of every cached tensor."""
        index = index.to(cache["mask"].device)

        def pick(kv: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
            return None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))

        cross = None if cache["cross"] is None else [pick(kv) for kv in cache["cross"]]
        return {"past": [pick(kv) for kv in cache["past"]], "mask": cache["mask"].index_select(0, index),
                "cross": cross}

    @torch.no_grad()
    def full_logits(self, generated: Tensor) -> Tensor:
        """Logits after prefix + `generated` (B, t), recomputed without a cache."""
        embeds, mask = self.prefix_embeds, self.prefix_mask
        if generated.shape[1]:
            generated = generated.to(embeds.device)
            embeds = torch.cat([embeds, self.gpt.transformer.wte(generated).to(embeds.dtype)], dim=1)
            mask = torch.cat([mask, torch.ones_like(generated)], dim=1)
        return self.gpt(inputs_embeds=embeds, attention_mask=mask, cross_states=self.cross_states).logits[:, -1].float()


def hf_cache_kwarg(model: torch.nn.Module) -> str:
    """The KV-cache argument name of an HF model's forward: `cache` (transformers >= 5.24) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_output_cache(out: Any) -> Any:
    """The KV cache of an HF model output under either name (without touching the deprecated alias)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


class HFDecoder:
    """Any HF causal LM (or LLaVA-like model) called as model(input_ids, attention_mask, **extra).

    Prompts are left-padded; positions come from the attention mask (as HF generate does). `extra`
    (e.g. pixel_values) is passed only at prefill. `penalty_context` makes the repetition penalty also
    cover the prompt tokens, as HF generate does.
    """

    def __init__(self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                 **extra: Any) -> None:
        self.model = model
        self.input_ids = input_ids
        self.attention_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if bool((self.attention_mask[:, -1] == 0).any()):
            raise ValueError("HFDecoder needs left padding (tokenizer.padding_side = 'left')")
        self.extra = extra
        self.cache_kwarg = hf_cache_kwarg(model)
        # only the last position's logits are read: skip the LM head elsewhere (576 image tokens x vocab in LLaVA)
        self.last_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        self.batch_size = input_ids.shape[0]
        self.penalty_context = [[int(t) for t, m in zip(ids, msk) if m]
                                for ids, msk in zip(input_ids.tolist(), self.attention_mask.tolist())]

    @staticmethod
    def _positions(mask: Tensor) -> Tensor:
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)

    @torch.no_grad()
    def prefill(self) -> tuple[Tensor, dict[str, Any]]:
        """Run the prompt; return last-position logits and the cache."""
        mask = self.attention_mask
        out = self.model(input_ids=self.input_ids, attention_mask=mask, position_ids=self._positions(mask),
                         use_cache=True, **self.last_only, **self.extra)
        return out.logits[:, -1].float(), {"past": hf_output_cache(out), "mask": mask}

    @torch.no_grad()
    def step(self, next_tokens: Tensor, cache: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Feed one token per row; return its logits and the grown cache."""
        mask = torch.cat([cache["mask"], cache["mask"].new_ones(cache["mask"].shape[0], 1)], dim=1)
        out = self.model(input_ids=next_tokens[:, None].to(mask.device), attention_mask=mask,
                         position_ids=self._positions(mask)[:, -1:], use_cache=True,
                         **{self.cache_kwarg: cache["past"]})
        return out.logits[:, -1].float(), {"past": hf_output_cache(out), "mask": mask}

    def reorder_cache(self, cache: dict[str, Any], index: Tensor) -> dict[str, Any]:
        """Select batch rows `index` of the HF cache (in place) and of the mask."""
        past = cache["past"]
        index = index.to(cache["mask"].device)
        if hasattr(past, "reorder_cache"):
            past.reorder_cache(index)
        else:  # legacy tuple-of-tuples cache
            past = tuple(tuple(t.index_select(0, index.to(t.device)) for t in layer) for layer in past)
        return {"past": past, "mask": cache["mask"].index_select(0, index)}

    @torch.no_grad()
    def full_logits(self, generated: Tensor) -> Tensor:
        """Logits after prompt + `generated` (B, t), recomputed without a cache."""
        ids = torch.cat([self.input_ids, generated.to(self.input_ids.device)], dim=1)
        mask = torch.cat([self.attention_mask, torch.ones_like(generated).to(self.attention_mask.device)], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=self._positions(mask), use_cache=False,
                         **self.last_only, **self.extra)
        return out.logits[:, -1].float()


# -------------------------------------------------------------------------------------------- helpers


def _accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether `model.forward` takes the keyword `name` (False for **kwargs-only wrappers)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def apply_repetition_penalty(logits: Tensor, seen: list[list[int]], penalty: float) -> Tensor:
    """CTRL / HF repetition penalty: divide positive (multiply negative) logits of tokens already seen."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for row, tokens in enumerate(seen):
        if tokens:
            idx = torch.tensor(sorted(set(tokens)), device=logits.device)
            vals = logits[row, idx]
            logits[row, idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def _context(model: Any, rows: int, per_row: int = 1) -> list[list[int]]:
    ctx = getattr(model, "penalty_context", None)
    if ctx is None:
        return [[] for _ in range(rows * per_row)]
    return [list(ctx[i // per_row]) for i in range(rows * per_row)]


# --------------------------------------------------------------------------------------------- greedy


@torch.no_grad()
def greedy_search(model: Decoder, max_new_tokens: int, eos_token_id: int, repetition_penalty: float = 1.0,
                  min_new_tokens: int = 0) -> list[list[int]]:
    """Batched greedy decoding with KV cache; returns B token-id lists (eos excluded)."""
    logits, cache = model.prefill()
    B = logits.shape[0]
    seen = _context(model, B)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(max_new_tokens):
        logits = apply_repetition_penalty(logits, [s + o for s, o in zip(seen, out)], repetition_penalty)
        if t < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        tokens = logits.argmax(-1).cpu()
        tokens = torch.where(done, torch.full_like(tokens, eos_token_id), tokens)  # finished rows: pad with eos
        for i in range(B):
            if not done[i] and tokens[i] != eos_token_id:
                out[i].append(int(tokens[i]))
        done |= tokens == eos_token_id
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits, cache = model.step(tokens, cache)
    return out


@torch.no_grad()
def reference_greedy(model: Decoder, max_new_tokens: int, eos_token_id: int, repetition_penalty: float = 1.0,
                     min_new_tokens: int = 0) -> list[list[int]]:
    """Greedy decoding of a batch-1 decoder, recomputing the whole sequence every step (no cache)."""
    if model.batch_size != 1:
        raise ValueError("reference_greedy decodes batch size 1 only")
    seen = _context(model, 1)[0]
    out: list[int] = []
    for t in range(max_new_tokens):
        logits = model.full_logits(torch.tensor([out], dtype=torch.long))
        logits = apply_repetition_penalty(logits, [seen + out], repetition_penalty)[0]
        if t < min_new_tokens:
            logits[eos_token_id] = float("-inf")
        token = int(logits.argmax())
        if token == eos_token_id:
            break
        out.append(token)
    return [out]


# ----------------------------------------------------------------------------------------------- beam


@dataclass
class _Hyps:
    """The best `k` finished hypotheses of one batch row: (score, tokens)."""

    k: int
    length_penalty: float

    def __post_init__(self) -> None:
        self.items: list[tuple[float, list[int]]] = []

    def add(self, tokens: list[int], sum_logprobs: float, length: int) -> None:
        score = sum_logprobs / (max(length, 1) ** self.length_penalty)
        self.items.append((score, tokens))
        self.items.sort(key=lambda x: -x[0])
        del self.items[self.k:]

    def is_done(self, best_running_sum: float, cur_len: int) -> bool:
        """HF's default stopping rule (early_stopping=False): k finished and none running can beat the worst."""
        if len(self.items) < self.k:
            return False
        return self.items[-1][0] >= best_running_sum / (max(cur_len, 1) ** self.length_penalty)

    def best(self) -> list[int]:
        return self.items[0][1]


@torch.no_grad()
def beam_search(model: Decoder, beam_size: int, max_new_tokens: int, eos_token_id: int,
                length_penalty: float = 1.0, repetition_penalty: float = 1.0) -> list[list[int]]:
    """Batched beam search with KV cache; returns B token-id lists (best hypothesis, eos excluded).

    Scores are summed log-probabilities divided by length ** length_penalty (length counts the eos).
    Each step keeps the top 2k candidates: eos candidates ranked < k finish a hypothesis, the best k others
    continue; a row stops when it has k finished hypotheses none of its running beams can beat (HF's rule).
    """
    K = beam_size
    logits, cache = model.prefill()
    B, V = logits.shape
    rows = torch.arange(B).repeat_interleave(K)
    cache = model.reorder_cache(cache, rows)
    logits = logits.index_select(0, rows.to(logits.device))
    scores = torch.full((B, K), -1e9)
    scores[:, 0] = 0.0  # only the first beam is live at the start
    scores = scores.view(-1)
    seqs: list[list[int]] = [[] for _ in range(B * K)]
    seen = _context(model, B, K)
    hyps = [_Hyps(K, length_penalty) for _ in range(B)]
    done = [False] * B
    for t in range(max_new_tokens):
        logits = apply_repetition_penalty(logits, [s + q for s, q in zip(seen, seqs)], repetition_penalty)
        logp = torch.log_softmax(logits, dim=-1).cpu() + scores[:, None]  # (B*K, V)
        top_scores, top_idx = logp.view(B, K * V).topk(2 * K, dim=1)
        new_scores = torch.zeros(B, K)
        new_src = torch.zeros(B, K, dtype=torch.long)
        new_tok = torch.full((B, K), eos_token_id, dtype=torch.long)
        new_seqs: list[list[int]] = []
        for b in range(B):
            if done[b]:  # keep the row alive but frozen; its output is already decided
                new_src[b] = torch.arange(K) + b * K
                new_scores[b] = scores[b * K:(b + 1) * K]
                new_seqs.extend(seqs[b * K:(b + 1) * K])
                continue
            n = 0
            for rank in range(2 * K):
                src, tok = divmod(int(top_idx[b, rank]), V)
                score = float(top_scores[b, rank])
                if tok == eos_token_id:
                    if rank < K:
                        hyps[b].add(list(seqs[b * K + src]), score, t + 1)
                    continue
                new_src[b, n], new_tok[b, n], new_scores[b, n] = b * K + src, tok, score
                new_seqs.append(seqs[b * K + src] + [tok])
                n += 1
                if n == K:
                    break
            done[b] = hyps[b].is_done(float(new_scores[b].max()), t + 1)
        scores, seqs = new_scores.view(-1), new_seqs
        if all(done) or t == max_new_tokens - 1:
            break
        cache = model.reorder_cache(cache, new_src.view(-1))
        logits, cache = model.step(new_tok.view(-1), cache)
    for b in range(B):  # rows cut by max_new_tokens: running beams compete with finished ones
        if not done[b]:
            for j in range(K):
                hyps[b].add(list(seqs[b * K + j]), float(scores[b * K + j]), len(seqs[b * K + j]))
    return [h.best() for h in hyps]


@torch.no_grad()
def reference_beam(model: Decoder, beam_size: int, max_new_tokens: int, eos_token_id: int,
                   length_penalty: float = 1.0, repetition_penalty: float = 1.0) -> list[list[int]]:
    """Beam search of a batch-1 decoder, recomputing every beam from scratch each step (no cache)."""
    if model.batch_size != 1:
        raise ValueError("reference_beam decodes batch size 1 only")
    K = beam_size
    seen = _context(model, 1)[0]
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    hyps = _Hyps(K, length_penalty)
    for t in range(max_new_tokens):
        cands: list[tuple[float, int, int]] = []  # (score, beam, token)
        for j, (score, seq) in enumerate(beams):
            logits = model.full_logits(torch.tensor([seq], dtype=torch.long))
            logits = apply_repetition_penalty(logits, [seen + seq], repetition_penalty)[0]
            logp = torch.log_softmax(logits, dim=-1) + score
            vals, idx = logp.topk(min(2 * K, logp.shape[-1]))
            cands += [(float(v), j, int(i)) for v, i in zip(vals, idx)]
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        new_beams: list[tuple[float, list[int]]] = []
        for rank, (score, j, tok) in enumerate(cands[:2 * K]):
            if tok == eos_token_id:
                if rank < K:
                    hyps.add(list(beams[j][1]), score, t + 1)
                continue
            new_beams.append((score, beams[j][1] + [tok]))
            if len(new_beams) == K:
                break
        beams = new_beams
        if hyps.is_done(max(s for s, _ in beams), t + 1):
            return [hyps.best()]
    for score, seq in beams:
        hyps.add(list(seq), score, len(seq))
    return [hyps.best()]


# ------------------------------------------------------------------------------------------ dispatcher


def generate(model: Decoder, method: str = "greedy", **kw: Any) -> list[list[int]]:
    """Decode with `method` in greedy | beam | reference_greedy | reference_beam (kwargs of that function)."""
    fns = {"greedy": greedy_search, "beam": beam_search, "reference_greedy": reference_greedy,
           "reference_beam": reference_beam}
    if method not in fns:
        raise ValueError(f"unknown decoding method {method!r}; choose from {sorted(fns)}")
    if method in ("greedy", "reference_greedy"):
        kw.pop("beam_size", None)
        kw.pop("length_penalty", None)
    else:
        kw.pop("min_new_tokens", None)
    return fns[method](model, **kw)
