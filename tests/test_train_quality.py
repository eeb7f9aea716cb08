"""On the demo world, a minute of CPU LoRA training (< 10 % of the decoder trainable) beats the "most common training
caption" baseline: params/demo.yaml's captioner (cross-attention conditioning, what 02 trains) reaches at least 3x its
val CIDEr, and a LoRA captioner with prefix conditioning at least 2x after one epoch."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_lora_captioner_beats_most_common_caption(demo_captioner) -> None:
    history, best_dir = demo_captioner  # 1 epoch of LoRA rank 4, prefix conditioning, on 2400 images (conftest)
    assert 0 < history["trainable"]["decoder_share"] <= 0.10
    baseline, best = history["baseline"]["CIDEr"], history["best"]["CIDEr"]
    assert baseline > 0
    # measured on a Zen 3: 2.77x at lr 5e-3 (2.72-3.31x at lr 6e-3 to 1e-2); 2 epochs (twice the CPU): 3.76x
    assert best >= 2 * baseline, f"val CIDEr {best:.3f} < 2 x baseline {baseline:.3f}"
    assert (best_dir / "trainable.safetensors").exists()


@pytest.mark.slow
def test_cross_attention_captioner_beats_most_common_caption(demo_cross_captioner) -> None:
    """Gated cross-attention conditioning (params/demo.yaml's setting: LoRA rank 4 + a 64-wide cross layer in front
    of each of the 4 decoder blocks, no CLS, linear projector, 150 steps) learns from the image too."""
    from safetensors.torch import load_file

    history, best_dir = demo_cross_captioner
    assert history["trainable"]["trainable"] <= 10_000_000
    baseline, best = history["baseline"]["CIDEr"], history["best"]["CIDEr"]
    assert best >= 3 * baseline, f"cross: val CIDEr {best:.3f} < 3 x baseline {baseline:.3f}"
    gates = {k: float(v) for k, v in load_file(str(best_dir / "trainable.safetensors")).items() if "gate_" in k}
    # training opened the gates (zero at init); measured: all 8 beyond 1e-3 (smallest |gate| 0.007, largest 0.14)
    assert len(gates) == 8 and all(abs(g) > 1e-3 for g in gates.values())
    assert max(abs(g) for g in gates.values()) > 1e-2
