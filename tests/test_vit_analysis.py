"""ViT analysis on small constructed models (HF CLIP, timm, open_clip): position similarity and [CLS] maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captionlab.errors import ConfigError
from captionlab.models import vit


@pytest.fixture(scope="module")
def tiny_hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random HF CLIP with a 32 px, patch-8 vision tower (4x4 grid + CLS, 4 heads)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    out = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_vit(tiny_hf_clip_dir: Path) -> vit.ViTClassifier:
    return vit.load_vit(f"hfclip:{tiny_hf_clip_dir}", num_classes=3)


@pytest.fixture(scope="module")
def timm_vit() -> vit.ViTClassifier:
    torch.manual_seed(0)
    return vit.load_vit("timm:vit_tiny_patch16_224", num_classes=3, pretrained=False, img_size=48, depth=2)


@pytest.fixture(scope="module")
def open_clip_visual() -> torch.nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2,
                             output_dim=16).eval()


def test_load_vit(hf_vit: vit.ViTClassifier, timm_vit: vit.ViTClassifier, tmp_path: Path) -> None:
    assert hf_vit.kind == "hfclip" and hf_vit.image_size == 32
    assert timm_vit.kind == "timm" and timm_vit.image_size == 48
    assert hf_vit(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert timm_vit(torch.randn(2, 3, 48, 48)).shape == (2, 3)
    with pytest.raises(ConfigError, match="ViT spec 'resnet50': expected timm:"):
        vit.load_vit("resnet50", 3)
    with pytest.raises(ConfigError, match="unknown timm model"):
        vit.load_vit("timm:no_such_vit", 3, pretrained=False)
    with pytest.raises(ConfigError, match="config.json"):
        vit.load_vit(f"hfclip:{tmp_path}", 3)


@pytest.mark.parametrize("which", ["hf", "timm", "open_clip"])
def test_position_similarity_grid(which: str, hf_vit, timm_vit, open_clip_visual) -> None:
    model, grid = {"hf": (hf_vit, 4), "timm": (timm_vit, 3), "open_clip": (open_clip_visual, 4)}[which]
    sim = vit.position_embedding_similarity(model)
    assert sim.shape == (grid, grid, grid, grid)
    flat = sim.reshape(grid * grid, grid * grid)
    assert torch.allclose(flat.diagonal(), torch.ones(grid * grid), atol=1e-5)
    assert torch.equal(flat.argmax(dim=1), torch.arange(grid * grid))  # each patch is most similar to itself
    assert torch.allclose(flat, flat.T, atol=1e-6)
    fig = vit.plot_position_similarity(sim)
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (grid * (grid + 1) - 1,) * 2
    assert np.isclose(image[0, 0], float(sim[0, 0, 0, 0]))


def _reference_hf(model: vit.ViTClassifier, x: torch.Tensor) -> torch.Tensor:
    """[CLS] -> patch rows from transformers' own eager attention weights (output_attentions)."""
    import copy

    bb = copy.deepcopy(model.backbone)
    bb.set_attn_implementation("eager")
    with torch.no_grad():
        att = bb(pixel_values=x, output_attentions=True).attentions[-1]
    rows = att[:, :, 0, 1:]
    return rows / rows.sum(-1, keepdim=True)


def _reference_timm(model: vit.ViTClassifier, x: torch.Tensor) -> torch.Tensor:
    """[CLS] -> patch rows from timm's non-fused attention path (softmax output seen by attn_drop)."""
    attn = model.backbone.blocks[-1].attn
    seen: list[torch.Tensor] = []
    fused, attn.fused_attn = attn.fused_attn, False
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model.backbone.eval().forward_features(x)
    finally:
        handle.remove()
        attn.fused_attn = fused
    rows = seen[0][:, :, 0, model.backbone.num_prefix_tokens:]
    return rows / rows.sum(-1, keepdim=True)


@pytest.mark.parametrize("which", ["hf", "timm"])
def test_cls_attention_matches_library_attention(which: str, hf_vit, timm_vit) -> None:
    torch.manual_seed(1)
    model, size, grid = {"hf": (hf_vit, 32, 4), "timm": (timm_vit, 48, 3)}[which]
    x = torch.randn(2, 3, size, size)
    per_head = vit.cls_attention(model, x, heads=None)
    heads = 4 if which == "hf" else 3
    assert per_head.shape == (2, heads, grid, grid)
    ref = (_reference_hf if which == "hf" else _reference_timm)(model, x)
    assert torch.allclose(per_head.reshape(2, heads, -1), ref, atol=1e-5)
    mean = vit.cls_attention(model, x)
    assert mean.shape == (2, grid, grid)
    assert torch.allclose(mean.sum((-1, -2)), torch.ones(2), atol=1e-5)
    assert torch.allclose(mean, per_head.mean(1), atol=1e-6)
    assert torch.equal(vit.cls_attention(model, x, heads=1), per_head[:, 1])
    first = vit.cls_attention(model, x, layer=0)
    assert not torch.allclose(first, mean)  # a different layer gives a different map


def test_cls_attention_open_clip(open_clip_visual) -> None:
    x = torch.randn(3, 3, 32, 32)
    maps = vit.cls_attention(open_clip_visual, x)
    assert maps.shape == (3, 4, 4)
    assert torch.allclose(maps.sum((-1, -2)), torch.ones(3), atol=1e-5)
    mha = open_clip_visual.transformer.resblocks[-1].attn
    seen: list[torch.Tensor] = []
    handle = mha.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        open_clip_visual(x)
    handle.remove()
    _, w = mha(seen[0], seen[0], seen[0], need_weights=True, average_attn_weights=False)
    rows = w[:, :, 0, 1:] / w[:, :, 0, 1:].sum(-1, keepdim=True)
    assert torch.allclose(maps, rows.mean(1).reshape(3, 4, 4).detach(), atol=1e-5)


def test_cls_attention_errors(hf_vit) -> None:
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ConfigError, match="out of range"):
        vit.cls_attention(hf_vit, x, layer=5)
    with pytest.raises(ConfigError, match="heads"):
        vit.cls_attention(hf_vit, x, heads="max")
    with pytest.raises(ConfigError, match="not a timm ViT"):
        vit.cls_attention(torch.nn.Linear(2, 2), x)


def test_plot_cls_attention(hf_vit) -> None:
    images = [Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)) for i in range(3)]
    maps = vit.cls_attention(hf_vit, vit.pixel_values_for(hf_vit, images))
    fig = vit.plot_cls_attention(images, maps, titles=["a", "b", "c"])
    assert len(fig.axes) == 6
    overlay = fig.axes[1].images[1].get_array()
    assert overlay.shape == (32, 32) and overlay.min() == 0 and np.isclose(overlay.max(), 1)
    up = vit.upsample_map(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), (4, 4))
    assert up.shape == (4, 4) and (np.diff(up, axis=1) >= 0).all()  # bilinear: monotone left to right
    with pytest.raises(ValueError, match="expected maps"):
        vit.plot_cls_attention(images[:2], maps)
