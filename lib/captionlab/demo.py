"""The demo world's cache: the generated dataset and the tiny models trained on it, built once under a lock.

`ensure_world()` returns the root of a course-layout dataset; `ensure_model(name)` returns the directory of a
tiny checkpoint trained on it. Both rebuild when their builder's version changes, and a failed or killed
build leaves nothing half-written behind (it builds in a temporary directory and renames it into place).
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from captionlab.utils import atomic_dir, atomic_write_json, cache_dir, file_lock

# name -> ("module:function", version, dependencies). A builder is
# `fn(world_root: Path, out_dir: Path, seed: int) -> None` and writes a complete checkpoint into out_dir.
# Bump the version when the builder's output changes; a checkpoint is also rebuilt when the world's generator
# version or a dependency's build key changes (the LLaVA stand-in reuses the tiny CLIP's vision tower).
MODEL_BUILDERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "clip": ("captionlab.models.clip_train:train_tiny_clip", "4", ()),
    "gpt2": ("captionlab.models.gpt2_train:train_tiny_gpt2", "1", ()),
    "llava": ("captionlab.models.llava_train:train_tiny_llava", "2", ("clip",)),
}
MARKER = "captionlab_build.json"


def build_key(name: str) -> str:
    """Identity of a demo checkpoint's inputs: builder version, world generator version, dependencies' keys."""
    from captionlab.data.world import GENERATOR_VERSION

    if name not in MODEL_BUILDERS:
        raise KeyError(f"unknown demo model {name!r}; known: {sorted(MODEL_BUILDERS)}")
    _, version, deps = MODEL_BUILDERS[name]
    parts = [f"{name}={version}", f"world={GENERATOR_VERSION}"] + [f"[{build_key(d)}]" for d in deps]
    return ",".join(parts)


def world_root(seed: int = 0) -> Path:
    """Where the demo world of `seed` lives in the cache."""
    return cache_dir() / "demo" / f"seed{seed}"


def ensure_world(seed: int = 0, root: Path | None = None) -> Path:
    """Build the demo world's data (if missing or stale) and return its root."""
    from captionlab.data import world

    root = Path(root) if root else world_root(seed)
    marker = root / "world.json"
    with file_lock(root.parent / f".{root.name}.lock"):
        if marker.exists() and json.loads(marker.read_text()).get("generator_version") == world.GENERATOR_VERSION:
            return root
        world.build_world(root, seed=seed)
    return root


def _ensure_one(args: tuple[str, int, str, dict[str, tuple[str, str, tuple[str, ...]]]]) -> str:
    """Worker: `ensure_model` with the parent's builder registry (a spawned interpreter starts from the module's)."""
    name, seed, root, builders = args
    import torch

    MODEL_BUILDERS.update(builders)
    torch.set_num_threads(1)
    return str(ensure_model(name, seed, Path(root)))


def ensure_models(names: Iterable[str], seed: int = 0, root: Path | None = None,
                  workers: int | None = None) -> dict[str, Path]:
    """`ensure_model` for several names, building independent ones side by side in `workers` processes.

    Each builder runs exactly as it would alone (one torch thread, same seed), so the checkpoints are the same as
    a one-by-one build; a model waits for its dependencies (llava for clip). Defaults to one worker per core, at
    most two. Workers are spawned, so a script calling this needs the usual `if __name__ == "__main__":` guard.
    """
    names = list(dict.fromkeys(names))
    for n in names:
        build_key(n)  # raises KeyError for an unknown name
    root = ensure_world(seed, root)
    workers = workers if workers is not None else min(2, len(os.sched_getaffinity(0)))
    todo = [n for n in names if not _is_built(n, root)]
    if workers <= 1 or len(todo) <= 1:
        return {n: ensure_model(n, seed, root) for n in names}
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch thread pools or locks
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: dict[str, Future] = {}
        while len(pending) < len(todo):
            for n in todo:
                deps_done = all(d not in todo or (d in pending and pending[d].done()) for d in MODEL_BUILDERS[n][2])
                if n not in pending and deps_done:
                    pending[n] = pool.submit(_ensure_one, (n, seed, str(root), dict(MODEL_BUILDERS)))
            running = [f for f in pending.values() if not f.done()]
            if len(pending) < len(todo) and running:
                wait(running, return_when=FIRST_COMPLETED)
            for f in pending.values():
                if f.done():
                    f.result()  # re-raise a builder's error here
    return {n: ensure_model(n, seed, root) for n in names}


def is_built(name: str, seed: int = 0, root: Path | None = None) -> bool:
    """Whether the demo model `name` is built and current (its marker holds the builder's key)."""
    return _is_built(name, Path(root) if root else world_root(seed))


def _is_built(name: str, root: Path) -> bool:
    marker = root / "models" / name / MARKER
    return marker.exists() and json.loads(marker.read_text()).get("key") == build_key(name)


def ensure_model(name: str, seed: int = 0, root: Path | None = None) -> Path:
    """Train the tiny demo model `name` on the demo world (if missing or stale) and return its directory."""
    key = build_key(name)  # raises KeyError for an unknown name
    target = MODEL_BUILDERS[name][0]
    root = ensure_world(seed, root)
    for dep in MODEL_BUILDERS[name][2]:
        ensure_model(dep, seed, root)
    out = root / "models" / name
    with file_lock(root / "models" / f".{name}.lock"):
        marker = out / MARKER
        if marker.exists() and json.loads(marker.read_text()).get("key") == key:
            return out
        module_name, fn_name = target.split(":")
        builder = getattr(importlib.import_module(module_name), fn_name)
        with atomic_dir(out) as tmp:
            t0, cpu0 = time.perf_counter(), time.process_time()
            builder(root, tmp, seed)
            atomic_write_json(tmp / MARKER, {"name": name, "key": key, "version": MODEL_BUILDERS[name][1],
                                             "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                                             "cpu_seconds": round(time.process_time() - cpu0, 1),
                                             "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return out
