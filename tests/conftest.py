"""Shared session fixtures: the demo world and its tiny models, built once into $CAPTIONLAB_CACHE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CAPTIONLAB_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))


@pytest.fixture(scope="session")
def demo_world() -> Path:
    """Root of the full demo world (course layout), seed 0."""
    from captionlab.demo import ensure_world

    return ensure_world(0)


@pytest.fixture(scope="session")
def demo_clip(demo_world: Path) -> Path:
    """Directory of the tiny CLIP trained on the demo world."""
    from captionlab.demo import ensure_model

    return ensure_model("clip", 0)


@pytest.fixture(scope="session")
def demo_gpt2(demo_world: Path) -> Path:
    """Directory of the tiny GPT-2 LM trained on demo captions."""
    from captionlab.demo import ensure_model

    return ensure_model("gpt2", 0)


@pytest.fixture(scope="session")
def demo_llava(demo_world: Path) -> Path:
    """Directory of the tiny LLaVA trained on the demo world."""
    from captionlab.demo import ensure_model

    return ensure_model("llava", 0)
