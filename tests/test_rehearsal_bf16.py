"""The bf16 paths the GPU route takes (LLaVA in bf16, bf16 autocast training), exercised on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from captionlab.data import list_images, load_image
from captionlab.utils import default_dtype


def test_captionlab_dtype_forces_the_default_dtype(monkeypatch):
    assert default_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv("CAPTIONLAB_DTYPE", "bfloat16")
    assert default_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("CAPTIONLAB_DTYPE", "bogus")
    with pytest.raises(ValueError, match="CAPTIONLAB_DTYPE"):
        default_dtype(torch.device("cpu"))


def test_llava_captions_and_attention_in_bf16(demo_world: Path, tmp_path, monkeypatch):
    from captionlab.attention import capture_llava
    from captionlab.models.llava import load_llava
    from captionlab.models.llava_train import save_random_llava

    monkeypatch.setenv("CAPTIONLAB_DTYPE", "bfloat16")
    llava = load_llava(save_random_llava(tmp_path / "llava", seed=0))
    assert llava.model.dtype == torch.bfloat16
    images = [load_image(p) for p in list_images(demo_world / "p3_data" / "images")[:2]]
    caps = llava.caption(images, "Describe the image.", {"max_new_tokens": 4})
    assert len(caps) == 2 and all(isinstance(c, str) and c for c in caps)
    results = capture_llava(llava, images, "Describe the image.", max_new_tokens=4, progress=False)
    assert len(results) == 2 and all(np.isfinite(r.maps).all() and r.maps.size for r in results)


def test_captioner_trains_with_bf16_autocast_on_cpu(tiny_captioner_models, demo_world: Path, tmp_path):
    from captionlab.models.captioner import CaptionerConfig
    from captionlab.train import TrainConfig, train

    cap = CaptionerConfig(encoder=tiny_captioner_models["encoder"], decoder=tiny_captioner_models["decoder"],
                          peft="lora", lora_rank=4)
    cfg = TrainConfig(epochs=1, batch_size=8, train_images=16, eval_images=4, mixed_precision="bf16",
                      out_dir=str(tmp_path / "run"))
    history = train(cap, cfg, demo_world)
    losses = [s["loss"] for s in history["steps"]]
    assert len(losses) >= 2 and all(np.isfinite(losses))  # 16 images x 5 captions, 8 pairs per step


def test_captioner_never_returns_an_empty_caption(tiny_captioner_models, demo_world: Path):
    from captionlab.models.captioner import EMPTY_CAPTION, Captioner, CaptionerConfig

    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(encoder=tiny_captioner_models["encoder"], decoder=tiny_captioner_models["decoder"],
                                      peft="none"), verbose=False)
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():  # an LM head that always prefers eos: every caption would be empty
        model.decoder.transformer.ln_f.weight.zero_()  # final hidden state = ln_f.bias = ones
        model.decoder.transformer.ln_f.bias.fill_(1.0)
        model.decoder.transformer.wte.weight[eos] += 50.0
    images = list_images(demo_world / "p3_data" / "images")[:2]
    for method in ("greedy", "beam"):
        assert model.generate(images, method=method, max_new_tokens=4) == [EMPTY_CAPTION] * 2
