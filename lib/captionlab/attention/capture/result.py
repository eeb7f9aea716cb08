"""The result type of attention capture: one image's caption with a map over the patch grid per word / token."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from captionlab.attention.grids import Heads, reduce_heads
from captionlab.errors import ConfigError


@dataclass
class AttentionResult:
    """One image's caption and, per displayed unit (word or token), an attention map over the patch grid."""

    tokens: list[str]  # displayed units: words (default) or sub-word tokens
    maps: np.ndarray  # (n_units, gh, gw) raw attention on the image patches, heads/layers reduced
    grid: tuple[int, int]
    image: Image.Image | None  # the (centre-cropped) image the maps are laid over
    caption: str
    layer: int | list[int] | str  # layer index, list of averaged layers, or "rollout"
    heads: Heads
    name: str | None = None  # image name (file stem), used for file names
    token_ids: list[int] = field(default_factory=list)
    token_strs: list[str] = field(default_factory=list)  # sub-word tokens as decoded pieces
    head_maps: np.ndarray | None = None  # (n_tokens, n_heads, gh, gw) per token, layers averaged
    word_groups: list[list[int]] = field(default_factory=list)  # token indices of each word
    unit: str = "words"

    @property
    def token_maps(self) -> np.ndarray:
        """(n_tokens, gh, gw): per sub-word token, heads reduced as `heads`."""
        if self.head_maps is None:
            return self._rollout_token_maps()
        return reduce_heads(torch.from_numpy(self.head_maps), self.heads).numpy()

    def with_heads(self, heads: Heads) -> "AttentionResult":
        """The same capture with another head reduction ("mean", "max", index) — no recomputation."""
        if self.head_maps is None:
            raise ConfigError("this result keeps no per-head maps (rollout): recapture with other heads")
        return replace(self, heads=heads)._with_unit(self.unit)

    def as_tokens(self) -> "AttentionResult":
        """One map per sub-word token."""
        return self._with_unit("tokens")

    def as_words(self) -> "AttentionResult":
        """One map per word (sub-word token maps averaged)."""
        return self._with_unit("words")

    def _with_unit(self, unit: str) -> "AttentionResult":
        if unit not in ("words", "tokens"):
            raise ConfigError(f"unit must be 'words' or 'tokens', got {unit!r}")
        tmaps = self.token_maps if self.head_maps is not None else self._rollout_token_maps()
        if unit == "tokens":
            return replace(self, tokens=list(self.token_strs), maps=tmaps, unit="tokens")
        words = ["".join(self.token_strs[i] for i in g).strip() for g in self.word_groups]
        return replace(self, tokens=words, maps=_merge(tmaps, self.word_groups), unit="words")

    def _rollout_token_maps(self) -> np.ndarray:
        if self.unit == "tokens":
            return self.maps
        raise ConfigError("a word-level rollout result cannot be split into tokens: capture with unit='tokens'")


def _merge(token_maps: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    gh, gw = token_maps.shape[-2:]
    if not groups:
        return np.zeros((0, gh, gw), dtype=np.float32)
    return np.stack([token_maps[g].mean(axis=0) for g in groups]).astype(np.float32)


def merge_words(token_ids: Sequence[int], tokenizer: Any) -> tuple[list[str], list[list[int]]]:
    """Decoded piece of every token and the token groups forming words (a word starts after whitespace).

    Pieces come from incremental decoding (text of ids[:i+1] minus text of ids[:i]), so byte-level BPE and
    SentencePiece tokenizers both work; whitespace-only pieces and tokens that decode to nothing (special
    tokens) join the current word; punctuation glued to a word stays with it.
    """
    pieces: list[str] = []
    prev = ""
    for i in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[: i + 1]), skip_special_tokens=True)
        pieces.append(text[len(prev):] if text.startswith(prev) else text)
        prev = text
    groups: list[list[int]] = []
    text = ""
    for i, p in enumerate(pieces):
        starts_word = bool(p.strip()) and (not groups or p[:1].isspace() or text[-1:].isspace())
        if starts_word:
            groups.append([i])
        elif groups:
            groups[-1].append(i)
        else:
            groups.append([i])
        text += p
    groups = [g for g in groups if "".join(pieces[i] for i in g).strip()]
    return pieces, groups
