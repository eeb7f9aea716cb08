"""One CLIP interface over open_clip and HF `CLIPModel`: load by spec, encode images and texts (L2-normalised).

Specs: `open_clip:ViT-B-32:openai` (open_clip with pretrained tag; `open_clip:ARCH` alone = random weights),
`hf:<dir or hub id>`, or a plain path to an HF CLIP directory (CLIPModel + CLIPProcessor), like the demo CLIP.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from captionlab.errors import ConfigError
from captionlab.models.specs import parse_spec
from captionlab.utils import default_dtype, get_device


def demo_clip_hint() -> str:
    """Where the demo CLIP lives (offline alternative to hub models) and how to build it."""
    from captionlab.demo import world_root

    path = world_root(0) / "models" / "clip"
    built = "" if path.is_dir() else " (not built yet: `captionlab world build --models`)"
    return f"offline, use the demo CLIP instead: --clip {path}{built}"


class ClipBackend:
    """A loaded CLIP model (eval mode, no grad): `encode_images`, `encode_texts`, `logit_scale`, `vision_model`."""

    def __init__(self, name: str, model: nn.Module, device: torch.device, dtype: torch.dtype, context_length: int,
                 logit_scale: float, preprocess: Callable[[Sequence[Any]], Tensor],
                 tokenize: Callable[[Sequence[str]], dict[str, Tensor]],
                 image_features: Callable[[Tensor], Tensor], text_features: Callable[..., Tensor],
                 vision_model: nn.Module, kind: str, embed_dim: int) -> None:
        self.name, self.model, self.device, self.dtype, self.kind = name, model, device, dtype, kind
        self.embed_dim = int(embed_dim)
        self.context_length, self.logit_scale = int(context_length), float(logit_scale)
        self._preprocess, self._tokenize = preprocess, tokenize
        self._image_features, self._text_features = image_features, text_features
        self._vision_model = vision_model

    def __repr__(self) -> str:
        return f"ClipBackend({self.name!r}, kind={self.kind}, device={self.device}, ctx={self.context_length})"

    @property
    def vision_model(self) -> nn.Module:
        """The vision transformer module (open_clip `model.visual` / HF `model.vision_model`)."""
        return self._vision_model

    def preprocess(self, images: Sequence[Any]) -> Tensor:
        """PIL images -> pixel tensor (N, 3, H, W) in the model's preprocessing, on CPU."""
        return self._preprocess(images)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any], batch_size: int = 64, progress: bool | None = None) -> Tensor:
        """Embed PIL images: (N, D) float32 on CPU, L2-normalised."""
        out = []
        for i in tqdm(range(0, len(images), batch_size), desc="clip images", leave=False,
                      disable=_quiet(progress, len(images), batch_size)):
            pixels = self._preprocess(images[i:i + batch_size]).to(self.device, self.dtype)
            out.append(self._image_features(pixels).float().cpu())
        return _normalise(out, self.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool | None = None) -> Tensor:
        """Embed texts (truncated to `context_length` tokens): (N, D) float32 on CPU, L2-normalised."""
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode_texts expects strings, got {type(bad[0]).__name__}")
        out = []
        for i in tqdm(range(0, len(texts), batch_size), desc="clip texts", leave=False,
                      disable=_quiet(progress, len(texts), batch_size)):
            tokens = {k: v.to(self.device) for k, v in self._tokenize(list(texts[i:i + batch_size])).items()}
            out.append(self._text_features(**tokens).float().cpu())
        return _normalise(out, self.embed_dim)


def _quiet(progress: bool | None, n: int, batch_size: int) -> bool:
    """Hide the progress bar unless asked for, or (by default) unless there are more than 4 batches."""
    return not progress if progress is not None else n <= 4 * batch_size


def _normalise(chunks: list[Tensor], dim: int) -> Tensor:
    if not chunks:
        return torch.zeros(0, dim)
    return F.normalize(torch.cat(chunks).float(), dim=-1)


