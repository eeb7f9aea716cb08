"""Results cached by what produced them: a training attempt, a prompt-study cell or an evaluation.

A result is keyed by its kind, its full configuration (any JSON-able mapping), the fingerprints of the files it
read (data folders, model checkpoints) and the fingerprint of captionlab's own source. Change any of these and
the key changes, so a stale result is never reused; rerun with the same inputs and the stored result comes back
at once. Entries live in `$CAPTIONLAB_CACHE/results/<kind>/<key>/` (`result.json` plus whatever files the
computation wrote there, e.g. a checkpoint) and are written atomically: a killed run leaves no entry behind.

File fingerprints read the bytes of files up to `HASH_LIMIT` and take (size, mtime) beyond it, so a 14 GB
checkpoint is not read on every lookup; a directory's fingerprint covers every file below it by relative path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from captionlab.utils import atomic_write_json, cache_dir, file_lock

HASH_LIMIT = 64 * 1024 * 1024  # bytes; larger files are fingerprinted by (size, mtime_ns)
_SKIP = {"__pycache__", ".ipynb_checkpoints", ".git"}


def _file_digest(path: str | Path, h: "hashlib._Hash", content: bool = True) -> None:
    st = os.stat(path)
    if not content or st.st_size > HASH_LIMIT:
        h.update(f"large:{st.st_size}:{st.st_mtime_ns}".encode())
        return
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


_HELD: dict[tuple[str, bool], str] | None = None  # fingerprints taken inside `held_fingerprints()`


@contextmanager
def held_fingerprints() -> Iterator[None]:
    """Inside this block each path is fingerprinted once: a batch of lookups on the same inputs (02's attempts share
    the data folders and model files) reads them once, not once per lookup. Nested blocks share the outer one's."""
    global _HELD
    outer = _HELD
    if outer is None:
        _HELD = {}
    try:
        yield
    finally:
        if outer is None:
            _HELD = None


def fingerprint(path: str | os.PathLike, content: bool = True) -> str:
    """A short digest of a file's or a directory tree's content (missing path: a fixed 'missing' digest).

    `content=False` digests names, sizes and modification times only (a folder of many images).
    """
    held = _HELD
    if held is None:
        return _fingerprint(Path(path), content)
    key = (os.path.abspath(path), content)
    if key not in held:
        held[key] = _fingerprint(Path(path), content)
    return held[key]


def _fingerprint(path: Path, content: bool) -> str:
    h = hashlib.sha256()
    if not path.exists():
        h.update(b"missing")
    elif path.is_file():
        _file_digest(path, h, content)
    else:
        base = str(path)
        for root, dirs, files in os.walk(base):  # plain strings: pathlib costs 4x more on a folder of 4,000 images
            dirs[:] = sorted(d for d in dirs if d not in _SKIP and not d.startswith(".tmp"))
            rel = "" if root == base else root[len(base) + 1:] + "/"
            for name in sorted(files):
                if name.endswith(".lock"):
                    continue
                h.update((rel + name).encode() + b"\0")
                _file_digest(os.path.join(root, name), h, content)
    return h.hexdigest()[:16]


_SOURCE_FP: str | None = None


def source_fingerprint() -> str:
    """Digest of captionlab's own Python source: a code change invalidates every cached result."""
    global _SOURCE_FP
    if _SOURCE_FP is None:
        h = hashlib.sha256()
        pkg = Path(__file__).resolve().parent
        for p in sorted(pkg.rglob("*.py")):
            if "__pycache__" not in p.parts:
                h.update(str(p.relative_to(pkg)).encode() + b"\0" + p.read_bytes())
        _SOURCE_FP = h.hexdigest()[:16]
    return _SOURCE_FP


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return _canonical(asdict(obj))
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot key a result on a {type(obj).__name__}: pass JSON-able configuration values")


@dataclass
class CachedResult:
    """A stored (or just computed) result: its JSON value, its folder, and whether it came from the cache."""

    value: dict[str, Any]
    dir: Path
    key: str
    reused: bool
    seconds: float  # how long the computation took when it ran

    def describe(self, label: str) -> str:
        """One line saying whether `label` was reused or computed, and how long it took to compute."""
        verb = "reused cached" if self.reused else "computed"
        return f"{label}: {verb} result {self.key} ({self.seconds:.1f} s to compute)"


class ResultCache:
    """Get-or-compute results keyed by kind + configuration + input fingerprints + source fingerprint."""

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else cache_dir() / "results"
        self.enabled = enabled

    def key(self, kind: str, config: Mapping[str, Any], inputs: Iterable[str | os.PathLike] = (),
            listings: Iterable[str | os.PathLike] = ()) -> str:
        """The entry key: a digest of everything that produced the result (`listings`: folders keyed by listing)."""
        doc = {"kind": kind, "config": _canonical(config), "source": source_fingerprint(),
               "inputs": {os.fspath(p): fingerprint(p) for p in inputs},
               "listings": {os.fspath(p): fingerprint(p, content=False) for p in listings}}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def stored(self, kind: str, key: str) -> bool:
        """Whether the entry `key` (from `key()`) is stored, so `run` would return it (False when disabled)."""
        return self.enabled and (self.root / kind / key / "result.json").exists()

    def run(self, kind: str, config: Mapping[str, Any], compute: Callable[[Path], dict[str, Any]],
            inputs: Iterable[str | os.PathLike] = (), listings: Iterable[str | os.PathLike] = ()) -> CachedResult:
        """Return the stored result, or call `compute(out_dir)` (it may write files there) and store its value."""
        key = self.key(kind, config, inputs, listings)
        entry = self.root / kind / key
        if self.stored(kind, key):
            return self._load(entry, key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(entry.parent / f".{key}.lock"):
            if self.enabled and (entry / "result.json").exists():  # another process computed it meanwhile
                return self._load(entry, key)
            # The work folder is kept when `compute` fails or is killed, so a rerun with the same key finds what it
            # wrote (a training run resumes from its last checkpoint); it becomes the entry once `compute` returns.
            work = entry.parent / f".pending-{key}"
            if not self.enabled and work.exists():
                shutil.rmtree(work)
            work.mkdir(exist_ok=True)
            t0 = time.perf_counter()
            value = compute(work)
            seconds = time.perf_counter() - t0
            value = _relocate(value, work, entry)
            atomic_write_json(work / "result.json", {"kind": kind, "key": key, "seconds": round(seconds, 2),
                                                     "config": _canonical(config), "value": value})
            if entry.exists():
                shutil.rmtree(entry)
            work.rename(entry)
        return CachedResult(value=value, dir=entry, key=key, reused=False, seconds=seconds)

    @staticmethod
    def _load(entry: Path, key: str) -> CachedResult:
        doc = json.loads((entry / "result.json").read_text(encoding="utf-8"))
        return CachedResult(value=doc["value"], dir=entry, key=key, reused=True, seconds=float(doc["seconds"]))


def _relocate(value: Any, tmp: Path, entry: Path) -> Any:
    """Rewrite paths inside the temporary folder to where the entry will live once renamed into place."""
    if isinstance(value, str) and value.startswith(str(tmp)):
        return str(entry) + value[len(str(tmp)):]
    if isinstance(value, Mapping):
        return {k: _relocate(v, tmp, entry) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relocate(v, tmp, entry) for v in value]
    return value
