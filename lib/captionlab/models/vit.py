"""ViT image classifiers and their analysis: fine-tuning, position-embedding similarity, [CLS] attention maps.

One wrapper, `ViTClassifier`, covers a timm ViT built by name (`timm:vit_base_patch16_224`) and the vision
tower of an HF CLIP checkpoint (`hfclip:<dir>`) plus a linear head. The analysis functions accept the wrapper,
a bare timm `VisionTransformer`, an HF `CLIPVisionModel` / `CLIPModel`, an open_clip `VisionTransformer` /
`CLIP`, or a `captionlab.models.clip.ClipBackend` (its `vision_model`).

[CLS] attention is recomputed from the captured input of one attention module (a forward pre-hook) with that
module's own q/k projections, so it works whatever attention kernel (sdpa, flash, fused) the model runs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from captionlab.errors import ConfigError, DataError
from captionlab.models.specs import parse_spec

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------------
# Model


class ViTClassifier(nn.Module):
    """A ViT backbone returning pooled features, a linear head, and the preprocessing it expects."""

    def __init__(self, backbone: nn.Module, head: nn.Module, kind: str, image_size: int,
                 mean: Sequence[float], std: Sequence[float], spec: str = "") -> None:
        super().__init__()
        self.backbone, self.head, self.kind, self.spec = backbone, head, kind, spec
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)

    def features(self, pixel_values: Tensor) -> Tensor:
        """Pooled image features (B, D): timm's pooled output, or CLIP's post-layernorm [CLS]."""
        if self.kind == "hfclip":
            return self.backbone(pixel_values=pixel_values).pooler_output
        return self.backbone(pixel_values)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(pixel_values))

    def transform(self, train: bool = False):
        """A torchvision transform PIL -> normalised tensor at the model's resolution (flip when `train`)."""
        from torchvision import transforms as T

        steps: list[Any] = [T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
                            T.CenterCrop(self.image_size)]
        if train:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)


def load_vit(spec: str, num_classes: int, pretrained: bool = True, **timm_kwargs: Any) -> ViTClassifier:
    """Build a classifier from `timm:<name>` (pretrained weights optional) or `hfclip:<dir>` (CLIP vision tower)."""
    parsed = parse_spec(spec, allowed=("timm", "hfclip"), what="ViT")
    kind, name = parsed.kind, parsed.name
    if kind == "timm":
        import timm

        weights = parsed.weights
        if weights:  # timm:<name>@<file>: weights from a local safetensors / .bin (no hub), as for the encoder
            if not Path(weights).is_file():
                raise ConfigError(f"ViT spec {spec!r}: weights file {weights} does not exist")
            timm_kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        if not timm.is_model(name):
            raise ConfigError(f"ViT spec {spec!r}: unknown timm model {name!r} (see timm.list_models('vit_*'))")
        try:
            backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
        except Exception as exc:  # offline hub downloads fail in many ways
            raise ConfigError(f"ViT spec {spec!r}: cannot build it ({type(exc).__name__}: {exc}); "
                              f"offline, pass pretrained=False or a local checkpoint") from None
        cfg = timm.data.resolve_model_data_config(backbone)
        size = backbone.patch_embed.img_size[-1] if hasattr(backbone, "patch_embed") else cfg["input_size"][-1]
        head = nn.Linear(backbone.num_features, num_classes)
        return ViTClassifier(backbone, head, "timm", size, cfg["mean"], cfg["std"], spec)
    if kind == "hfclip":
        from transformers import CLIPVisionModel

        path = Path(name)
        if not (path / "config.json").exists():
            raise ConfigError(f"ViT spec {spec!r}: {path / 'config.json'} not found (expected an HF CLIP dir)")
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a full CLIP dir: the text tower's weights are expected leftovers
        try:
            backbone = CLIPVisionModel.from_pretrained(path)
        finally:
            hf_logging.set_verbosity(level)
        mean, std = _clip_norm(path)
        head = nn.Linear(backbone.config.hidden_size, num_classes)
        return ViTClassifier(backbone, head, "hfclip", backbone.config.image_size, mean, std, spec)
    raise ConfigError(f"ViT spec {spec!r}: expected 'timm:<model name>' or 'hfclip:<CLIP dir>'")


