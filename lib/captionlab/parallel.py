"""Data-parallel inference: shard images over `accelerate launch` / `torchrun` processes, merge the predictions.

    state = process_state()                       # accelerate.PartialState (world size 1 without a launcher)
    mine = shard(stems, state)                    # this process's contiguous share, in order
    preds = gather_predictions({...}, state)      # every process's dict merged (same on every rank)
    write_on_main(path, preds, state)             # one predictions JSON, written by the main process

On a CPU, launch with `accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
--dynamo_backend no` and `ACCELERATE_USE_CPU=1` (or `torchrun --nproc_per_node 2`); `accelerate launch --cpu`
silently runs one process (ENV_NOTES.md). Captions do not depend on the process count: each image is captioned
exactly once with the same batch size, and the merged JSON is sorted by stem like a single process's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by a distributed launcher (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state() -> "PartialState":  # noqa: F821
    """accelerate's PartialState (initialises the process group under a launcher; CPU/gloo without CUDA)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def shard(items: Sequence[T], state: Any | None = None) -> list[T]:
    """This process's contiguous share of `items` (all of them in a single process)."""
    if state is None or state.num_processes == 1:
        return list(items)
    n, k, r = len(items), state.num_processes, state.process_index
    start = r * (n // k) + min(r, n % k)
    return list(items[start:start + n // k + (1 if r < n % k else 0)])


def gather_objects(obj: Any, state: Any | None = None) -> list[Any]:
    """[obj of process 0, obj of process 1, ...] on every process."""
    if state is None or state.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * state.num_processes
    dist.all_gather_object(out, obj)
    return out


def gather_predictions(local: dict[str, str], state: Any | None = None) -> dict[str, str]:
    """Every process's {stem: caption} merged and sorted by stem (ValueError if two processes captioned a stem)."""
    merged: dict[str, str] = {}
    for part in gather_objects(local, state):
        overlap = set(merged) & set(part)
        if overlap:
            raise ValueError(f"stems captioned by two processes: {sorted(overlap)[:3]}")
        merged.update(part)
    return dict(sorted(merged.items()))


def is_main(state: Any | None = None) -> bool:
    """True on the main process (and without a launcher)."""
    return state is None or state.is_main_process


def write_on_main(path: str | os.PathLike, preds: dict[str, str], state: Any | None = None) -> Path:
    """Save the merged predictions from the main process only; every process waits until it is written."""
    from captionlab.data import save_predictions

    if is_main(state):
        save_predictions(path, preds)
    if state is not None and state.num_processes > 1:
        state.wait_for_everyone()
    return Path(path)
