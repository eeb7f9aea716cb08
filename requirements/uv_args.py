"""Print the uv flags that make `uv pip install` read the same package sources as this machine's pip.

uv does not read pip's configuration (pip.conf, PIP_* variables); pip does, so we ask it
(`python -m pip config list`) and turn its index-url / extra-index-url / find-links / constraint settings into uv
flags. `--index-strategy unsafe-best-match` gives pip's rule: the best version over all sources wins.
Usage: python requirements/uv_args.py   (prints one line of flags; nothing configured: only the strategy flag)
"""

from __future__ import annotations

import shlex
import subprocess
import sys

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}


def pip_settings(listing: str) -> list[tuple[str, str]]:
    """(option, value) pairs from `pip config list` output, e.g. "global.find-links='/opt/wheels'"."""
    out = []
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        option = key.rsplit(".", 1)[-1]
        if option in FLAGS:
            for item in shlex.split(value.strip().strip("'\"")):
                out.append((option, item))
    return out


def uv_flags(settings: list[tuple[str, str]]) -> list[str]:
    """uv flags for pip's settings (duplicates dropped; one index-url at most, the last one pip would use)."""
    flags: list[str] = ["--index-strategy", "unsafe-best-match"]
    seen: set[tuple[str, str]] = set()
    index = [v for o, v in settings if o == "index-url"]
    if index:
        flags += ["--index-url", index[-1]]
    for option, value in settings:
        if option != "index-url" and (option, value) not in seen:
            seen.add((option, value))
            flags += [FLAGS[option], value]
    return flags


def main() -> int:
    res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    print(shlex.join(uv_flags(pip_settings(res.stdout if res.returncode == 0 else ""))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
