"""An attempt worker started early: 02's setup starts it before its own imports, so that the worker's imports
(torch, transformers, peft, accelerate: 3-5 s on a small CPU) run on another core meanwhile, and the next
`captionlab.train.attempts.run_attempts` trains in it. This module imports nothing heavy."""

from __future__ import annotations

import os
from typing import Any

from captionlab.utils import cpu_cores

_WARM: tuple[Any, int, Any] | None = None  # (process pool, its size, the warm-up's future) until run_attempts takes it


def spawn_pool(workers: int) -> Any:
    """A pool of `workers` spawned interpreters (no inherited torch thread pools or locks); a worker process is
    started when a task finds none idle."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _warm_up() -> None:
    """A worker's first task: the imports an attempt needs."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from transformers import CLIPVisionModel  # noqa: F401

    import captionlab.metrics.evaluate
    import captionlab.models.captioner
    import captionlab.train.attempts
    import captionlab.train.loop  # noqa: F401


def start_workers(params_file: str | os.PathLike | None = None, quick: bool | None = None) -> bool:
    """Start one attempt worker now (`quick` None: the params file's), where attempts train in processes: 2+ cores,
    not quick mode (a GPU run discards it: its attempts train in the notebook). Returns whether one was started."""
    global _WARM
    if quick is None:
        from captionlab.params import load_config

        try:
            quick = load_config(params_file).quick
        except Exception:  # noqa: BLE001 - report.start names what is wrong with the params file
            return False
    if quick or cpu_cores() < 2:
        return False
    if _WARM is None:
        size = min(2, cpu_cores())
        pool = spawn_pool(size)
        _WARM = (pool, size, pool.submit(_warm_up))
    return True


def take_warm_pool(wait: bool = True) -> tuple[Any, int] | None:
    """(pool, size) that `start_workers` started, now the caller's to use and shut down (None if there is none).

    `wait`: until the warm-up is done, so the next task goes to that worker (a task submitted while every worker
    is busy would start another, cold one)."""
    global _WARM
    warm, _WARM = _WARM, None
    if warm is None:
        return None
    pool, size, future = warm
    if wait:
        future.exception()  # a failed warm-up only means a cold worker: the attempt itself reports real errors
    return pool, size


def stop_resource_tracker() -> None:
    """Stop multiprocessing's resource-tracker process once no worker is left: a notebook kernel that still has it
    takes 2.4 s longer to shut down (papermill waits for it). The next pool starts a new one."""
    import multiprocessing

    if multiprocessing.active_children():
        return
    try:
        from multiprocessing import resource_tracker

        resource_tracker._resource_tracker._stop()
    except Exception:  # noqa: BLE001, S110 - a private helper; without it only the shutdown is slower
        pass
