"""PEFT captioner: wiring, parameter report and budget, key span, padding-free loss, trainable-only checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from captionlab.errors import BudgetError, ConfigError
from captionlab.models.captioner import CONFIG_NAME, WEIGHTS_NAME, Captioner, CaptionerConfig, load_captioner


def _cfg(tiny: dict, **kw) -> CaptionerConfig:
    return CaptionerConfig(encoder=tiny["encoder"], decoder=tiny["decoder"], lora_dropout=0.0, **kw)


def _images(demo_world: Path, n: int = 3) -> list[Path]:
    return sorted((demo_world / "p2_data" / "images" / "val").glob("*.jpg"))[:n]


@pytest.fixture(scope="module")
def lora(tiny_captioner_models) -> Captioner:
    torch.manual_seed(0)
    m = Captioner(_cfg(tiny_captioner_models), verbose=False)
    with torch.no_grad():  # LoRA B starts at zero: give it weights so the adapters change the output
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return m.eval()


def test_lora_wiring_and_report(lora: Captioner, capsys) -> None:
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    assert any(n.endswith("attn.c_attn.lora_A.default.weight") for n in trainable)
    assert not any(p.requires_grad for p in lora.encoder.parameters())
    rep = lora.trainable_parameters(verbose=True)
    assert "trainable" in capsys.readouterr().out
    assert rep["trainable"] == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert rep["groups"]["encoder"]["trainable"] == 0
    assert 0 < rep["decoder_share"] <= 0.10


def test_budget_error_and_bad_options(tiny_captioner_models) -> None:
    with pytest.raises(BudgetError, match="budget of 1,000"):
        Captioner(_cfg(tiny_captioner_models, trainable_budget=1000), verbose=False)
    with pytest.raises(ConfigError, match="lora_targets"):
        Captioner(_cfg(tiny_captioner_models, lora_targets=["q_proj"]), verbose=False)
    with pytest.raises(ConfigError, match="n_positions"):
        Captioner(_cfg(tiny_captioner_models, max_caption_tokens=62), verbose=False)


@pytest.mark.parametrize("kw", [dict(peft="lora"), dict(peft="prefix", prefix_len=4), dict(peft="adapter", adapter_dim=8),
                                dict(peft="none", use_cls=False), dict(peft="lora", visual_pool=2)])
def test_peft_variants_and_image_key_span(tiny_captioner_models, demo_world: Path, kw) -> None:
    m = Captioner(_cfg(tiny_captioner_models, **kw), verbose=False).eval()
    names = [n for n, p in m.decoder.named_parameters() if p.requires_grad]
    marker = {"lora": "lora_", "prefix": "prefix_kv", "adapter": "adapter_", "none": None}[kw["peft"]]
    assert all(marker in n for n in names) and (bool(names) == (marker is not None))
    grid = m.image_grid()
    assert grid == ((2, 2) if kw.get("visual_pool") == 2 else (4, 4))
    start, end = m.image_key_span()
    prefix = kw.get("prefix_len", 0) if kw["peft"] == "prefix" else 0
    assert start == prefix + (0 if kw.get("use_cls") is False else 1) and end - start == grid[0] * grid[1]
    # the decoder's attention key axis is [prefix] [visual] [text]: the span must end where the text begins
    seen = []
    layer = m.decoder.transformer.h[0].attn
    layer.capture = seen.append
    ids, mask = m.encode_captions(["a red circle"])
    m(ids, mask, pixel_values=m._pixels(_images(demo_world, 1)))
    layer.capture = None
    assert seen[0].shape[-1] == end + ids.shape[1]


def test_loss_ignores_padding_and_features_match_pixels(lora: Captioner, demo_world: Path) -> None:
    px = lora._pixels(_images(demo_world, 2))
    caps = ["a red circle", "two small blue squares above a large yellow star on a striped background"]
    ids, mask = lora.encode_captions(caps)
    assert mask[0].sum() < mask[1].sum()  # the first row is padded
    with torch.no_grad():
        batch = lora(ids, mask, pixel_values=px, reduction="sum")
        alone = sum(lora(*lora.encode_captions([c]), pixel_values=px[i:i + 1], reduction="sum")
                    for i, c in enumerate(caps))
        assert torch.allclose(batch, alone, rtol=1e-5)
        feats = lora.encode_images(px)
        assert torch.allclose(lora(ids, mask, features=feats), lora(ids, mask, pixel_values=px), atol=1e-6)


def test_save_trainable_only_and_reload_reproduces(lora: Captioner, tiny_captioner_models, demo_world: Path,
                                                    tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ckpt = lora.save_trainable(tmp_path / "ckpt")
    saved = load_file(str(ckpt / WEIGHTS_NAME))
    assert set(saved) == {n for n, p in lora.named_parameters() if p.requires_grad}
    assert sum(t.numel() for t in saved.values()) == lora.report["trainable"]
    assert json.loads((ckpt / CONFIG_NAME).read_text())["config"]["decoder"] == tiny_captioner_models["decoder"]
    images = _images(demo_world, 3)
    expected = lora.generate(images, method="beam", beam_size=3, max_new_tokens=12)
    again = load_captioner(ckpt)
    assert again.generate(images, method="beam", beam_size=3, max_new_tokens=12) == expected
    assert again.generate(images, method="greedy", max_new_tokens=12) == \
        lora.generate(images, method="greedy", max_new_tokens=12)
    # a checkpoint whose config does not match its weights is refused, naming the file
    cfg = json.loads((ckpt / CONFIG_NAME).read_text())
    cfg["config"]["lora_rank"] = 4
    (ckpt / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="trainable.safetensors"):
        load_captioner(ckpt)


def test_caption_cli(lora: Captioner, tiny_captioner_models, demo_world: Path, tmp_path: Path) -> None:
    from captionlab.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for p in _images(demo_world, 3):
        shutil.copy(p, images / p.name)
    ckpt = lora.save_trainable(tmp_path / "ckpt")
    out = tmp_path / "pred.json"
    rc = main(["caption", "--images", str(images), "--out", str(out), "--checkpoint", str(ckpt),
               "--decoder", tiny_captioner_models["decoder"], "--method", "beam", "--beam-size", "2",
               "--max-new-tokens", "10"])
    assert rc == 0
    preds = json.loads(out.read_text())
    paths = sorted(images.iterdir())
    assert list(preds) == [p.stem for p in paths]
    assert list(preds.values()) == lora.generate(paths, method="beam", beam_size=2, max_new_tokens=10)
    assert main(["caption", "--images", str(images), "--out", str(out), "--checkpoint", str(tmp_path)]) == 2
