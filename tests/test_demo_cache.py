"""The demo model cache: independent builders run side by side in worker processes, dependencies wait, and every
build records its wall and CPU seconds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from captionlab import demo


def _fake_builder(world_root: Path, out_dir: Path, seed: int) -> None:
    """Stands in for a trainer: a second of CPU work, then a record of who built it and when. When the world has a
    `barrier` file it first waits (up to 60 s) until a second builder has started too, so a worker process that
    boots late does not make two parallel builds look serial (builds that really run one after the other still
    show it: the first waits out the 60 s alone)."""
    (world_root / f"started-{os.getpid()}-{out_dir.name}").touch()
    deadline = time.time() + 60
    while (world_root / "barrier").exists() and len(list(world_root.glob("started-*"))) < 2 \
            and time.time() < deadline:
        time.sleep(0.05)
    t0 = time.time()
    x = 0
    while time.time() - t0 < 1.0:
        x += 1
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "who.json").write_text(json.dumps({"pid": os.getpid(), "t0": t0, "t1": time.time(), "seed": seed}))


@pytest.fixture
def fake_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from captionlab.data.world import GENERATOR_VERSION

    root = tmp_path / "seed3"
    root.mkdir()
    (root / "world.json").write_text(json.dumps({"generator_version": GENERATOR_VERSION, "seed": 3,
                                                 "build_seconds": 1.5, "build_cpu_seconds": 1.2}))
    spec = f"{__name__}:_fake_builder"
    monkeypatch.setitem(demo.MODEL_BUILDERS, "fake_a", (spec, "1", ()))
    monkeypatch.setitem(demo.MODEL_BUILDERS, "fake_b", (spec, "1", ()))
    monkeypatch.setitem(demo.MODEL_BUILDERS, "fake_c", (spec, "1", ("fake_a",)))
    return root


def _who(root: Path, name: str) -> dict:
    return json.loads((root / "models" / name / "who.json").read_text())


def test_independent_builds_overlap_and_dependencies_wait(fake_world: Path) -> None:
    (fake_world / "barrier").touch()
    out = demo.ensure_models(["fake_a", "fake_b", "fake_c"], seed=3, root=fake_world, workers=2)
    assert set(out) == {"fake_a", "fake_b", "fake_c"} and all(p.is_dir() for p in out.values())
    a, b, c = (_who(fake_world, n) for n in ("fake_a", "fake_b", "fake_c"))
    assert len({a["pid"], b["pid"], os.getpid()}) == 3  # two worker processes, not this one
    assert a["t0"] < b["t1"] and b["t0"] < a["t1"]  # a and b ran at the same time
    assert c["t0"] >= a["t1"]  # c waited for its dependency
    assert a["seed"] == b["seed"] == c["seed"] == 3

    from captionlab.report.stages import build_stages

    times = {s.name: s.seconds for s in build_stages(fake_world, since=0.0)}  # what the report index lists
    assert times["world"] == 1.5 and "model clip" not in times  # clip: not built here
    for n in ("fake_a", "fake_b", "fake_c"):
        marker = json.loads((out[n] / demo.MARKER).read_text())
        assert marker["key"] == demo.build_key(n) and marker["version"] == "1" and marker["cpu_seconds"] >= 0.0
        assert 0.9 <= times[f"model {n}"] < 30

    again = demo.ensure_models(["fake_a", "fake_b", "fake_c"], seed=3, root=fake_world, workers=2)
    assert again == out and _who(fake_world, "fake_a") == a  # cached: nothing rebuilt


def test_one_worker_builds_in_this_process(fake_world: Path) -> None:
    demo.ensure_models(["fake_b", "fake_c"], seed=3, root=fake_world, workers=1)
    assert _who(fake_world, "fake_b")["pid"] == _who(fake_world, "fake_c")["pid"] == os.getpid()
    assert _who(fake_world, "fake_a")["t1"] <= _who(fake_world, "fake_c")["t0"]  # the dependency was built first


def test_unknown_model_name_is_refused(fake_world: Path) -> None:
    with pytest.raises(KeyError, match="unknown demo model 'nope'"):
        demo.ensure_models(["fake_a", "nope"], seed=3, root=fake_world)
