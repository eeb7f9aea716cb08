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
