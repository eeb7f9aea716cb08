"""The demo world's cache: the generated dataset and the tiny models trained on it, built once under a lock.

`ensure_world()` returns the root of a course-layout dataset; `ensure_model(name)` returns the directory of a
tiny checkpoint trained on it. Both rebuild when their builder's version changes, and a failed or killed
build leaves nothing half-written behind (it builds in a temporary directory and renames it into place).
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from captionlab.utils import atomic_write_json, cache_dir, file_lock

# name -> ("module:function", version, dependencies). A builder is
# `fn(world_root: Path, out_dir: Path, seed: int) -> None` and writes a complete checkpoint into out_dir.
# Bump the version when the builder's output changes; a checkpoint is also rebuilt when the world's generator
# version or a dependency's build key changes (the LLaVA stand-in reuses the tiny CLIP's vision tower).
MODEL_BUILDERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "clip": ("captionlab.models.clip_train:train_tiny_clip", "2", ()),
    "gpt2": ("captionlab.models.gpt2_train:train_tiny_gpt2", "1", ()),
    "llava": ("captionlab.models.llava_train:train_tiny_llava", "1", ("clip",)),
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
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
        try:
            t0 = time.time()
            builder(root, tmp, seed)
            atomic_write_json(tmp / MARKER, {"name": name, "key": key, "seed": seed,
                                             "seconds": round(time.time() - t0, 1)})
            if not out.parent.is_dir():  # the world was rebuilt (and its models removed) while we trained
                raise RuntimeError(f"{out.parent} vanished while building {name}; run again")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out
