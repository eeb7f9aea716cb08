"""Two CPU processes under `accelerate launch` train the same model as one process (global batches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from captionlab.params import load_config
from captionlab.train import captioner_config, train, train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two processes under accelerate launch + a reference run: ~1 min on 2 cores
def test_two_processes_match_one(tiny_captioner_models, demo_world: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "base": "params/demo.yaml", "world": "tiny", "data_root": str(demo_world), "batch_size": 16, "lr": 3e-3,
        "encoder": tiny_captioner_models["encoder"], "decoder": tiny_captioner_models["decoder"],
        "captioner": {"lora_dropout": 0.0}, "train": {"train_images": 16, "eval_images": -1, "max_steps": 4}}))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "captionlab.cli.train",
           "--params", str(params), "--out-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["world_size"] == 2  # a silent fallback to independent single processes would say 1

    cfg = load_config(params)  # the same run configuration, through the same mapping, in one process
    one = train(captioner_config(cfg), train_config(cfg, tmp_path / "one"), demo_world)
    assert one["world_size"] == 1
    l1, l2 = [s["loss"] for s in one["steps"]], [s["loss"] for s in two["steps"]]
    assert len(l1) == len(l2) == 4
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4
    assert l1[-1] < l1[0]
