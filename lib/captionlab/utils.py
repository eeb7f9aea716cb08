"""Small shared helpers: atomic writes, devices, seeds, run metadata, cache paths."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Root of captionlab's caches: $CAPTIONLAB_CACHE, else ~/.cache/captionlab."""
    env = os.environ.get("CAPTIONLAB_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "captionlab"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode() -> int:
    """Mode of a file created by an ordinary open(): 0666 minus the umask (0644 by default)."""
    return 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 (files from old runs too): use what open() gives
            os.chmod(tmp_path, _new_file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh hidden directory next to `path`; when the block succeeds it replaces `path` (an existing
    `path` is removed first), when it fails or is killed it is removed: `path` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if not path.parent.is_dir():  # e.g. the demo world was rebuilt (its models removed) meanwhile
            raise RuntimeError(f"{path.parent} vanished while {path.name} was being written; run again")
        os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes 0700: use what mkdir() gives
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to `path` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write JSON to `path` atomically (UTF-8, non-ASCII kept)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save a tensor dict as safetensors atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def get_device(prefer: str | None = None) -> "torch.device":  # noqa: F821
    """CUDA when present (or `prefer` when given), CPU otherwise."""
    import torch

    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: "torch.device") -> "torch.dtype":  # noqa: F821
    """bf16 on CUDA, fp32 on CPU; CAPTIONLAB_DTYPE (e.g. bfloat16) forces one (the rehearsal's bf16 run on CPU)."""
    import torch

    forced = os.environ.get("CAPTIONLAB_DTYPE", "").strip()
    if forced:
        dtype = getattr(torch, forced, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"CAPTIONLAB_DTYPE={forced!r} is not a torch dtype (e.g. bfloat16, float32)")
        return dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def thread_pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of `threads` threads (idle between uses), for work whose results do not depend on
    which thread runs it: torch releases the GIL inside its kernels, so one-thread ops run side by side."""
    return ThreadPoolExecutor(threads, thread_name_prefix=f"captionlab-{threads}")


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    """The repository's HEAD commit, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes results."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "timm", "peft", "open_clip_torch", "pycocoevalcap", "accelerate", "captionlab"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run_metadata(params: dict | None = None, world: str | None = None, seed: int | None = None) -> dict[str, Any]:
    """What every metrics file records: params, world, seed, versions, git commit, host."""
    return {
        "world": world,
        "seed": seed,
        "params": params or {},
        "versions": versions(),
        "git_commit": git_commit(),
        "host": {"machine": platform.machine(), "cuda": _cuda_name()},
    }


def _cuda_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def file_lock(path: str | os.PathLike):
    """An exclusive inter-process lock on `path` (a context manager), for building shared caches once."""
    import fcntl

    @contextlib.contextmanager
    def _lock() -> Iterator[None]:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return _lock()


@contextlib.contextmanager
def captured_stderr_fd() -> Iterator[None]:
    """Capture what child processes write to file descriptor 2 (e.g. Java's progress lines); replay it on error."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            buf.seek(0)
            sys.stderr.write(buf.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def dataclass_from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with an error naming `what`."""
    from dataclasses import fields

    from captionlab.errors import ConfigError

    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"{what}: unknown options {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)
