"""Model specs: the one parser that turns a params string into a typed `ModelSpec` (every loader takes its output).

    timm:<model name>[@<weights file>]     timm.create_model by name; `@file`: local safetensors/.bin weights
    open_clip:<arch>[:<pretrained tag>]    open_clip (no tag: random weights)
    hfclip:<dir or hub id>                 an HF CLIP checkpoint (its vision tower where a tower is needed)
    hf:<dir or hub id>                     an HF checkpoint (Auto classes)
    <path>                                 a local file or directory (kind "path")
    <org>/<name>                           an HF hub id (kind "hub"), e.g. llava-hf/llava-1.5-7b-hf
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from captionlab.errors import ConfigError

PREFIXED = ("timm", "open_clip", "hfclip", "hf")
KINDS = (*PREFIXED, "path", "hub")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: `kind` (one of KINDS), the model `name` (timm name, open_clip arch, dir, file or hub id),
    the open_clip pretrained `tag`, timm's local `weights` file, and the `raw` string it came from."""

    kind: str
    name: str
    tag: str | None = None
    weights: str | None = None
    raw: str = ""

    @property
    def local_path(self) -> Path | None:
        """The existing local file or directory the spec points at (the name, else the weights file), or None."""
        for candidate in (self.name, self.weights):
            if candidate and self.kind != "open_clip":
                p = Path(candidate).expanduser()
                if p.exists():
                    return p
        return None

    def __str__(self) -> str:
        return self.raw


def _looks_like_path(text: str) -> bool:
    """A path rather than a hub id: exists, starts with / . ~, or has more than the one `org/name` slash."""
    return (Path(text).expanduser().exists() or text.startswith((os.sep, ".", "~"))
            or text.strip("/").count("/") > 1 or os.sep != "/" and os.sep in text)


def parse_spec(spec: str | os.PathLike | ModelSpec, allowed: Iterable[str] | None = None,
               what: str = "model") -> ModelSpec:
    """Parse a model spec string; ConfigError naming `what` and the spec if it is malformed or of a kind not `allowed`."""
    if isinstance(spec, ModelSpec):
        parsed = spec
    else:
        raw = str(spec).strip()
        if not raw:
            raise ConfigError(f"{what} spec is empty")
        prefix, sep, rest = raw.partition(":")
        if sep and prefix in PREFIXED:
            if not rest:
                raise ConfigError(f"{what} spec {raw!r}: nothing after {prefix}:")
            if prefix == "timm":
                name, _, weights = rest.partition("@")
                parsed = ModelSpec("timm", name, weights=weights or None, raw=raw)
            elif prefix == "open_clip":
                arch, _, tag = rest.partition(":")
                if not arch:
                    raise ConfigError(f"{what} spec {raw!r}: expected open_clip:ARCH[:PRETRAINED_TAG]")
                parsed = ModelSpec("open_clip", arch, tag=tag or None, raw=raw)
            else:
                parsed = ModelSpec(prefix, str(Path(rest).expanduser()) if rest.startswith("~") else rest, raw=raw)
        elif _looks_like_path(raw):
            parsed = ModelSpec("path", str(Path(raw).expanduser()), raw=raw)
        else:
            parsed = ModelSpec("hub", raw, raw=raw)
    kinds = tuple(allowed) if allowed is not None else KINDS
    if parsed.kind not in kinds:
        forms = {"timm": "timm:<name>[@<file>]", "open_clip": "open_clip:<arch>[:<tag>]", "hfclip": "hfclip:<dir>",
                 "hf": "hf:<id or dir>", "path": "a local path", "hub": "a hub id <org>/<name>"}
        raise ConfigError(f"{what} spec {parsed.raw!r}: expected {' | '.join(forms[k] for k in kinds)}")
    return parsed
