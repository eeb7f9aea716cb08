"""A GPT-2 decoder in one readable file (nanoGPT style) with HF GPT-2 module names, KV cache, inputs_embeds
prefixes, left padding, optional bottleneck adapters / prefix tuning / gated cross-attention layers, and a
per-layer attention capture hook.

Module names match HF `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn`, ...), so HF / course weights load 1:1
and peft `target_modules` names work unchanged. Linear layers are `nn.Linear` (HF uses Conv1D: transposed).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F
from torch import Tensor

from captionlab.errors import ConfigError
from captionlab.models.dropout import active_generator, dropout

# One layer's cache: (keys, values), each (B, n_head, T_past, head_dim). Prefix-tuning keys are not cached.
LayerCache = tuple[Tensor, Tensor]


@dataclass
class GPTConfig:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0
    adapter_dim: int = 0  # >0: bottleneck adapters after attention and after the MLP in every block
    prefix_len: int = 0  # >0: learned per-layer key/value prefixes (prefix tuning)
    cross_every: int = 0  # >0: a gated cross-attention layer (Flamingo) before blocks 0, k, 2k, ...
    cross_dim: int = 0  # inner width of the cross-attention and its dense layer (0 = n_embd)

    def has_cross(self, layer: int) -> bool:
        """Whether block `layer` has a gated cross-attention layer in front of it."""
        return self.cross_every > 0 and layer % self.cross_every == 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class DecoderOutput:
    logits: Tensor  # (B, T, vocab)
    past_key_values: list[LayerCache] | None  # per layer, when use_cache
    hidden_states: Tensor  # (B, T, n_embd), after the final layer norm


# Cross-attention keys/values of the visual tokens, per block (None for blocks without cross-attention).
CrossCache = list[LayerCache | None]


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby): x + up(gelu(down(x))), up-projection zero-initialised (identity at start)."""

    def __init__(self, n_embd: int, dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(n_embd, dim)
        self.up = nn.Linear(dim, n_embd)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(F.gelu(self.down(x)))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with KV cache and an optional capture hook.

    `capture`: when set to a callable, this layer computes attention explicitly (softmax of the masked
    QK^T / sqrt(head_dim), before any dropout) and calls `capture(att)` with `att` of shape (B, n_head, T_query,
    T_keys). The key axis is [prefix_len learned prefix keys] + [past (cached) keys] + [current keys]; masked keys
    (padding, future) have weight 0. Layers without a capture hook use F.scaled_dot_product_attention, except when
    training with attention dropout under a micro-batch generator (`captionlab.models.dropout`), whose masks SDPA
    cannot draw.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.capture: Callable[[Tensor], None] | None = None

    def forward(self, x: Tensor, mask: Tensor, past: LayerCache | None = None,
                prefix_kv: Tensor | None = None) -> tuple[Tensor, LayerCache]:
        """x (B,T,C); mask (B,1,T,K) bool, True = attend, K = prefix + past + T; prefix_kv (2,H,P,hd)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        if prefix_kv is not None:
            pk, pv = (t.to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1) for t in prefix_kv)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        seeded = self.training and self.dropout > 0 and active_generator() is not None
        if self.capture is not None or seeded:  # explicit weights: to capture them, or to drop them per micro-batch
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            if self.capture is not None:
                self.capture(att)
            y = dropout(att, self.dropout, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), present


class GatedCrossAttention(nn.Module):
    """Flamingo's gated cross-attention dense layer: text queries attend to visual tokens, then a dense layer;
    both residual branches are scaled by tanh of a zero-initialised gate, so a new layer starts as the identity
    and the pretrained language model is unchanged until training opens the gates.

    x = x + tanh(g_attn) * out(attn(ln_1(x) -> q, visual -> k, v));  x = x + tanh(g_ff) * ff(ln_2(x))

    `capture`: as in CausalSelfAttention, called with the softmax weights (B, n_head, T_query, n_visual).
    Visual tokens carry no padding; every query sees all of them.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        C, d = config.n_embd, config.cross_dim or config.n_embd
        if d % config.n_head:
            raise ConfigError(f"cross_dim={d} must be divisible by n_head={config.n_head}")
        self.n_head, self.head_dim, self.dim = config.n_head, d // config.n_head, d
        self.ln_1 = nn.LayerNorm(C, eps=config.layer_norm_epsilon)
        self.q = nn.Linear(C, d)
        self.kv = nn.Linear(C, 2 * d)
        self.out = nn.Linear(d, C)
        self.ln_2 = nn.LayerNorm(C, eps=config.layer_norm_epsilon)
        self.ff = nn.Sequential(nn.Linear(C, d), nn.GELU(), nn.Linear(d, C))
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ff = nn.Parameter(torch.zeros(1))
        self.capture: Callable[[Tensor], None] | None = None

    def keys_values(self, visual: Tensor) -> LayerCache:
        """(k, v), each (B, n_head, n_visual, head_dim), of visual tokens (B, n_visual, n_embd)."""
        B, V, _ = visual.shape
        k, v = self.kv(visual).split(self.dim, dim=2)
        return tuple(t.view(B, V, self.n_head, self.head_dim).transpose(1, 2) for t in (k, v))  # type: ignore[return-value]

    def forward(self, x: Tensor, kv: LayerCache) -> Tensor:
        B, T, _ = x.shape
        q = self.q(self.ln_1(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.to(q.dtype) for t in kv)
        if self.capture is not None:
            att = ((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)).softmax(dim=-1)
            self.capture(att)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, self.dim)
        x = x + torch.tanh(self.gate_attn) * self.out(y)
        return x + torch.tanh(self.gate_ff) * self.ff(self.ln_2(x))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, cross: bool = False) -> None:
        super().__init__()
        if cross:
            self.crossattn = GatedCrossAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        if config.adapter_dim > 0:
            self.adapter_attn = Adapter(config.n_embd, config.adapter_dim)
            self.adapter_mlp = Adapter(config.n_embd, config.adapter_dim)

    def forward(self, x: Tensor, mask: Tensor, past: LayerCache | None = None,
                prefix_kv: Tensor | None = None, cross_kv: LayerCache | None = None) -> tuple[Tensor, LayerCache]:
        if hasattr(self, "crossattn"):
            if cross_kv is None:
                raise ValueError("this decoder has cross-attention layers: pass cross_states or cross_kv")
            x = self.crossattn(x, cross_kv)
        a, present = self.attn(self.ln_1(x), mask, past, prefix_kv)
        if hasattr(self, "adapter_attn"):
            a = self.adapter_attn(a)
        x = x + a
        m = self.mlp(self.ln_2(x))
        if hasattr(self, "adapter_mlp"):
            m = self.adapter_mlp(m)
        return x + m, present


