"""Timing and peak-memory helpers for the benchmarks: warm-up + median of repeats, RSS / CUDA high-water marks."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim() -> None:
    """Return freed heap memory to the OS so a later RSS high-water mark reflects new allocations."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_method(device: torch.device) -> str:
    """What `peak_memory_mb` measures on this device."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated - allocated before (tensor bytes on the GPU)"
    return ("process RSS high-water (VmHWM, reset via /proc/self/clear_refs) minus RSS before, after malloc_trim; "
            "includes allocator slack, excludes memory reused from earlier frees")


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak extra memory (MiB) while running `fn` once: CUDA allocator peak, or process RSS high-water delta."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _trim()
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 1024


def time_median(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1,
                device: torch.device | None = None) -> tuple[float, list[float]]:
    """(median seconds, all timings) of `fn` after `warmup` untimed calls."""
    sync = (lambda: torch.cuda.synchronize()) if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def measure(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device,
            memory: bool = True) -> dict[str, Any]:
    """Median time, all times and peak memory (one extra run) of `fn`."""
    med, times = time_median(fn, repeats, warmup, device)
    mem = peak_memory_mb(fn, device) if memory else None
    return {"seconds": med, "times": [round(t, 5) for t in times],
            "peak_mem_mb": None if mem is None else round(mem, 2)}
