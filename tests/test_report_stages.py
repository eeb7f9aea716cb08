"""Time per stage: read from what each build recorded, cached vs ran relative to the run's start."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from captionlab.report.stages import build_stages, format_table, notebook_stages, venv_stage


@dataclass
class _Section:
    name: str
    seconds: float | None
    status: str = "ok"


def test_build_and_notebook_stages(tmp_path: Path):
    root = tmp_path / "world"
    (root / "models" / "clip").mkdir(parents=True)
    (root / "models" / "gpt2").mkdir(parents=True)
    (root / "world.json").write_text(json.dumps({"seed": 0, "build_seconds": 3.2}))
    (root / "models" / "clip" / "captionlab_build.json").write_text(json.dumps({"name": "clip", "seconds": 61.0}))
    (root / "models" / "gpt2" / "captionlab_build.json").write_text(json.dumps({"name": "gpt2", "seconds": 20.5}))
    old = time.time() - 3600
    os.utime(root / "world.json", (old, old))  # built an hour ago: cached for a run that starts now
    since = time.time() - 60
    stages = [s for s in build_stages(root, since) if s.name != "venv"]
    assert [(s.name, s.seconds, s.ran) for s in stages] == [
        ("world", 3.2, False), ("model clip", 61.0, True), ("model gpt2", 20.5, True)]
    stages += notebook_stages([_Section("02_train", 40.0), _Section("03_evaluate", None)])
    assert stages[-1].name == "notebook 02_train"
    table = format_table(stages)
    assert "model clip" in table and "cached" in table
    assert table.splitlines()[-1].split()[-1] == f"{61.0 + 20.5 + 40.0:.1f}"  # only stages that ran this time
    overlapped = format_table(stages, wall=90.0).splitlines()  # models built while notebooks ran
    assert overlapped[-2].split()[:4] == ["wall", "clock", "(this", "run)"] and "90.0" in overlapped[-2]


def test_venv_stamp_seconds(tmp_path: Path):
    (tmp_path / ".installed").write_text("93\n")
    s = venv_stage(since=0.0, prefix=tmp_path)
    assert s is not None and s.seconds == 93.0 and s.ran
    (tmp_path / ".installed").write_text("")  # an old stamp without a time
    assert venv_stage(since=0.0, prefix=tmp_path).seconds is None
    assert venv_stage(since=0.0, prefix=tmp_path / "nope") is None


def test_index_shows_time_per_stage(tmp_path: Path):
    from captionlab.report.render import Section, write_index
    from captionlab.report.stages import Stage

    stages = [Stage("venv", 95.0, False), Stage("model clip", 338.0, True), Stage("notebook 02_train", 61.0, True)]
    page = write_index(tmp_path, [Section("02_train")], stages=stages).read_text()
    assert "Time per stage" in page and "model clip" in page and "338 s" in page
    assert "399 s" in page  # total of the stages that ran in this run
    page = write_index(tmp_path, [Section("02_train")], stages=stages, wall=250.0).read_text()
    assert "wall clock (this run)" in page and "250 s" in page and "399 s" in page
    assert "Time per stage" not in write_index(tmp_path, [Section("02_train")]).read_text()