def _pooled(out: Any) -> Tensor:
    """Projected features from `get_*_features` (a tensor in transformers 4, an output object in 5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


# ----------------------------------------------------------------------------------------------------------
# Loaders


def _load_open_clip(spec: str, arch: str, tag: str | None, device: torch.device) -> ClipBackend:
    import open_clip

    if arch not in open_clip.list_models() and not arch.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"CLIP spec {spec!r}: unknown open_clip architecture {arch!r} "
                          f"(e.g. ViT-B-32, ViT-L-14; see open_clip.list_models())")
    dtype = default_dtype(device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag or None, device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as exc:  # hub downloads fail in many ways offline (OSError, RuntimeError, LocalEntryNotFound...)
        raise ConfigError(f"CLIP spec {spec!r}: cannot load open_clip {arch} weights {tag!r} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          f"{demo_clip_hint()}") from None
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    ctx = int(getattr(model, "context_length", None) or getattr(tokenizer, "context_length", 77))

    def tokenize(texts: Sequence[str]) -> dict[str, Tensor]:
        return {"text": tokenizer(list(texts), context_length=ctx)}  # truncates, keeps EOT last

    return ClipBackend(
        name=spec, model=model, device=device, dtype=dtype, context_length=ctx,
        logit_scale=float(model.logit_scale.exp().item()),
        preprocess=lambda images: torch.stack([preprocess(im) for im in images]),
        tokenize=tokenize, image_features=model.encode_image, text_features=lambda text: model.encode_text(text),
        vision_model=model.visual, kind="open_clip", embed_dim=int(model.visual.output_dim))


def _load_hf(spec: str, source: str, device: torch.device) -> ClipBackend:
    from transformers import CLIPModel, CLIPProcessor

    if source.startswith((os.path.sep, ".", "~")) and not Path(source).expanduser().exists():
        raise ConfigError(f"CLIP spec {spec!r}: directory {source} not found; {demo_clip_hint()}")
    source = str(Path(source).expanduser()) if source.startswith("~") else source
    dtype = default_dtype(device)
    try:
        model = CLIPModel.from_pretrained(source, dtype=dtype)
        processor = CLIPProcessor.from_pretrained(source)
    except Exception as exc:
        raise ConfigError(f"CLIP spec {spec!r}: cannot load an HF CLIP from {source} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          f"{demo_clip_hint()}") from None
    model = model.to(device).eval().requires_grad_(False)
    tok, image_processor = processor.tokenizer, processor.image_processor
    ctx = int(model.config.text_config.max_position_embeddings)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)

    def tokenize(texts: Sequence[str]) -> dict[str, Tensor]:
        # Truncate like OpenAI's clip.tokenize(truncate=True): keep the first ctx-1 tokens and end with EOS,
        # since HF CLIP pools the text at the EOS position.
        ids = tok(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
        rows = []
        for seq in ids:
            if len(seq) > ctx:
                seq = seq[:ctx - 1] + [eos if eos is not None else seq[-1]]
            rows.append(seq)
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def preprocess(images: Sequence[Any]) -> Tensor:
        return image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    return ClipBackend(
        name=spec, model=model, device=device, dtype=dtype, context_length=ctx,
        logit_scale=float(model.logit_scale.exp().item()), preprocess=preprocess, tokenize=tokenize,
        image_features=lambda pixels: _pooled(model.get_image_features(pixel_values=pixels)),
        text_features=lambda **kw: _pooled(model.get_text_features(**kw)),
        vision_model=model.vision_model, kind="hf", embed_dim=int(model.config.projection_dim))


@functools.lru_cache(maxsize=4)
def _load_cached(spec: str, device: str, fingerprint: str) -> ClipBackend:
    dev = torch.device(device)
    parsed = parse_spec(spec, what="CLIP")
    if parsed.kind == "open_clip":
        return _load_open_clip(spec, parsed.name, parsed.tag, dev)
    if parsed.kind in ("hf", "hfclip") or (parsed.kind == "path" and Path(parsed.name).is_dir()):
        return _load_hf(spec, parsed.name, dev)
    raise ConfigError(f"CLIP spec {spec!r}: not an existing directory, and not open_clip:ARCH[:TAG] or hf:<id or dir>; "
                      f"{demo_clip_hint()}")


def load_clip(spec: str | os.PathLike | ClipBackend, device: str | torch.device | None = None) -> ClipBackend:
    """Load a CLIP by spec (cached per spec and device); a ClipBackend passes through unchanged."""
    if isinstance(spec, ClipBackend):
        return spec
    spec = str(spec)
    if not spec:
        raise ConfigError(f"empty CLIP spec; {demo_clip_hint()}")
    if Path(spec).expanduser().is_dir():
        spec = str(Path(spec).expanduser().resolve())
    dev = get_device(str(device)) if device is not None else get_device()
    return _load_cached(spec, str(dev), _fingerprint(spec))


def _fingerprint(spec: str) -> str:
    """Sizes and mtimes of a local checkpoint's files, so a rebuilt directory is reloaded."""
    p = parse_spec(spec, what="CLIP").local_path
    if p is None or not p.is_dir():
        return ""
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(p.iterdir()) if f.is_file())


def clear_cache() -> None:
    """Forget loaded CLIP models (e.g. after rebuilding a checkpoint directory)."""
    _load_cached.cache_clear()
