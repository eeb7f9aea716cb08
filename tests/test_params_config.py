"""The one run configuration: every params key is a RunConfig field, validation errors name key and file, loading
builds nothing, and the training configs come from it by one mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from captionlab import demo
from captionlab.errors import ConfigError
from captionlab.params import FIELDS, RunConfig, load_config, prepare_world
from captionlab.train import captioner_config, load_train_params, train_config
from captionlab.utils import REPO_ROOT

PARAMS = ["params/demo.yaml", "params/dlcv2024.yaml"]


@pytest.mark.parametrize("path", PARAMS)
def test_every_key_of_the_params_files_is_a_field_and_loads(path: str) -> None:
    raw = yaml.safe_load((REPO_ROOT / path).read_text())
    assert sorted(set(raw) - set(FIELDS)) == []
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.params_file == path
    assert "{" not in cfg.data_root and "{" not in cfg.checkpoint  # placeholders resolved


def test_both_params_files_set_the_same_keys() -> None:
    keys = [set(yaml.safe_load((REPO_ROOT / p).read_text())) for p in PARAMS]
    assert keys[0] == keys[1]


def test_sweep_settings_are_fields() -> None:
    for sweep in (REPO_ROOT / "params" / "sweeps").glob("*.yaml"):
        spec = yaml.safe_load(sweep.read_text())
        keys = set(spec.get("overrides") or {}) | {k for s in spec["settings"] for k in s if k != "name"}
        assert keys <= set(FIELDS), f"{sweep.name}: {sorted(keys - set(FIELDS))}"
        load_config(spec["base"], {**(spec.get("overrides") or {}), **spec["settings"][0]})


def test_unknown_key_missing_key_and_wrong_type(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: params/demo.yaml\nlora_rnak: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'lora_rnak'"):
        load_config(bad)
    partial = tmp_path / "partial.yaml"
    partial.write_text("world: demo\nseed: 0\n")
    with pytest.raises(ConfigError, match=r"partial.yaml: missing keys data_root, clip_model"):
        load_config(partial)
    with pytest.raises(ConfigError, match=r"llava_prompts = 'hi' \(str\): expected list\[str\]"):
        load_config("params/demo.yaml", {"llava_prompts": "hi"})
    with pytest.raises(ConfigError, match=r"quick = 'yes' \(str\): expected bool"):
        load_config("params/demo.yaml", {"quick": "yes"})
    with pytest.raises(ConfigError, match="overrides: unknown key 'nope'"):
        load_config("params/demo.yaml", {"nope": 1})
    assert load_config("params/demo.yaml", {"lr": 1}).lr == 1  # an int is a valid float


def test_loading_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("loading a config must not build the demo world")

    monkeypatch.setattr(demo, "ensure_world", refuse)
    monkeypatch.setattr(demo, "ensure_model", refuse)
    cfg = load_config("params/demo.yaml", {"data_root": str(tmp_path / "w")})
    cap, tr = captioner_config(cfg), train_config(cfg)
    load_train_params("params/demo.yaml", ["rank=2", "train.max_steps=3"])
    assert not (tmp_path / "w").exists()
    with pytest.raises(AssertionError, match="must not build"):
        prepare_world(cfg, ["clip"])  # the explicit step is the one that builds
    assert cap.lora_rank == cfg.rank and cap.encoder == cfg.encoder and tr.eval_beam_size == cfg.beam_size


def test_one_mapping_to_the_training_configs() -> None:
    cfg = load_config("params/demo.yaml", {"rank": 8, "quick": True, "train": {"max_steps": 5},
                                           "captioner": {"lora_dropout": 0.0}})
    cap, tr = captioner_config(cfg, peft="adapter"), train_config(cfg, "/tmp/x")
    assert (cap.lora_rank, cap.peft, cap.lora_dropout) == (8, "adapter", 0.0)
    assert (tr.max_steps, tr.epochs, tr.train_images, tr.out_dir) == (5, 1, 256, "/tmp/x")  # quick sizes
    with pytest.raises(ConfigError, match=r"train.lr: set it as `lr`"):
        train_config(cfg.replace(train={"lr": 0.1}))
    with pytest.raises(ConfigError, match=r"captioner.bogus: unknown CaptionerConfig field"):
        captioner_config(cfg.replace(captioner={"bogus": 1}))
    over = load_train_params("params/demo.yaml", ["rank=2", "train.max_steps=3", "batch_size=16"])
    assert (over.rank, over.train, over.batch_size) == (2, {"max_steps": 3, "grad_accum": 2}, 16)