class GPT(nn.Module):
    """GPT-2 language model (HF module names, tied lm_head) accepting token ids or input embeddings."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, config.has_cross(i)) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.prefix_len > 0:
            self.prefix_kv = nn.Parameter(torch.empty(config.n_layer, 2, config.n_head, config.prefix_len,
                                                      config.head_dim))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.prefix_len > 0:
            nn.init.normal_(self.prefix_kv, std=0.02)
        for block in self.transformer.h:  # keep adapters an identity at start (after the generic init)
            for ad in (getattr(block, "adapter_attn", None), getattr(block, "adapter_mlp", None)):
                if ad is not None:
                    nn.init.zeros_(ad.up.weight)
                    nn.init.zeros_(ad.up.bias)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Token embeddings (B, T, n_embd) of `input_ids` (no positions)."""
        return self.transformer.wte(input_ids)

    def cross_kv(self, cross_states: Tensor) -> CrossCache:
        """Per block, the cross-attention keys/values of visual tokens (B, n_visual, n_embd); None where none."""
        return [b.crossattn.keys_values(cross_states) if hasattr(b, "crossattn") else None
                for b in self.transformer.h]

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: list[LayerCache] | None = None, use_cache: bool = False,
                cross_states: Tensor | None = None, cross_kv: CrossCache | None = None,
                logits_from: int = 0) -> DecoderOutput:
        """Logits for `input_ids` (B,T) or `inputs_embeds` (B,T,C) after an optional cache of T_past positions.

        attention_mask: (B, T_past + T), 1 = attend (left padding supported); positions default to the
        attention mask's cumulative sum - 1 (so left padding does not shift them). Learned prefix-tuning keys
        are always attended and take no positions. cross_states (B, V, C) / cross_kv (from `cross_kv`): what
        the gated cross-attention layers attend to (decoders built with cross_every > 0). logits_from: compute
        the LM head only for positions >= this (training skips the visual prefix rows).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=x.device)
        if attention_mask.shape != (B, past_len + T):
            raise ValueError(f"attention_mask must be (B, T_past+T) = {(B, past_len + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        if int(position_ids.max()) >= self.config.n_positions:
            raise ValueError(f"sequence longer than n_positions={self.config.n_positions}")
        x = self.transformer.drop(x + self.transformer.wpe(position_ids))
        mask = self._attention_mask(attention_mask.bool(), T, past_len)
        if cross_kv is None and cross_states is not None:
            cross_kv = self.cross_kv(cross_states)
        presents: list[LayerCache] = []
        for i, block in enumerate(self.transformer.h):
            past = past_key_values[i] if past_key_values else None
            prefix = self.prefix_kv[i] if self.config.prefix_len > 0 else None
            x, present = block(x, mask, past, prefix, cross_kv[i] if cross_kv is not None else None)
            presents.append(present)
        x = self.transformer.ln_f(x)
        return DecoderOutput(logits=self.lm_head(x[:, logits_from:] if logits_from else x),
                             past_key_values=presents if use_cache else None, hidden_states=x)

    def _attention_mask(self, keep: Tensor, T: int, past_len: int) -> Tensor:
        """Bool (B, 1, T, prefix_len + past_len + T): causal AND key not padding; prefix keys always on."""
        B, K = keep.shape
        q_pos = torch.arange(past_len, past_len + T, device=keep.device)[:, None]
        k_pos = torch.arange(K, device=keep.device)[None, :]
        mask = (k_pos <= q_pos)[None] & keep[:, None, :]  # (B, T, K)
        mask = mask | (k_pos == q_pos)[None]  # a padded query attends to itself: no all-masked rows (NaN)
        if self.config.prefix_len > 0:
            on = torch.ones(B, T, self.config.prefix_len, dtype=torch.bool, device=keep.device)
            mask = torch.cat([on, mask], dim=-1)
        return mask[:, None]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of (trainable) parameters, tied weights counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------- loading

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def convert_hf_state_dict(state: dict[str, Tensor], n_layer: int | None = None) -> dict[str, Tensor]:
    """HF GPT2Model / GPT2LMHeadModel / course `decoder_model.bin` tensors -> GPT state dict.

    Accepts keys with or without the `transformer.` prefix, drops `.attn.bias` / `.attn.masked_bias` buffers
    and `lm_head.weight` (tied), and transposes Conv1D weights unless they are already in nn.Linear layout
    (decided from the non-square c_attn weight, so square c_proj weights follow the same layout).
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        k = key.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue
        out["transformer." + k] = value
    c_attn = out.get("transformer.h.0.attn.c_attn.weight")
    if c_attn is None:
        raise ConfigError("not a GPT-2 state dict: no h.0.attn.c_attn.weight")
    conv1d_layout = c_attn.shape[1] == 3 * c_attn.shape[0]
    if conv1d_layout:
        for k in list(out):
            if k.endswith(_CONV1D):
                out[k] = out[k].t().contiguous()
    return out


