"""One model-spec parser: every form parses to a typed ModelSpec, bad specs name the spec, and every loader uses it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from captionlab.errors import ConfigError
from captionlab.models.specs import ModelSpec, parse_spec
from captionlab.utils import REPO_ROOT


def test_every_form(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    assert parse_spec(f"timm:vit_large_patch14_clip_224.openai@{weights}") == ModelSpec(
        "timm", "vit_large_patch14_clip_224.openai", weights=str(weights),
        raw=f"timm:vit_large_patch14_clip_224.openai@{weights}")
    assert parse_spec(f"timm:vit_tiny@{weights}").local_path == weights
    oc = parse_spec("open_clip:ViT-B-32:openai")
    assert (oc.kind, oc.name, oc.tag, oc.local_path) == ("open_clip", "ViT-B-32", "openai", None)
    assert parse_spec("open_clip:ViT-B-32").tag is None
    assert parse_spec(f"hfclip:{tmp_path}").local_path == tmp_path
    assert parse_spec("hf:openai/clip-vit-base-patch32").kind == "hf"
    assert parse_spec(str(tmp_path)).kind == "path" and parse_spec("./models/x").kind == "path"
    assert parse_spec("a/b/c.bin").kind == "path"
    assert parse_spec("llava-hf/llava-1.5-7b-hf") == ModelSpec("hub", "llava-hf/llava-1.5-7b-hf",
                                                               raw="llava-hf/llava-1.5-7b-hf")
    assert str(oc) == "open_clip:ViT-B-32:openai"


def test_errors_name_the_spec_and_the_accepted_forms() -> None:
    with pytest.raises(ConfigError, match="encoder spec is empty"):
        parse_spec("", what="encoder")
    with pytest.raises(ConfigError, match=r"CLIP spec 'open_clip:': nothing after open_clip:"):
        parse_spec("open_clip:", what="CLIP")
    with pytest.raises(ConfigError, match=r"ViT spec 'llava-hf/x': expected timm:<name>\[@<file>\] \| hfclip:<dir>"):
        parse_spec("llava-hf/x", allowed=("timm", "hfclip"), what="ViT")


def test_loaders_reject_bad_specs_through_the_parser(tmp_path: Path) -> None:
    from captionlab.models.encoder import load_encoder
    from captionlab.models.llava import load_llava
    from captionlab.models.vit import load_vit

    with pytest.raises(ConfigError, match="encoder spec 'org/name': expected timm"):
        load_encoder("org/name")
    with pytest.raises(ConfigError, match="ViT spec 'open_clip:ViT-B-32': expected"):
        load_vit("open_clip:ViT-B-32", num_classes=2)
    with pytest.raises(ConfigError, match="LLaVA spec 'timm:x': expected"):
        load_llava("timm:x")
    with pytest.raises(ConfigError, match="LLaVA model directory not found"):
        load_llava(str(tmp_path / "missing" / "llava"))


@pytest.mark.parametrize("module", ["encoder", "clip", "vit", "features", "llava"])
def test_every_loader_parses_specs_with_the_one_parser(module: str) -> None:
    text = (REPO_ROOT / "lib" / "captionlab" / "models" / f"{module}.py").read_text()
    assert "from captionlab.models.specs import parse_spec" in text and "parse_spec(" in text
    assert not re.search(r"spec\w*\.(partition|split|rpartition)\(|spec\w*\.startswith\(|spec\[\d+:\]", text), (
        f"models/{module}.py parses a spec string by hand")
