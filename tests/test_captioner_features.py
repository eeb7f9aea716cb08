"""Frozen-encoder feature cache: same values as the encoder, computed once, keyed by encoder + image list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from captionlab.models import features as F


def test_feature_cache_matches_encoder_and_is_reused(tiny_captioner_models, demo_world: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    from captionlab.models.encoder import load_encoder

    spec = tiny_captioner_models["encoder"]
    enc = load_encoder(spec)
    paths = sorted((demo_world / "p2_data" / "images" / "val").glob("*.jpg"))[:6]
    store = F.cached_features(enc, spec, paths, batch_size=4, root=tmp_path)
    direct = F.encode_images(enc, paths)
    assert store.shape == tuple(direct.shape) == (6, 1 + 16, enc.dim)
    assert torch.allclose(store[[0, 5]], direct[[0, 5]], atol=2e-3 * direct.abs().max().item())
    exact = F.cached_features(enc, spec, paths, dtype="float32", root=tmp_path)
    assert torch.equal(exact[list(range(6))], direct)

    def boom(*a, **k):
        raise AssertionError("encoder ran although the features are cached")

    monkeypatch.setattr(F, "encode_images", boom)
    again = F.cached_features(enc, spec, paths, batch_size=4, root=tmp_path)
    assert again.path == store.path
    assert F.cache_key(spec, paths[:5]) != F.cache_key(spec, paths)
    assert F.cache_key(spec + "x", paths) != F.cache_key(spec, paths)
    with pytest.raises(AssertionError, match="encoder ran"):
        F.cached_features(enc, spec, paths[:2], root=tmp_path)
    assert not list(tmp_path.glob(".*.npy"))  # the failed build left no temporary file


def test_generate_cached_encodes_once_and_equals_generate_on_the_stored_features(tiny_captioner_models, demo_world: Path,
                                                                                  tmp_path: Path, monkeypatch) -> None:
    from captionlab.models.captioner import Captioner, CaptionerConfig

    cap = Captioner(CaptionerConfig(encoder=tiny_captioner_models["encoder"], decoder=tiny_captioner_models["decoder"],
                                    peft="lora", lora_rank=2), verbose=False).eval()
    paths = sorted((demo_world / "p2_data" / "images" / "val").glob("*.jpg"))[:5]
    first = cap.generate_cached(paths, root=tmp_path, method="greedy", max_new_tokens=6, batch_size=2)
    store = F.cached_features(cap.encoder, cap.config.encoder, paths, root=tmp_path)
    assert torch.equal(store[1:3], store[[1, 2]]) and store[3:].shape[0] == 2
    assert first == cap.generate(features=store[list(range(5))], method="greedy", max_new_tokens=6)
    calls = []
    monkeypatch.setattr(cap.encoder, "forward", lambda *a, **k: calls.append(1))
    again = cap.generate_cached(paths, root=tmp_path, method="beam", beam_size=2, max_new_tokens=6)
    assert not calls and again == cap.generate(features=store[list(range(5))], method="beam", beam_size=2,
                                               max_new_tokens=6)
