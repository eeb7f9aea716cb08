"""On the demo world, a few CPU seconds of LoRA training (< 10 % of the decoder trainable) reach val CIDEr of at
least 3x the "most common training caption" baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
from captionlab.models.captioner import CaptionerConfig
from captionlab.train import TrainConfig, train


@pytest.mark.slow
def test_lora_captioner_beats_most_common_caption(demo_world: Path, demo_clip: Path, demo_gpt2: Path,
                                                 tmp_path: Path) -> None:
    cap = CaptionerConfig(encoder=f"hfclip:{demo_clip}", decoder=str(demo_gpt2 / "decoder_model.bin"),
                          peft="lora", lora_rank=4, lora_dropout=0.0)
    cfg = TrainConfig(train_images=2400, eval_images=100, batch_size=32, epochs=1, lr=5e-3, warmup_steps=10,
                      out_dir=str(tmp_path / "run"))
    history = train(cap, cfg, demo_world)
    assert 0 < history["trainable"]["decoder_share"] <= 0.10
    baseline, best = history["baseline"]["CIDEr"], history["best"]["CIDEr"]
    assert baseline > 0
    assert best >= 3 * baseline, f"val CIDEr {best:.3f} < 3 x baseline {baseline:.3f}"