def _clip_norm(path: Path) -> tuple[Sequence[float], Sequence[float]]:
    """Image mean/std from the dir's preprocessor_config.json, else CLIP's."""
    pre = path / "preprocessor_config.json"
    if pre.exists():
        cfg = json.loads(pre.read_text())
        return cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
    return CLIP_MEAN, CLIP_STD


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning on a `<label_id>_<n>.png` folder


def labelled_images(images_dir: str | os.PathLike) -> list[tuple[Path, int]]:
    """(path, label id) for every image in a folder named `<label_id>_<n>.<ext>`, sorted by name."""
    from captionlab.models.zeroshot import label_from_filename, list_image_files

    return [(p, label_from_filename(p.name)) for p in list_image_files(images_dir)]


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[Path, int]], transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from captionlab.models.zeroshot import open_image

        path, label = self.items[i]
        return self.transform(open_image(path)), label


def _load_id2label(id2label: dict | str | os.PathLike) -> dict[int, str]:
    if not isinstance(id2label, dict):
        from captionlab.models.zeroshot import load_id2label

        return load_id2label(id2label)
    return {int(k): str(v) for k, v in id2label.items()}


@torch.no_grad()
def evaluate_classifier(model: ViTClassifier, images_dir: str | os.PathLike, batch_size: int = 64,
                        device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of `model` on a `<label_id>_<n>.png` folder."""
    from tqdm.auto import tqdm

    device = torch.device(device) if device else next(model.parameters()).device
    loader = torch.utils.data.DataLoader(_FolderDataset(labelled_images(images_dir), model.transform()),
                                         batch_size=batch_size)
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in tqdm(loader, desc="eval", leave=False):
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def finetune_classifier(model: ViTClassifier, train_dir: str | os.PathLike, val_dir: str | os.PathLike,
                        id2label: dict | str | os.PathLike, epochs: int = 3, lr: float = 3e-4,
                        batch_size: int = 32, weight_decay: float = 0.05, seed: int = 0,
                        head_lr_mult: float = 10.0, augment: bool = True,
                        device: str | torch.device | None = None) -> list[dict[str, float]]:
    """Fine-tune the whole model with AdamW (cosine schedule); return per-epoch train loss/acc and val acc."""
    from tqdm.auto import tqdm

    from captionlab.utils import get_device, set_seed

    labels = _load_id2label(id2label)
    items = labelled_images(train_dir)
    if not items:
        raise DataError(f"{train_dir}: no images")
    unknown = sorted({y for _, y in items} - set(labels))
    if unknown:
        raise DataError(f"{train_dir}: label ids {unknown[:5]} are not in id2label")
    n_out = model.head.out_features if isinstance(model.head, nn.Linear) else None
    if n_out is not None and max(labels) >= n_out:
        raise ConfigError(f"model head has {n_out} outputs but id2label has ids up to {max(labels)}")
    set_seed(seed)
    device = get_device(str(device) if device is not None else None)
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(_FolderDataset(items, model.transform(train=augment)),
                                         batch_size=batch_size, shuffle=True, generator=gen, drop_last=False)
    opt = torch.optim.AdamW([{"params": model.backbone.parameters(), "lr": lr},
                             {"params": model.head.parameters(), "lr": lr * head_lr_mult}],
                            weight_decay=weight_decay)
    steps = max(epochs * len(loader), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        loss_sum = correct = seen = 0.0
        for x, y in tqdm(loader, desc=f"finetune {epoch}/{epochs}", leave=False):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += float((logits.argmax(-1) == y).sum())
            seen += len(y)
        val_acc = evaluate_classifier(model, val_dir, batch_size=batch_size * 2, device=device)
        history.append({"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                        "val_acc": val_acc})
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------------------
# Introspection shared by the analysis functions


@dataclass
class _ViTParts:
    kind: str  # "timm" | "hfclip" | "open_clip"
    module: nn.Module  # the backbone (timm / open_clip VisionTransformer, HF CLIPVisionModel)
    grid: tuple[int, int]
    num_prefix: int  # tokens before the patches ([CLS], register tokens)


def _parts(model: nn.Module) -> _ViTParts:
    if isinstance(model, ViTClassifier):
        model = model.backbone
    if hasattr(model, "vision_model"):  # HF CLIPModel / CLIPVisionModelWithProjection / ClipBackend
        model = model.vision_model
    elif hasattr(model, "visual") and hasattr(model.visual, "positional_embedding"):  # open_clip CLIP
        model = model.visual
    if hasattr(model, "embeddings") and hasattr(model.embeddings, "position_embedding"):
        emb = model.embeddings
        side = emb.image_size // emb.patch_size
        return _ViTParts("hfclip", model, (side, side), 1)
    if hasattr(model, "positional_embedding") and hasattr(model, "transformer"):  # open_clip VisionTransformer
        if getattr(model, "attn_pool", None) is not None or model.positional_embedding.shape[0] != \
                model.grid_size[0] * model.grid_size[1] + 1:
            raise ConfigError("open_clip VisionTransformer without a [CLS] token / learned position embeddings")
        return _ViTParts("open_clip", model, tuple(model.grid_size), 1)
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        if getattr(model, "cls_token", None) is None:
            raise ConfigError(f"{type(model).__name__}: no [CLS] token (global-pool ViT); CLS maps undefined")
        return _ViTParts("timm", model, tuple(model.patch_embed.grid_size), model.num_prefix_tokens)
    raise ConfigError(f"{type(model).__name__}: not a timm ViT or an HF CLIP vision model")


def _patch_position_embeddings(parts: _ViTParts) -> Tensor:
    m = parts.module
    if parts.kind == "hfclip":
        return m.embeddings.position_embedding.weight[parts.num_prefix:]
    if parts.kind == "open_clip":
        return m.positional_embedding[parts.num_prefix:]
    if m.pos_embed is None:
        raise ConfigError(f"{type(m).__name__}: has no learned position embeddings")
    pos = m.pos_embed[0]
    return pos if m.no_embed_class else pos[parts.num_prefix:]


def _attention_modules(parts: _ViTParts) -> list[nn.Module]:
    if parts.kind == "hfclip":
        return [layer.self_attn for layer in parts.module.encoder.layers]
    if parts.kind == "open_clip":
        return [block.attn for block in parts.module.transformer.resblocks]
    return [block.attn for block in parts.module.blocks]


def _attention_probs(parts: _ViTParts, attn: nn.Module, x: Tensor) -> Tensor:
    """Softmax attention (B, H, N, N) of module `attn` given its input tokens `x` (B, N, C)."""
    if parts.kind == "open_clip":  # nn.MultiheadAttention: packed in_proj, maybe sequence-first
        if not getattr(parts.module.transformer, "batch_first", True):
            x = x.transpose(0, 1)
        B, N, C = x.shape
        hd = C // attn.num_heads
        q, k, _ = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k = (t.reshape(B, N, attn.num_heads, hd).transpose(1, 2) for t in (q, k))
        return ((q * hd ** -0.5) @ k.transpose(-2, -1)).float().softmax(dim=-1)
    B, N, _ = x.shape
    if parts.kind == "hfclip":
        q = attn.q_proj(x).view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    else:
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Position embeddings


@torch.no_grad()
def position_embedding_similarity(model: nn.Module) -> Tensor:
    """Cosine similarity of each patch's position embedding with every other's: (gh, gw, gh, gw), CLS excluded."""
    parts = _parts(model)
    gh, gw = parts.grid
    pos = _patch_position_embeddings(parts).float()
    if pos.shape[0] != gh * gw:
        raise ConfigError(f"{pos.shape[0]} patch position embeddings do not fill a {gh}x{gw} grid")
    pos = F.normalize(pos, dim=-1)
    return (pos @ pos.T).reshape(gh, gw, gh, gw).cpu()


def plot_position_similarity(sim: Tensor, title: str | None = None, cmap: str = "viridis") -> "Figure":
    """One small similarity map per patch, arranged on the patch grid (as in the ViT paper, fig. 7)."""
    import matplotlib.pyplot as plt

    sim = torch.as_tensor(sim).float()
    gh, gw = sim.shape[:2]
    # One mosaic image with a 1-pixel NaN gutter is much faster to draw than gh*gw axes.
    mosaic = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan, dtype=np.float32)
    for i in range(gh):
        for j in range(gw):
            mosaic[i * (gh + 1):i * (gh + 1) + gh, j * (gw + 1):j * (gw + 1) + gw] = sim[i, j].numpy()
    fig, ax = plt.subplots(figsize=(6.5, 6), layout="constrained")
    cm = plt.get_cmap(cmap).with_extremes(bad="white")
    im = ax.imshow(mosaic, cmap=cm, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([j * (gw + 1) + (gw - 1) / 2 for j in range(gw)], [str(j + 1) for j in range(gw)])
    ax.set_yticks([i * (gh + 1) + (gh - 1) / 2 for i in range(gh)], [str(i + 1) for i in range(gh)])
    ax.tick_params(length=0, labelsize=7)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(title or "Position embedding similarity")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    return fig


# ----------------------------------------------------------------------------------------------------------
# [CLS] attention


@torch.no_grad()
def cls_attention(model: nn.Module, pixel_values: Tensor, layer: int = -1,
                  heads: str | int | None = "mean") -> Tensor:
    """The [CLS] token's attention to the patches in one layer, rows renormalised to sum 1 over patches.

    Returns (B, gh, gw) for heads="mean" (average over heads) or an int head index, (B, H, gh, gw) for None.
    """
    parts = _parts(model)
    modules = _attention_modules(parts)
    try:
        attn = modules[layer]
    except IndexError:
        raise ConfigError(f"layer {layer} out of range: the model has {len(modules)} layers") from None
    captured: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else next(kwargs[k] for k in ("hidden_states", "x", "query") if k in kwargs))

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    was_training = parts.module.training
    parts.module.eval()
    try:
        param = next(parts.module.parameters())
        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        if parts.kind == "hfclip":
            parts.module(pixel_values=pixel_values)
        elif parts.kind == "open_clip":
            parts.module(pixel_values)
        else:
            parts.module.forward_features(pixel_values)
    finally:
        handle.remove()
        parts.module.train(was_training)
    if not captured:
        raise RuntimeError(f"layer {layer}'s attention module was not called")
    probs = _attention_probs(parts, attn, captured[0])  # (B, H, N, N)
    gh, gw = parts.grid
    cls = probs[:, :, 0, parts.num_prefix:]
    if cls.shape[-1] != gh * gw:
        raise ConfigError(f"{cls.shape[-1]} patch tokens do not fill a {gh}x{gw} grid (image size mismatch?)")
    cls = cls / cls.sum(-1, keepdim=True)
    if heads == "mean":
        cls = cls.mean(1)
    elif isinstance(heads, int):
        cls = cls[:, heads]
    elif heads is not None:
        raise ConfigError(f"heads must be 'mean', an int or None, not {heads!r}")
    return cls.reshape(*cls.shape[:-1], gh, gw).cpu()


def upsample_map(attn_map: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly upsample a (gh, gw) map to (H, W) and rescale it to [0, 1]."""
    m = F.interpolate(torch.as_tensor(attn_map).float()[None, None], size=size, mode="bilinear",
                      align_corners=False)[0, 0]
    m = m - m.min()
    return (m / m.max().clamp_min(1e-12)).numpy()


def plot_cls_attention(images: Sequence["Image.Image | np.ndarray"], maps: Tensor,
                       titles: Sequence[str] | None = None, alpha: float = 0.55, cmap: str = "jet") -> "Figure":
    """Each image next to its [CLS] attention map upsampled (bilinear) and overlaid."""
    import matplotlib.pyplot as plt

    maps = torch.as_tensor(maps)
    if maps.ndim != 3 or len(maps) != len(images):
        raise ValueError(f"expected maps (B, gh, gw) for {len(images)} images, got {tuple(maps.shape)}")
    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(5, 2.5 * n), squeeze=False)
    for i, (img, m) in enumerate(zip(images, maps)):
        arr = np.asarray(img)
        heat = upsample_map(m, arr.shape[:2])
        axes[i, 0].imshow(arr)
        axes[i, 0].set_title(titles[i] if titles else "image", fontsize=9)
        axes[i, 1].imshow(arr)
        axes[i, 1].imshow(heat, cmap=cmap, alpha=alpha)
        axes[i, 1].set_title("[CLS] attention", fontsize=9)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    return fig


def pixel_values_for(model: ViTClassifier, images: Sequence["Image.Image"]) -> Tensor:
    """Preprocess PIL images into the (B, 3, S, S) batch `model` expects."""
    tf = model.transform()
    return torch.stack([tf(img.convert("RGB")) for img in images])