def config_from_state_dict(state: dict[str, Tensor], n_head: int | None = None, **overrides: Any) -> GPTConfig:
    """Infer GPTConfig from converted tensors (n_head defaults to n_embd // 64, GPT-2's head size)."""
    vocab_size, n_embd = state["transformer.wte.weight"].shape
    n_positions = state["transformer.wpe.weight"].shape[0]
    n_layer = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.h."))
    n_head = n_head or max(1, n_embd // 64)
    return GPTConfig(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, **overrides)


def _read_state(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report which file is bad
        raise ConfigError(f"{path}: cannot read decoder weights: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _resolve_hf_id(spec: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"decoder {spec!r}: not a file, a directory, or a model in the local HF cache "
                          f"({type(exc).__name__})") from None


def _hf_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    return json.loads(cfg.read_text()) if cfg.exists() else {}


def _config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    keys = {"vocab_size": "vocab_size", "n_positions": "n_positions", "n_embd": "n_embd", "n_layer": "n_layer",
            "n_head": "n_head", "layer_norm_epsilon": "layer_norm_epsilon"}
    return {ours: hf[theirs] for ours, theirs in keys.items() if theirs in hf}


def _bpe_tokenizer(vocab: Path, merges: Path) -> Any:
    """GPT2TokenizerFast from GPT-2's vocab (encoder.json) and merges (vocab.bpe) files."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    try:
        bpe = ByteLevelBPETokenizer(vocab=str(vocab), merges=str(merges))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{vocab} / {merges}: not GPT-2 BPE files ({exc})") from None
    eos = "<|endoftext|>"
    return GPT2TokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=eos, unk_token=eos)


def load_tokenizer(source: Any, weights_dir: Path | None = None, vocab_size: int | None = None) -> Any:
    """A GPT-2 tokenizer from an object, a dir / HF id, or `encoder.json` + `vocab.bpe` next to the weights."""
    from transformers import AutoTokenizer

    tok = None
    if source is not None and isinstance(source, (str, os.PathLike)):
        src = Path(source)
        if src.is_dir() and not (src / "tokenizer.json").exists() and not (src / "tokenizer_config.json").exists():
            if not ((src / "encoder.json").exists() and (src / "vocab.bpe").exists()):
                raise ConfigError(f"tokenizer {src}: no encoder.json + vocab.bpe, tokenizer.json or tokenizer_config.json")
            source, weights_dir = None, src  # the course's encoder.json + vocab.bpe (the homework repo)
        elif str(source).startswith(("/", ".", "~")) and not src.exists():
            raise ConfigError(f"tokenizer {src}: directory does not exist")
    if source is not None and not isinstance(source, (str, os.PathLike)):
        tok = source
    elif source is not None:
        try:
            tok = AutoTokenizer.from_pretrained(str(source))
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"tokenizer {source}: cannot load ({exc})") from None
    elif weights_dir is not None:
        if (weights_dir / "tokenizer.json").exists() or (weights_dir / "tokenizer_config.json").exists():
            tok = AutoTokenizer.from_pretrained(str(weights_dir))
        elif (weights_dir / "encoder.json").exists() and (weights_dir / "vocab.bpe").exists():
            tok = _bpe_tokenizer(weights_dir / "encoder.json", weights_dir / "vocab.bpe")
        elif (weights_dir / "vocab.json").exists() and (weights_dir / "merges.txt").exists():
            tok = _bpe_tokenizer(weights_dir / "vocab.json", weights_dir / "merges.txt")
    if tok is None and vocab_size == 50257:  # the real GPT-2: its tokenizer from the local HF cache
        for name in ("openai-community/gpt2", "gpt2"):
            try:
                tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
                break
            except Exception:  # noqa: BLE001
                continue
    if tok is None:
        raise ConfigError(f"{weights_dir}: no tokenizer found (tokenizer.json, or encoder.json + vocab.bpe); "
                          "pass tokenizer=")
    if tok.eos_token is None:
        if "<|endoftext|>" not in tok.get_vocab():
            raise ConfigError(f"{weights_dir}: tokenizer has no eos token and no <|endoftext|>")
        tok.eos_token = "<|endoftext|>"
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_decoder(spec: str | os.PathLike, **overrides: Any) -> tuple[GPT, Any]:
    """Load a GPT-2 decoder and its tokenizer from a `decoder_model.bin`, an HF GPT-2 dir, or a cached HF id.

    overrides: GPTConfig fields (e.g. adapter_dim, prefix_len, dropout, n_head) and `tokenizer=` (an object,
    dir or id). Returns the model in eval mode on CPU (float32).
    """
    tokenizer = overrides.pop("tokenizer", None)
    unknown = set(overrides) - {f.name for f in fields(GPTConfig)}
    if unknown:
        raise ConfigError(f"load_decoder: unknown options {sorted(unknown)}")
    path = Path(spec)
    if path.is_file():
        weights, base = path, path.parent
    else:
        base = path if path.is_dir() else _resolve_hf_id(str(spec))
        weights = next((base / n for n in ("model.safetensors", "pytorch_model.bin", "decoder_model.bin")
                        if (base / n).exists()), None)
        if weights is None:
            raise ConfigError(f"{base}: no model.safetensors, pytorch_model.bin or decoder_model.bin")
    state = convert_hf_state_dict(_read_state(weights))
    hf = _config_fields(_hf_config(base))
    cfg = config_from_state_dict(state, n_head=overrides.pop("n_head", hf.get("n_head")),
                                 **{"layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5), **overrides})
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and "adapter_" not in k and k != "prefix_kv"
               and ".crossattn." not in k]
    if missing or unexpected:
        raise ConfigError(f"{weights}: weights do not match a GPT-2 of {cfg}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    tok = load_tokenizer(tokenizer, base, cfg.vocab_size)
    return model.eval(), tok
