"""The PEFT captioner: a frozen vision encoder, a trainable projector, and a frozen GPT-2 decoder with PEFT
(LoRA via HF peft, or the decoder's built-in adapters / prefix tuning).

Two ways to condition the decoder on the projected visual tokens (CLS? + patches):
- `prefix`: the sequence is [visual tokens] [bos] caption [eos] [pad...]; the visual tokens are fed as
  `inputs_embeds` and caption tokens attend to them through the decoder's own self-attention.
- `cross`: the sequence is [bos] caption [eos] [pad...]; gated cross-attention layers (Flamingo, gates start
  at 0 so the pretrained LM is unchanged at first) in front of every `cross_every`-th block attend to the
  visual tokens. The cross layers are trainable and count against the budget.
The loss covers the caption and eos only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from captionlab.errors import ConfigError
from captionlab.models.peft_wiring import (
    DEFAULT_LORA_TARGETS,
    PEFT_METHODS,
    check_budget,
    format_report,
    freeze,
    parameter_report,
    unfreeze_matching,
    wire_decoder,
)
from captionlab.utils import dataclass_from_dict, atomic_write_json, save_safetensors_atomic

WEIGHTS_NAME = "trainable.safetensors"
EMPTY_CAPTION = "an image"  # = captionlab.models.llava.EMPTY_CAPTION
CONDITIONINGS = ("prefix", "cross")
CONFIG_NAME = "captioner.json"


@dataclass
class CaptionerConfig:
    encoder: str  # encoder spec: timm:<name> | open_clip:<arch>:<tag> | hfclip:<dir>
    decoder: str  # decoder_model.bin | HF GPT-2 dir or id
    tokenizer: str = ""  # GPT-2 tokenizer: a dir with encoder.json + vocab.bpe (the course's) or an HF tokenizer;
    #                      empty: the files next to the decoder weights, else the cached HF gpt2 tokenizer
    projector: str = "mlp"  # linear | mlp
    conditioning: str = "prefix"  # prefix (visual tokens prepended in self-attention) | cross (gated cross-attn)
    cross_every: int = 1  # cross: a gated cross-attention layer in front of blocks 0, k, 2k, ...
    cross_dim: int = 0  # cross: inner width of each cross-attention layer (0 = the decoder's width)
    use_cls: bool = True  # keep the encoder's CLS / prefix tokens in front of the patch tokens
    visual_pool: int = 0  # average-pool the patch grid by this factor (CLS untouched); 0 = smallest that fits
    peft: str = "lora"  # lora | adapter | prefix | none
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    adapter_dim: int = 32
    prefix_len: int = 10
    trainable_budget: int = 10_000_000
    max_caption_tokens: int = 32

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaptionerConfig:
        """Build from a mapping, rejecting unknown keys with a clear error."""
        return dataclass_from_dict(cls, d, "captioner")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """LayerNorm then a linear map or a 2-layer GELU MLP from encoder width to decoder width."""
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))
    if kind == "mlp":
        return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ConfigError(f"projector must be 'linear' or 'mlp', got {kind!r}")


class Captioner(nn.Module):
    """Frozen encoder + trainable projector + PEFT decoder; `forward` gives the caption loss."""

    def __init__(self, config: CaptionerConfig, verbose: bool = True) -> None:
        super().__init__()
        from captionlab.models.decoder import load_decoder
        from captionlab.models.encoder import load_encoder

        if config.peft not in PEFT_METHODS:
            raise ConfigError(f"captioner.peft must be one of {PEFT_METHODS}, got {config.peft!r}")
        if config.conditioning not in CONDITIONINGS:
            raise ConfigError(f"captioner.conditioning must be one of {CONDITIONINGS}, got {config.conditioning!r}")
        if config.conditioning == "cross" and config.cross_every < 1:
            raise ConfigError(f"captioner.cross_every must be >= 1, got {config.cross_every}")
        self.config = config = replace(config, lora_targets=list(config.lora_targets))
        self.encoder = freeze(load_encoder(config.encoder)).eval()
        overrides = {"adapter_dim": config.adapter_dim} if config.peft == "adapter" else {}
        overrides |= {"prefix_len": config.prefix_len} if config.peft == "prefix" else {}
        if self.cross:
            overrides |= {"cross_every": config.cross_every, "cross_dim": config.cross_dim}
        if config.tokenizer:
            overrides["tokenizer"] = config.tokenizer
        gpt, self.tokenizer = load_decoder(config.decoder, **overrides)
        self.decoder = wire_decoder(gpt, config.peft, config.lora_rank, config.lora_alpha, config.lora_dropout,
                                    config.lora_targets)
        if self.cross:
            unfreeze_matching(self.decoder, [".crossattn."])
        self.projector = build_projector(config.projector, self.encoder.dim, gpt.config.n_embd)
        self.n_cls = int(self.encoder.num_prefix_tokens) if config.use_cls else 0
        if config.visual_pool < 0:
            raise ConfigError(f"captioner.visual_pool must be >= 0 (0 = auto), got {config.visual_pool}")
        if config.visual_pool == 0:  # auto: the finest grid whose tokens fit the decoder's positions
            config.visual_pool = 1 if self.cross else next(
                (k for k in range(1, max(self.encoder.grid) + 1)
                 if self.n_cls + math.ceil(self.encoder.grid[0] / k) * math.ceil(self.encoder.grid[1] / k)
                 + config.max_caption_tokens + 2 <= gpt.config.n_positions), 1)
        gh, gw = self.image_grid()
        self.n_visual = self.n_cls + gh * gw
        need = (0 if self.cross else self.n_visual) + config.max_caption_tokens + 2
        if need > gpt.config.n_positions:
            raise ConfigError(f"{self.n_visual} visual tokens + {config.max_caption_tokens} caption tokens + bos/eos "
                              f"= {need} exceed the decoder's n_positions={gpt.config.n_positions} "
                              f"(lower max_caption_tokens, raise visual_pool, or set use_cls=false)")
        self.report = self.trainable_parameters(verbose=verbose)
        check_budget(self.report, config.trainable_budget)

    # ------------------------------------------------------------------ parameters

    def trainable_parameters(self, verbose: bool = False) -> dict:
        """Report {total, trainable, share, decoder_share, groups}; printed when verbose."""
        report = parameter_report({"encoder": self.encoder, "projector": self.projector, "decoder": self.decoder})
        dec = report["groups"]["decoder"]
        report["decoder_share"] = dec["trainable"] / max(dec["total"], 1)
        if verbose:
            print(format_report(report) + f"\n(decoder: {100 * report['decoder_share']:.2f}% trainable, "
                  f"peft={self.config.peft})")
        return report

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the trainable tensors, by parameter name."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def train(self, mode: bool = True) -> Captioner:
        """Train mode for projector and decoder; the frozen encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    # ------------------------------------------------------------------ inputs

    @property
    def cross(self) -> bool:
        """True when the decoder attends to the visual tokens through gated cross-attention layers."""
        return self.config.conditioning == "cross"

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    def image_grid(self) -> tuple[int, int]:
        """(rows, cols) of the visual patch tokens the decoder sees (the encoder grid after visual_pool)."""
        gh, gw = self.encoder.grid
        k = self.config.visual_pool
        return -(-gh // k), -(-gw // k)

    def image_key_span(self) -> tuple[int, int]:
        """(start, end) of the image patch tokens (CLS excluded, row-major image_grid()) on the attention key axis
        (self-attention keys for prefix conditioning, cross-attention keys for cross conditioning)."""
        start = self.n_cls if self.cross else self.decoder.config.prefix_len + self.n_cls
        gh, gw = self.image_grid()
        return start, start + gh * gw

    def caption_token_ids(self, captions: Sequence[str]) -> list[list[int]]:
        """[bos] caption [eos] token ids per caption (truncated to max_caption_tokens), tokenized in one call."""
        tok = self.tokenizer
        if not captions:
            return []
        backend = getattr(tok, "backend_tokenizer", None)  # a fast tokenizer's Rust object: 4-5x faster than tok(...)
        if backend is not None and backend.truncation is None and backend.padding is None:
            body = [e.ids for e in backend.encode_batch(list(captions), add_special_tokens=False)]
        else:
            body = tok(list(captions), add_special_tokens=False)["input_ids"]
        bos, eos, n = [tok.bos_token_id], [tok.eos_token_id], self.config.max_caption_tokens  # looked up once
        return [bos + ids[:n] + eos for ids in body]

    def encode_captions(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids [bos] caption [eos] right-padded, and their attention mask (B, L)."""
        tok = self.tokenizer
        rows = self.caption_token_ids(captions)
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return ids, mask

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Frozen encoder features (B, n_prefix + gh*gw, dim) — what the feature cache stores."""
        return self.encoder(pixel_values.to(self.device))

    def visual_embeds(self, pixel_values: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Projected visual tokens (B, n_visual, n_embd) from pixels or cached encoder features."""
        if (pixel_values is None) == (features is None):
            raise ValueError("pass exactly one of pixel_values and features")
        feats = self.encode_images(pixel_values) if features is None else features.to(self.device)
        n_prefix = self.encoder.num_prefix_tokens
        cls, patches = feats[:, n_prefix - self.n_cls:n_prefix], feats[:, n_prefix:]
        if self.config.visual_pool > 1:
            B, _, D = patches.shape
            gh, gw = self.encoder.grid
            grid = patches.transpose(1, 2).reshape(B, D, gh, gw)
            k = self.config.visual_pool
            patches = F.avg_pool2d(grid, k, k, ceil_mode=True).flatten(2).transpose(1, 2)
        feats = torch.cat([cls, patches], dim=1)
        return self.projector(feats.to(self.projector[0].weight.dtype))

    # ------------------------------------------------------------------ training

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None,
                features: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """Caption cross-entropy (padding ignored); reduction 'mean' over tokens or 'sum'."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        vis = self.visual_embeds(pixel_values, features)
        tokens = self.decoder.embed_tokens(input_ids).to(vis.dtype)
        if self.cross:
            logits = self.decoder(inputs_embeds=tokens, attention_mask=attention_mask, cross_states=vis).logits
        else:
            B, V = vis.shape[:2]
            embeds = torch.cat([vis, tokens], dim=1)
            mask = torch.cat([torch.ones(B, V, dtype=attention_mask.dtype, device=self.device), attention_mask], 1)
            # the LM head runs on the caption positions only (position V + j predicts token j + 1)
            logits = self.decoder(inputs_embeds=embeds, attention_mask=mask, logits_from=V).logits
        pred = logits[:, :-1].float()
        target = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100,
                               reduction=reduction)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, images: Sequence[Any] | Tensor | None = None, features: Tensor | None = None,
                 method: str = "beam", beam_size: int = 3, max_new_tokens: int | None = None,
                 repetition_penalty: float = 1.0, batch_size: int = 32, threads: int = 1) -> list[str]:
        """Captions for PIL images / image paths / pixel tensors, or cached encoder features.

        threads > 1: that many batches are decoded side by side (on a CPU with one torch thread each; every batch is
        decoded exactly as it would be alone, so the captions do not depend on it)."""
        from captionlab.decode import generate as decode_generate
        from captionlab.utils import thread_pool

        was_training = self.training
        self.eval()
        n = len(features) if features is not None else len(images)
        max_new_tokens = max_new_tokens or self.config.max_caption_tokens + 1
        tok = self.tokenizer

        def caption_batch(i: int) -> list[str]:
            with torch.no_grad():  # grad mode is per thread
                if features is not None:
                    vis = self.visual_embeds(features=features[i:i + batch_size])
                else:
                    vis = self.visual_embeds(pixel_values=self._pixels(images[i:i + batch_size]))
                ids = decode_generate(self.lm_decoder(vis), method=method,
                                      beam_size=beam_size, max_new_tokens=max_new_tokens,
                                      eos_token_id=tok.eos_token_id, repetition_penalty=repetition_penalty)
            out = []
            for seq in ids:
                seq = list(seq)
                if tok.eos_token_id in seq:
                    seq = seq[:seq.index(tok.eos_token_id)]
                # An immediate eos (an untrained or early checkpoint) gives the placeholder LLaVA uses, not an empty
                # caption the evaluator would reject after hours of training.
                out.append(tok.decode(seq, skip_special_tokens=True).strip() or EMPTY_CAPTION)
            return out

        starts = range(0, n, batch_size)
        try:
            if threads > 1 and len(starts) > 1:
                batches = list(thread_pool(min(threads, len(starts))).map(caption_batch, starts))
            else:
                batches = [caption_batch(i) for i in starts]
        finally:
            self.train(was_training)
        return [caption for batch in batches for caption in batch]

    def generate_cached(self, image_paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None,
                        **kw: Any) -> list[str]:
        """`generate` for image files through the frozen-encoder feature cache (the features training validated
        on): the encoder runs once per image list, later decodings and evaluations of it reuse the stored features."""
        from captionlab.models.features import cached_features

        store = cached_features(self.encoder, self.config.encoder, image_paths, root=Path(root) if root else None)
        return self.generate(features=store, **kw)  # type: ignore[arg-type]  # sliced per batch

    def lm_decoder(self, vis: Tensor) -> Any:
        """The decoding object (`captionlab.decode.PrefixLMDecoder`) for projected visual tokens (B, V, C):
        visual prefix + bos, or bos alone with the visual tokens as cross-attention states."""
        from captionlab.decode import PrefixLMDecoder

        bos = self.tokenizer.bos_token_id
        if self.cross:
            return PrefixLMDecoder(self.decoder, vis[:, :0], bos_token_id=bos, cross_states=vis)
        return PrefixLMDecoder(self.decoder, vis, torch.ones(vis.shape[:2], dtype=torch.long, device=self.device),
                               bos_token_id=bos)

    def _pixels(self, images: Sequence[Any] | Tensor) -> Tensor:
        if isinstance(images, Tensor):
            return images
        from captionlab.data import load_image

        pil = [load_image(im) if isinstance(im, (str, os.PathLike)) else im for im in images]
        return self.encoder.preprocess(pil)

    # ------------------------------------------------------------------ checkpoints

    def save_trainable(self, path: str | os.PathLike) -> Path:
        """Write only the trainable weights (safetensors) and the config (JSON) into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / CONFIG_NAME, {"format": 1, "config": asdict(self.config),
                                               "trainable": self.report["trainable"]})
        save_safetensors_atomic(self.trainable_state_dict(), path / WEIGHTS_NAME)
        return path

    def load_trainable(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Load trainable weights; the key set must equal this model's trainable parameters exactly."""
        params = dict(self.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ConfigError(f"{source}: trainable weights do not match the captioner config: "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}")
        with torch.no_grad():
            for n, t in state.items():
                if params[n].shape != t.shape:
                    raise ConfigError(f"{source}: {n} has shape {tuple(t.shape)}, expected {tuple(params[n].shape)}")
                params[n].copy_(t)


def read_checkpoint_config(path: str | os.PathLike) -> tuple[Path, CaptionerConfig]:
    """(checkpoint dir, config) of a captioner checkpoint directory (or its weights file)."""
    path = Path(path)
    ckpt = path.parent if path.is_file() else path
    cfg_file = ckpt / CONFIG_NAME
    if not cfg_file.exists():
        raise ConfigError(f"{ckpt}: not a captioner checkpoint (no {CONFIG_NAME})")
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_file}: not valid JSON: {exc}") from None
    return ckpt, CaptionerConfig.from_dict(data["config"])


def load_captioner(path: str | os.PathLike, decoder: str | None = None, encoder: str | None = None,
                   device: str | torch.device | None = None, verbose: bool = False,
                   tokenizer: str | None = None) -> Captioner:
    """Rebuild the frozen base from the checkpoint's specs (or the given ones) and load its trainable weights."""
    from safetensors.torch import load_file

    ckpt, cfg = read_checkpoint_config(path)
    if decoder:
        cfg.decoder = str(decoder)
    if encoder:
        cfg.encoder = str(encoder)
    if tokenizer:
        cfg.tokenizer = str(tokenizer)
    model = Captioner(cfg, verbose=verbose)
    weights = ckpt / WEIGHTS_NAME
    if not weights.exists():
        raise ConfigError(f"{ckpt}: no {WEIGHTS_NAME}")
    model.load_trainable(load_file(str(weights)), source=str(weights))
    if device is not None:
        model.to(device)
    return model.eval()
