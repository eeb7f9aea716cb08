"""Data-parallel inference: 2 CPU processes (accelerate launch) give the same predictions as 1 process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from captionlab.cli import main
from captionlab.data import load_captions
from captionlab.parallel import gather_predictions, shard

CLI = str(Path(sys.executable).parent / "captionlab")


class _State:
    def __init__(self, index: int, n: int) -> None:
        self.process_index, self.num_processes = index, n


def test_shard_covers_every_item_once_in_order():
    items = list(range(11))
    parts = [shard(items, _State(r, 3)) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert shard(items, None) == items and shard(items[:1], _State(1, 2)) == []
    assert list(gather_predictions({"b": "2", "a": "1"})) == ["a", "b"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_2(args: list[str]) -> str:
    """Run `captionlab ARGS` under accelerate launch with 2 CPU processes; return stdout + stderr."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), CLI, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def images(demo_world: Path, tmp_path_factory) -> Path:
    """Seven demo validation images (an odd count: the shards differ in size)."""
    folder = tmp_path_factory.mktemp("par_images")
    for p in sorted((demo_world / "p1_data" / "images" / "val").iterdir())[:7]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    from captionlab.models.llava_train import save_random_llava

    return save_random_llava(tmp_path_factory.mktemp("par_llava") / "llava", seed=0)


@pytest.mark.slow  # two launched processes + a reference run
def test_caption_two_processes_equal_one(tiny_captioner_models, images, tmp_path):
    import torch

    from captionlab.models.captioner import Captioner, CaptionerConfig

    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(encoder=tiny_captioner_models["encoder"], decoder=tiny_captioner_models["decoder"],
                                      peft="lora", lora_rank=4), verbose=False)
    for p in model.projector.parameters():  # non-trivial projector so captions differ between images
        torch.nn.init.normal_(p, std=0.5)
    ckpt = model.save_trainable(tmp_path / "ckpt")
    args = ["caption", "--images", str(images), "--checkpoint", str(ckpt), "--beam-size", "2",
            "--max-new-tokens", "8", "--batch-size", "3"]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    log = launch_2([*args, "--out", str(tmp_path / "two.json")])
    assert "(2 processes)" in log  # world size 2, not two independent rank-0 runs
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert len(one) == 7 and len(set(one.values())) > 1
    assert two == one


@pytest.mark.slow  # two launched processes + a reference run
def test_llava_and_prompt_study_two_processes_equal_one(tiny_llava, images, demo_world, tmp_path):
    args = ["llava", "--images", str(images), "--model", str(tiny_llava), "--max-new-tokens", "6", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    assert "(2 processes)" in launch_2([*args, "--out", str(tmp_path / "two.json")])
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert len(one) == 7 and two == one

    root = tmp_path / "data"
    (root / "p1_data" / "images").mkdir(parents=True)
    shutil.copytree(images, root / "p1_data" / "images" / "val")
    stems = {p.stem for p in images.iterdir()}
    raw = json.loads((demo_world / "p1_data" / "val.json").read_text())
    keep = [im for im in raw["images"] if Path(im["file_name"]).stem in stems]
    ids = {im["id"] for im in keep}
    raw = {"images": keep, "annotations": [a for a in raw["annotations"] if a["image_id"] in ids]}
    (root / "p1_data" / "val.json").write_text(json.dumps(raw))
    assert set(load_captions(root / "p1_data" / "val.json").stems) == stems
    params = tmp_path / "study.yaml"
    params.write_text(yaml.safe_dump({
        "base": str(Path(__file__).resolve().parents[1] / "params" / "demo.yaml"), "data_root": str(root), "llava_model": str(tiny_llava), "max_images": 0,
        "llava_prompts": ["Describe the image.", "Caption the image."],
        "llava_configs": {"greedy": {"num_beams": 1, "max_new_tokens": 5}, "beam2": {"num_beams": 2, "max_new_tokens": 5}}}))
    study = ["prompt-study", "--params", str(params), "--no-clip", "--batch-size", "2"]
    assert main([*study, "--out", str(tmp_path / "s1")]) == 0
    assert "(2 processes)" in launch_2([*study, "--out", str(tmp_path / "s2")])
    for tag in ("0_greedy", "0_beam2", "1_greedy", "1_beam2"):
        a = json.loads((tmp_path / "s1" / f"{tag}.json").read_text())
        b = json.loads((tmp_path / "s2" / f"{tag}.json").read_text())
        assert len(a) == 7 and a == b, tag
    t1 = json.loads((tmp_path / "s1" / "prompt_study.json").read_text())["results"]
    t2 = json.loads((tmp_path / "s2" / "prompt_study.json").read_text())["results"]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(t1) == drop(t2)
