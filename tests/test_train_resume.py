"""Training loop: a killed + resumed run ends with exactly the weights of an uninterrupted run; checkpoints hold
only trainable weights; best checkpoint and history are written; feature caching skips the encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from captionlab.models.captioner import WEIGHTS_NAME, CaptionerConfig
from captionlab.train import TrainConfig, latest_checkpoint, train
from safetensors.torch import load_file


class Killed(Exception):
    pass


def _configs(tiny: dict, out: Path, **kw) -> tuple[CaptionerConfig, TrainConfig]:
    cap = CaptionerConfig(encoder=tiny["encoder"], decoder=tiny["decoder"], lora_dropout=0.1)  # dropout: RNG matters
    base = dict(train_images=16, eval_images=4, batch_size=16, epochs=2, save_every_steps=2, lr=3e-3,
                warmup_steps=2, out_dir=str(out))
    return cap, TrainConfig(**{**base, **kw})


def test_killed_and_resumed_run_equals_uninterrupted(tiny_captioner_models, demo_world: Path, tmp_path: Path) -> None:
    cap, cfg = _configs(tiny_captioner_models, tmp_path / "a")
    full = train(cap, cfg, demo_world)
    assert full["total_steps"] == 10 and len(full["steps"]) == 10  # 16 images x 5 captions / 16 per step, 2 epochs

    def kill_at_7(step: int, loss: float) -> None:
        if step == 7:  # after the step-6 checkpoint: step 7 is lost and must be replayed identically
            raise Killed

    cap, cfg_b = _configs(tiny_captioner_models, tmp_path / "b")
    with pytest.raises(Killed):
        train(cap, cfg_b, demo_world, on_step=kill_at_7)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000006"
    cfg_b.resume = True
    resumed = train(cap, cfg_b, demo_world)

    wa = load_file(str(latest_checkpoint(tmp_path / "a") / WEIGHTS_NAME))
    wb = load_file(str(latest_checkpoint(tmp_path / "b") / WEIGHTS_NAME))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in full["steps"]]
    assert full["steps"][-1]["loss"] < full["steps"][0]["loss"]
    # checkpoints: trainable weights only, one kept, a best checkpoint by val CIDEr, history on disk
    assert all("lora_" in k or k.startswith("projector.") for k in wa)
    assert len(list((tmp_path / "a" / "checkpoints").iterdir())) == 1
    assert full["best"] is not None and (tmp_path / "a" / "best" / WEIGHTS_NAME).exists()
    assert [e["epoch"] for e in full["epochs"]] == [1, 2] and "CIDEr" in full["epochs"][0]["val"]
    assert json.loads((tmp_path / "a" / "history.json").read_text())["best"] == full["best"]
    assert full["baseline"]["caption"] and full["baseline"]["CIDEr"] >= 0


def test_feature_cache_skips_encoder(tiny_captioner_models, demo_world: Path, tmp_path: Path, monkeypatch) -> None:
    from captionlab.models.encoder import VisionEncoder

    calls = {"n": 0}
    forward = VisionEncoder.forward

    def counting(self, pixel_values):
        calls["n"] += pixel_values.shape[0]
        return forward(self, pixel_values)

    monkeypatch.setattr(VisionEncoder, "forward", counting)
    cap, cfg = _configs(tiny_captioner_models, tmp_path / "c", eval_images=-1, epochs=2, save_every_steps=0)
    train(cap, cfg, demo_world)
    first = calls["n"]
    assert first <= 16  # at most one pass over the 16 training images (zero when already cached)
    calls["n"] = 0
    cfg.cache_features, cfg.out_dir, cfg.epochs = False, str(tmp_path / "d"), 1
    train(cap, cfg, demo_world)
    assert calls["n"] == 80  # without the cache every (image, caption) pair runs the encoder
