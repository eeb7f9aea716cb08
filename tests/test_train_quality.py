"""On the demo world, a minute of CPU LoRA training (< 10 % of the decoder trainable) reach val CIDEr of at
least 3x the "most common training caption" baseline."""

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
