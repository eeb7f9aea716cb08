"""Training checkpoints: `checkpoints/step-N/` (trainable weights + optimizer, scheduler, RNG, history) for exact
resume, `latest.json` pointing at the newest, and directories swapped into place atomically."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from captionlab.utils import atomic_write_json

STATE_NAME = "train_state.pt"
LATEST_NAME = "latest.json"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete training checkpoint under out_dir (via latest.json), or None."""
    pointer = Path(out_dir) / LATEST_NAME
    if not pointer.exists():
        return None
    ckpt = Path(out_dir) / json.loads(pointer.read_text())["dir"]
    return ckpt if (ckpt / STATE_NAME).exists() else None


def save_dir_atomic(out_dir: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Write a directory via a temporary sibling, then swap it into place."""
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    old = out_dir / f".{name}.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def save_checkpoint(out_dir: Path, step: int, write_trainable: Callable[[Path], None], state: dict[str, Any],
                    keep: int) -> Path:
    """Write `checkpoints/step-N/` (trainable weights + `train_state.pt`), point latest.json at it, prune old ones."""
    name = f"step-{step:07d}"

    def write(d: Path) -> None:
        write_trainable(d)
        torch.save(state, d / STATE_NAME)

    path = save_dir_atomic(out_dir / "checkpoints", name, write)
    atomic_write_json(out_dir / LATEST_NAME, {"dir": f"checkpoints/{name}", "step": step})
    kept = sorted((out_dir / "checkpoints").glob("step-*"))
    for old in kept[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_state(ckpt: Path) -> dict[str, Any]:
    """The training state saved with a checkpoint (optimizer, scheduler, RNG per process, step, history)."""
    return torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=True)
