"""On the demo world, a minute of CPU LoRA training (< 10 % of the decoder trainable) reaches val CIDEr of at
least 3x the "most common training caption" baseline, with prefix and with cross-attention conditioning."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_lora_captioner_beats_most_common_caption(demo_captioner) -> None:
    history, best_dir = demo_captioner  # 2 epochs of LoRA rank 4 on 2400 images (conftest)
    assert 0 < history["trainable"]["decoder_share"] <= 0.10
    baseline, best = history["baseline"]["CIDEr"], history["best"]["CIDEr"]
    assert baseline > 0
    assert best >= 3 * baseline, f"val CIDEr {best:.3f} < 3 x baseline {baseline:.3f}"
    assert (best_dir / "trainable.safetensors").exists()


@pytest.mark.slow
def test_cross_attention_captioner_beats_most_common_caption(demo_world, demo_clip, demo_gpt2, tmp_path) -> None:
    """Gated cross-attention conditioning (LoRA rank 4 + 4 cross layers) learns from the image too: one epoch."""
    from captionlab.models.captioner import CaptionerConfig
    from captionlab.train import TrainConfig, train

    cap = CaptionerConfig(encoder=f"hfclip:{demo_clip}", decoder=str(demo_gpt2 / "decoder_model.bin"), peft="lora",
                          lora_rank=4, lora_dropout=0.0, conditioning="cross")
    cfg = TrainConfig(train_images=2400, eval_images=100, batch_size=32, epochs=1, lr=5e-3, warmup_steps=10,
                      out_dir=str(tmp_path))
    history = train(cap, cfg, demo_world)
    from safetensors.torch import load_file

    assert history["trainable"]["trainable"] <= 10_000_000
    baseline, best = history["baseline"]["CIDEr"], history["best"]["CIDEr"]
    assert best >= 3 * baseline, f"cross: val CIDEr {best:.3f} < 3 x baseline {baseline:.3f}"
    gates = {k: float(v) for k, v in load_file(str(tmp_path / "best" / "trainable.safetensors")).items() if "gate_" in k}
    assert len(gates) == 8 and all(abs(g) > 1e-3 for g in gates.values())  # training opened every gate
