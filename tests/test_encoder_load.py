"""Vision encoders: timm / open_clip / HF CLIP towers give (B, prefix + grid, dim) tokens, frozen, own preprocessing."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from captionlab.errors import ConfigError
from captionlab.models.encoder import load_encoder

IMAGES = [Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("L", (40, 40), 90)]



def check_frozen(enc) -> None:
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.tower.training  # stays in eval mode inside a model put in training mode


def test_timm_vit_with_registers():
    enc = load_encoder("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, reg_tokens=2)
    assert (enc.dim, enc.grid, enc.num_prefix_tokens, enc.image_size) == (192, (2, 2), 3, (32, 32))
    x = enc.preprocess(IMAGES)
    assert x.shape == (2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(x)
        assert tokens.shape == (2, 3 + 4, 192) and enc.num_tokens == 7
        torch.testing.assert_close(enc.tower.forward_head(tokens), enc.tower(x))  # the head reads these tokens
    check_frozen(enc)


def test_open_clip_tokens_include_cls_that_gives_the_pooled_embedding(tmp_path):
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "captionlab-tiny-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "captionlab-tiny-vit.json")
    enc = load_encoder("open_clip:captionlab-tiny-vit", pretrained=False)
    assert (enc.dim, enc.grid, enc.num_prefix_tokens, enc.image_size) == (32, (4, 4), 1, (32, 32))
    x = enc.preprocess(IMAGES)
    with torch.no_grad():
        tokens = enc(x)
        assert tokens.shape == (2, 17, 32)
        torch.testing.assert_close(tokens[:, 0] @ enc.tower.proj, enc.tower(x))
    check_frozen(enc)


def _tiny_clip(out, image_size: int = 32):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, vocab_size=100, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=image_size, patch_size=8),
                     projection_dim=16)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(out)
    return model


def test_hfclip_from_a_full_clip_dir_matches_hf_pooled_output(tmp_path):
    clip = _tiny_clip(tmp_path)  # no preprocessor_config.json: CLIP defaults at the model's size
    enc = load_encoder(f"hfclip:{tmp_path}")
    assert (enc.dim, enc.grid, enc.num_prefix_tokens, enc.image_size) == (32, (4, 4), 1, (32, 32))
    x = enc.preprocess(IMAGES)
    assert x.shape == (2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(x)
        assert tokens.shape == (2, 17, 32)
        torch.testing.assert_close(tokens[:, 0], clip.vision_model(pixel_values=x).pooler_output)
    check_frozen(enc)
    assert load_encoder(str(tmp_path)).grid == (4, 4)  # a bare directory is an HF CLIP dir too


def test_timm_weights_from_a_local_file(tmp_path):
    """`timm:<name>@<file>` loads a copied checkpoint with no hub; a missing or mismatched file is named."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    weights = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    enc = load_encoder(f"timm:vit_tiny_patch16_224@{weights}", img_size=32)
    x = enc.preprocess(IMAGES)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref.forward_features(x), rtol=0, atol=0)
    check_frozen(enc)
    with pytest.raises(ConfigError, match="does not exist"):
        load_encoder(f"timm:vit_tiny_patch16_224@{tmp_path / 'missing.safetensors'}")
    with pytest.raises(ConfigError, match="timm cannot create"):  # weights of another shape
        load_encoder(f"timm:vit_small_patch16_224@{weights}", img_size=32)


def test_bad_specs_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="expected timm"):
        load_encoder("resnet:50")
    with pytest.raises(ConfigError, match="no patch_embed"):
        load_encoder("timm:resnet18", pretrained=False)
    with pytest.raises(ConfigError, match="timm cannot create"):
        load_encoder("timm:no_such_model_xyz", pretrained=False)
    with pytest.raises(ConfigError, match="cannot load an HF CLIP"):
        load_encoder(f"hfclip:{tmp_path}")


def test_demo_clip_vision_tower(demo_clip, demo_world):
    from transformers import CLIPModel

    enc = load_encoder(f"hfclip:{demo_clip}")
    images = [Image.open(p).convert("RGB") for p in sorted((demo_world / "p2_data/images/val").glob("*.jpg"))[:2]]
    x = enc.preprocess(images)
    assert x.shape[-2:] == enc.image_size
    clip = CLIPModel.from_pretrained(demo_clip).eval()
    with torch.no_grad():
        tokens = enc(x)
        assert tokens.shape == (2, 1 + enc.grid[0] * enc.grid[1], enc.dim)
        torch.testing.assert_close(tokens[:, 0], clip.vision_model(pixel_values=x).pooler_output)
