"""02's training attempts: keyed by the effective configuration, reused on reruns, retrained when an input changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captionlab.params import load_config
from captionlab.resultcache import ResultCache
from captionlab.train.attempts import effective_config, reference_config, run_attempt


def test_effective_config_drops_settings_a_method_does_not_use():
    cfg = load_config("params/demo.yaml")
    adapter4 = effective_config(cfg, peft="adapter")
    adapter8 = effective_config(cfg.replace(rank=8, lora_alpha=3), peft="adapter")
    assert adapter4 == adapter8 and "lora_rank" not in adapter4["captioner"]
    lora4, lora8 = effective_config(cfg, peft="lora"), effective_config(cfg.replace(rank=8), peft="lora")
    assert lora4 != lora8 and lora8["captioner"]["lora_rank"] == 8
    prefix = effective_config(cfg, conditioning="prefix")
    assert "cross_every" not in prefix["captioner"] and "cross_dim" not in prefix["captioner"]
    assert "out_dir" not in prefix["train"] and prefix["eval"]["beam_size"] == cfg.beam_size
    assert reference_config(cfg.replace(rank=16)).rank == cfg.rank  # comparison attempts: the params file's rank


def test_attempt_reused_then_retrained_when_the_data_changes(demo_world: Path, demo_clip: Path, demo_gpt2: Path,
                                                             tmp_path: Path):
    cfg = load_config("params/demo.yaml", {"quick": True, "epochs": 1, "run_dir": str(tmp_path / "run")})
    cache = ResultCache(tmp_path / "results")
    first = run_attempt(cfg, cache, peft="adapter")
    assert not first.result.reused and first.checkpoint.is_dir() and first.val_images == 32
    assert (first.checkpoint / "trainable.safetensors").exists() and 0 <= first.summary["CIDEr"]
    again = run_attempt(cfg.replace(rank=8), cache, peft="adapter")  # the rank does not apply to adapters
    assert again.result.reused and again.summary == first.summary and "reused cached" in again.describe()
    copied = again.copy_checkpoint(tmp_path / "run" / "02_train" / "checkpoint" / "best")
    assert json.loads((copied / "captioner.json").read_text()) == json.loads((first.checkpoint / "captioner.json").read_text())
    assert again.row()["cached"] is True and again.row()["rank"] == "-"
    # a changed input (the frozen decoder's file) changes the key: nothing stale is reused
    assert cache.key("x", {}, [demo_gpt2 / "decoder_model.bin"]) != cache.key("x", {}, [demo_clip / "config.json"])


def test_attempts_trained_side_by_side_equal_one_by_one(demo_world: Path, demo_clip: Path, demo_gpt2: Path,
                                                         tmp_path: Path):
    from captionlab.data import load_predictions
    from captionlab.train.attempts import run_attempts

    cfg = load_config("params/demo.yaml", {"quick": True, "epochs": 1, "run_dir": str(tmp_path / "run")})
    settings = [(cfg, {"peft": "adapter"}), (cfg, {"conditioning": "prefix"})]
    # one by one, in this process, into the session's results cache: 02's quick run (test_notebooks_execute) trains
    # these two comparison attempts one by one too, so whichever comes second reuses the first's (same keys)
    serial = run_attempts(settings, ResultCache(), workers=1)
    both = run_attempts(settings, ResultCache(tmp_path / "two"), workers=2)
    for a, b in zip(serial, both):
        assert not b.result.reused and "computed" in b.describe()  # trained by a worker: not "reused"
        assert b.result.key == a.result.key and b.summary["CIDEr"] == a.summary["CIDEr"]
        assert load_predictions(b.predictions) == load_predictions(a.predictions)
    again = run_attempts(settings, ResultCache(tmp_path / "two"))
    assert all(a.result.reused for a in again)
