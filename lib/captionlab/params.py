"""Params files (YAML): load, override, resolve `{placeholders}` against other keys and the environment."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from captionlab.errors import ConfigError
from captionlab.utils import REPO_ROOT, cache_dir

_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")
_ESCAPED = re.compile(r"\{\{([^{}]*)\}\}")


def load_params(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML params file (a flat or nested mapping), apply overrides, resolve placeholders."""
    params: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_absolute() and not p.exists():
            p = REPO_ROOT / p
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: params file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        params.update(loaded)
    params.update(overrides or {})
    return resolve(params)


def resolve(params: dict[str, Any]) -> dict[str, Any]:
    """Replace `{name}` in string values by other top-level values, `{cache}` or `{repo}` (repeatedly).

    `{{name}}` is an escape for a literal `{name}` (e.g. a prompt template such as `a photo of {{object}}`).
    """
    env = {"cache": str(cache_dir()), "repo": str(REPO_ROOT)}

    def lookup(name: str) -> str:
        if name in params and not isinstance(params[name], (dict, list)):
            return str(params[name])
        if name in env:
            return env[name]
        raise ConfigError(f"params: unknown placeholder {{{name}}}")

    def sub(value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            for _ in range(10):
                new = _PLACEHOLDER.sub(lambda m: lookup(m.group(1)), value)
                if new == value:
                    break
                value = new
            return _ESCAPED.sub(r"{\1}", value)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    return {k: sub(v) for k, v in params.items()}
