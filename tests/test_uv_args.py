"""requirements/uv_args.py: uv reads the package sources this machine's pip is configured with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("uv_args", Path(__file__).resolve().parents[1] / "requirements" / "uv_args.py")
uv_args = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(uv_args)

LISTING = """:env:.find-links='/opt/wheels'
:env:.default-timeout='180'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
global.index-url='https://mirror.example/simple'
"""


def test_pip_config_becomes_uv_flags_with_pips_best_match_rule():
    flags = uv_args.uv_flags(uv_args.pip_settings(LISTING))
    assert flags[:2] == ["--index-strategy", "unsafe-best-match"]
    pairs = list(zip(flags[2::2], flags[3::2]))
    assert pairs[0] == ("--index-url", "https://mirror.example/simple")
    assert pairs.count(("--find-links", "/opt/wheels")) == 1  # env and global name the same folder: once
    assert ("--extra-index-url", "file:///opt/pypi/simple") in pairs
    assert ("--extra-index-url", "file:///opt/pypi-more/simple") in pairs
    assert ("--constraint", "/etc/xdg/pip/constraints.txt") in pairs
    assert not any(flag in ("--cert", "--default-timeout") for flag, _ in pairs)  # not source settings


def test_nothing_configured_gives_only_the_strategy():
    assert uv_args.uv_flags(uv_args.pip_settings("")) == ["--index-strategy", "unsafe-best-match"]


def test_overridden_packages_stay_out_of_the_lock_and_the_venv():
    """requirements/overrides.txt leaves rfc3987-syntax out (its import builds a grammar: 3.5 s in every process
    importing nbformat, e.g. each nbstripout filter call): the lock has no pin for it, both the install and the lock
    recipes pass the overrides, and a venv installed from the lock (`make venv`) does not have it."""
    import re
    import sys

    root = Path(__file__).resolve().parents[1]
    never = [line.split(";")[0].strip() for line in (root / "requirements" / "overrides.txt").read_text().splitlines()
             if not line.startswith("#") and re.search(r";\s*sys_platform\s*==\s*\"never\"", line)]
    assert never == ["rfc3987-syntax"]
    pins = {line.split("==")[0].lower() for line in (root / "requirements" / "lock.txt").read_text().splitlines()
            if "==" in line and not line.startswith(" ")}
    assert "jsonschema" in pins and not set(never) & pins
    makefile = (root / "Makefile").read_text()
    assert makefile.count("--overrides $(LOCK_OVERRIDES)") == 2  # `uv pip install` of the lock and `uv pip compile`
    installed = Path(sys.prefix) / ".installed"  # the stamp of `make venv` (not the pip-installed test-latest venv)
    if installed.exists():
        assert importlib.util.find_spec("rfc3987_syntax") is None
