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
