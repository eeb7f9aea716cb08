"""`captionlab train --params params/demo.yaml -p ...` runs the loop from a flat params file plus overrides."""

from __future__ import annotations

import json
from pathlib import Path

from captionlab.cli import main


def test_train_cli_with_demo_params(demo_world: Path, demo_clip: Path, demo_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--params", "params/demo.yaml", "-p", "train.train_images=16", "-p", "batch_size=16",
               "-p", "train.max_steps=2", "-p", "train.eval_images=-1", "-p", "rank=2", "--out-dir", str(out)])
    assert rc == 0
    history = json.loads((out / "history.json").read_text())
    assert history["total_steps"] == 2 and len(history["steps"]) == 2
    assert history["config"]["captioner"]["lora_rank"] == 2  # the run configuration's `rank` reached the captioner
    assert history["config"]["captioner"]["encoder"] == f"hfclip:{demo_clip}"
    assert main(["train", "--params", "params/demo.yaml", "-p", "train.no_such_option=1"]) == 2
    assert main(["train", "--params", "params/demo.yaml", "-p", "train.batch_size=8"]) == 2  # one name: batch_size
    assert main(["train", "--params", "params/demo.yaml", "-p", "rnak=2"]) == 2
