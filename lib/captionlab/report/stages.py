"""Where the minutes go: time per stage (venv, demo world, each model, each notebook) for the index and the CLI.

Build stages record their own duration when they run: the Makefile writes the venv install's seconds into
`.venv/.installed`, the world generator into `world.json` (`build_seconds`) and each demo model into its build
marker (`captionlab_build.json`, `seconds`). A stage that was already built before this report run started is
listed as cached, with the time it took when it was built.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from captionlab.demo import MARKER as MODEL_MARKER  # each demo model's build record


@dataclass
class Stage:
    """One stage: its name, the seconds it took when it ran, and whether it ran during this report run."""

    name: str
    seconds: float | None
    ran: bool  # False: built before this run started (cached)
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """The stage as a JSON row."""
        return {"stage": self.name, "seconds": self.seconds, "this_run": self.ran, "detail": self.detail}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def venv_stage(since: float, prefix: str | Path = sys.prefix) -> Stage | None:
    """The venv install recorded by `make venv` (seconds in `<venv>/.installed`), if this is such a venv."""
    stamp = Path(prefix) / ".installed"
    if not stamp.exists():
        return None
    try:
        seconds: float | None = float(stamp.read_text().split()[0])
    except (ValueError, IndexError):
        seconds = None
    return Stage("venv", seconds, stamp.stat().st_mtime >= since, str(Path(prefix).name))


def build_stages(data_root: str | Path | None, since: float) -> list[Stage]:
    """Stages recorded under a data root: the world build and every model built into `<root>/models/`."""
    stages: list[Stage] = []
    venv = venv_stage(since)
    if venv:
        stages.append(venv)
    if data_root is None:
        return stages
    root = Path(data_root)
    world = root / "world.json"
    meta = _read_json(world)
    if meta is not None:
        stages.append(Stage("world", meta.get("build_seconds"), world.stat().st_mtime >= since,
                            f"seed {meta.get('seed')}"))
    models = root / "models"
    if models.is_dir():
        for marker in sorted(models.glob(f"*/{MODEL_MARKER}")):
            m = _read_json(marker) or {}
            stages.append(Stage(f"model {m.get('name', marker.parent.name)}", m.get("seconds"),
                                marker.stat().st_mtime >= since))
    return stages


def notebook_stages(sections: Sequence[Any]) -> list[Stage]:
    """One stage per executed report section (`Section.name`, `.seconds`, `.status`)."""
    return [Stage(f"notebook {s.name}", s.seconds, True, s.status) for s in sections if s.seconds is not None]


def format_table(stages: Sequence[Stage], wall: float | None = None) -> str:
    """A plain-text table of the stages (for the end of `make demo`); `wall`: the run's wall-clock seconds (stages
    overlap: models build while notebooks run, two notebooks at a time on the demo world)."""
    lines = [f"{'stage':<28} {'seconds':>8}  this run"]
    for s in stages:
        secs = f"{s.seconds:8.1f}" if s.seconds is not None else f"{'?':>8}"
        lines.append(f"{s.name:<28} {secs}  {'ran' if s.ran else 'cached'}{'  ' + s.detail if s.detail else ''}")
    total = sum(s.seconds or 0.0 for s in stages if s.ran)
    if wall is not None:
        lines.append(f"{'wall clock (this run)':<28} {wall:8.1f}  stages overlap")
    lines.append(f"{'sum of stages (this run)':<28} {total:8.1f}")
    return "\n".join(lines)
