"""Frozen vision encoders that output patch tokens: timm, open_clip and HF CLIP vision towers behind one API.

Specs: `timm:<name>[@<weights file>]` (e.g. `timm:vit_large_patch14_clip_224.openai`; `@file` loads the weights
from a local safetensors / .bin instead of the hub), `open_clip:<arch>[:<pretrained tag>]`
(e.g. `open_clip:ViT-B-32:openai`), `hfclip:<dir or id>` (CLIPVisionModel; the demo tiny CLIP), or a bare path
to an HF CLIP dir. Every encoder returns (B, num_prefix_tokens + gh*gw, dim) tokens, CLS first when present,
after the tower's final layer norm.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from PIL import Image
from torch import Tensor

from captionlab.errors import ConfigError
from captionlab.models.specs import parse_spec


class VisionEncoder(nn.Module):
    """A vision tower returning tokens; `preprocess` applies the model's own resize + normalisation."""

    def __init__(self, tower: nn.Module, forward_tokens: Callable[[Tensor], Tensor], transform: Callable[[Any], Tensor],
                 dim: int, grid: tuple[int, int], num_prefix_tokens: int, image_size: tuple[int, int],
                 spec: str = "", freeze: bool = True) -> None:
        super().__init__()
        self.tower = tower
        self._forward_tokens = forward_tokens
        self._transform = transform
        self.dim, self.grid, self.num_prefix_tokens, self.image_size = dim, tuple(grid), num_prefix_tokens, tuple(image_size)
        self.spec = spec
        if freeze:
            self.freeze()

    def freeze(self) -> "VisionEncoder":
        """Turn off gradients and switch to eval mode (and keep eval under .train())."""
        self.tower.requires_grad_(False)
        self.tower.eval()
        self.frozen = True
        return self

    def train(self, mode: bool = True) -> "VisionEncoder":
        super().train(mode)
        if getattr(self, "frozen", False):
            self.tower.eval()
        return self

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels -> (B, num_prefix_tokens + gh*gw, dim) tokens."""
        p = next(self.tower.parameters())
        return self._forward_tokens(pixel_values.to(device=p.device, dtype=p.dtype))

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """PIL images -> (B, 3, H, W) pixel tensor with this encoder's resize and normalisation."""
        return torch.stack([self._transform(im.convert("RGB")) for im in images])


def load_encoder(spec: str, pretrained: bool = True, freeze: bool = True, **model_kwargs: Any) -> VisionEncoder:
    """Build a VisionEncoder from `timm:<name>`, `open_clip:<arch>[:<tag>]` or `hfclip:<dir>` (frozen by default).

    model_kwargs go to timm.create_model (e.g. img_size) for timm specs.
    """
    parsed = parse_spec(spec, allowed=("timm", "open_clip", "hfclip", "hf", "path"), what="encoder")
    if parsed.kind == "timm":
        return _timm_encoder(parsed.name, parsed.weights, pretrained, freeze, spec, **model_kwargs)
    if parsed.kind == "open_clip":
        return _open_clip_encoder(parsed.name, parsed.tag, pretrained, freeze, spec)
    if parsed.kind in ("hfclip", "hf") or Path(parsed.name).is_dir():
        return _hf_clip_encoder(parsed.name, pretrained, freeze, spec)
    raise ConfigError(f"encoder spec {spec!r}: expected timm:<name>, open_clip:<arch>[:<tag>] or hfclip:<dir>")


def _timm_encoder(name: str, weights: str | None, pretrained: bool, freeze: bool, spec: str,
                  **kwargs: Any) -> VisionEncoder:
    import timm

    if weights:  # timm:<name>@<file>: the weights from a local file (no hub), e.g. a manually copied checkpoint
        if not Path(weights).is_file():
            raise ConfigError(f"encoder {spec!r}: weights file {weights} does not exist")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except Exception as exc:  # noqa: BLE001 - unknown name or weights missing offline
        raise ConfigError(f"encoder {spec!r}: timm cannot create it ({type(exc).__name__}: {exc})") from None
    if not hasattr(model, "patch_embed"):
        raise ConfigError(f"encoder {spec!r}: not a ViT-like timm model (no patch_embed): no token grid")
    cfg = timm.data.resolve_model_data_config(model)
    cfg["input_size"] = (3, *model.patch_embed.img_size)  # honour an img_size override
    transform = timm.data.create_transform(**cfg)
    grid = tuple(model.patch_embed.grid_size)
    return VisionEncoder(model, model.forward_features, transform, dim=model.num_features, grid=grid,
                         num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
                         image_size=tuple(model.patch_embed.img_size), spec=spec, freeze=freeze)


def _open_clip_encoder(arch: str, tag: str | None, pretrained: bool, freeze: bool, spec: str) -> VisionEncoder:
    import open_clip

    try:
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=(tag or None) if pretrained else None)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"encoder {spec!r}: open_clip cannot create it ({type(exc).__name__}: {exc})") from None
    visual = model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise ConfigError(f"encoder {spec!r}: only open_clip ViT towers give token grids, got {type(visual).__name__}")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        raise ConfigError(f"encoder {spec!r}: attention-pool / final-LN-after-pool towers are not supported")

    def tokens(pixel_values: Tensor) -> Tensor:
        x = visual.transformer(visual._embeds(pixel_values))
        return visual.ln_post(x)

    width = visual.ln_post.normalized_shape[0]
    return VisionEncoder(visual, tokens, transform, dim=width, grid=tuple(visual.grid_size), num_prefix_tokens=1,
                         image_size=tuple(visual.image_size), spec=spec, freeze=freeze)


def _hf_clip_encoder(source: str, pretrained: bool, freeze: bool, spec: str) -> VisionEncoder:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full CLIP dir's text-tower keys are expected to be unused
    try:
        if pretrained:
            model = CLIPVisionModel.from_pretrained(source)
        else:
            model = CLIPVisionModel(CLIPVisionConfig.from_pretrained(source))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"encoder {spec!r}: cannot load an HF CLIP vision model from {source} "
                          f"({type(exc).__name__}: {exc})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    cfg = model.config
    try:
        processor = CLIPImageProcessor.from_pretrained(source)
    except Exception:  # noqa: BLE001 - no preprocessor_config.json: CLIP defaults at the model's size
        processor = CLIPImageProcessor(size={"shortest_edge": cfg.image_size},
                                       crop_size={"height": cfg.image_size, "width": cfg.image_size})

    def transform(image: Image.Image) -> Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    tower = getattr(model, "vision_model", model)  # transformers 4.x nests the tower; 5.x does not

    def tokens(pixel_values: Tensor) -> Tensor:
        return tower.post_layernorm(model(pixel_values=pixel_values).last_hidden_state)

    g = cfg.image_size // cfg.patch_size
    return VisionEncoder(model, tokens, transform, dim=cfg.hidden_size, grid=(g, g), num_prefix_tokens=1,
                         image_size=(cfg.image_size, cfg.image_size), spec=spec, freeze=freeze)
