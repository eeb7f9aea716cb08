"""What git would store for a notebook: the working file passed through the clean filter `.gitattributes` names."""

from __future__ import annotations

import functools
import shlex
import subprocess
from pathlib import Path


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=check)


def clean_filter(repo: Path, path: Path) -> str | None:
    """The clean command git runs on `path` when it is staged, or None (no filter attribute / driver not set up)."""
    rel = path.resolve().relative_to(repo.resolve())
    proc = _git(repo, "check-attr", "filter", "--", str(rel), check=False)
    attr = proc.stdout.strip().rsplit(": ", 1)[-1] if proc.returncode == 0 else ""  # not a git checkout: no filter
    if attr in ("unspecified", "unset", "set", ""):
        return None
    cmd = _git(repo, "config", f"filter.{attr}.clean", check=False).stdout.strip()
    return cmd or None


def staged_text(repo: Path, path: Path) -> str:
    """The text `git add path` would store (git runs the filter in the work tree root, `%f` = the path)."""
    cmd = clean_filter(repo, path)
    data = path.read_bytes()
    if cmd is None:
        return data.decode("utf-8")
    rel = str(path.resolve().relative_to(repo.resolve()))
    return _run_filter(cmd.replace("%f", shlex.quote(rel)), str(repo.resolve()), data)


@functools.lru_cache(maxsize=64)
def _run_filter(cmd: str, cwd: str, data: bytes) -> str:
    """The filter's output for these bytes (a pure function of them: one nbstripout run, ~4 s, per distinct input)."""
    out = subprocess.run(cmd, shell=True, cwd=cwd, input=data, capture_output=True, check=True)
    return out.stdout.decode("utf-8")
