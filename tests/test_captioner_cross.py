"""Gated cross-attention conditioning: wiring and budget, identity at init, cached decoding equal to the no-cache
reference, word attention read from the cross-attention layers, trainable-only checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from captionlab.errors import BudgetError, ConfigError
from captionlab.models.captioner import Captioner, CaptionerConfig, load_captioner


def _cfg(tiny: dict, **kw) -> CaptionerConfig:
    return CaptionerConfig(encoder=tiny["encoder"], decoder=tiny["decoder"], lora_dropout=0.0,
                           conditioning="cross", **kw)


def _images(demo_world: Path, n: int = 3) -> list[Path]:
    return sorted((demo_world / "p2_data" / "images" / "val").glob("*.jpg"))[:n]


def _open_gates(m: Captioner, seed: int = 0) -> Captioner:
    """Random weights for the zero-initialised parts (LoRA B, gates) so every branch changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n or "gate_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "gate_" in n else 0.5))
    return m


@pytest.fixture(scope="module")
def cross(tiny_captioner_models) -> Captioner:
    torch.manual_seed(0)
    return _open_gates(Captioner(_cfg(tiny_captioner_models), verbose=False)).eval()


def test_cross_wiring_budget_and_identity_at_init(tiny_captioner_models, demo_world: Path) -> None:
    torch.manual_seed(0)
    m = Captioner(_cfg(tiny_captioner_models, cross_every=1), verbose=False).eval()
    blocks = m.decoder.transformer.h
    assert all(hasattr(b, "crossattn") for b in blocks)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert all("lora_" in n or ".crossattn." in n or n.startswith("projector.") for n in trainable)
    assert any(".crossattn.gate_attn" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert m.report["trainable"] == sum(p.numel() for p in m.parameters() if p.requires_grad)
    # the visual tokens are keys of the cross-attention, not positions: the finest grid, a full caption budget
    assert m.image_grid() == (4, 4) and m.image_key_span() == (1, 17)
    Captioner(_cfg(tiny_captioner_models, max_caption_tokens=62), verbose=False)
    # gates start at 0: the pretrained LM is untouched, the image cannot change the loss yet
    ids, mask = m.encode_captions(["a red circle", "two blue squares"])
    px = m._pixels(_images(demo_world, 2))
    with torch.no_grad():
        assert torch.equal(m(ids, mask, pixel_values=px), m(ids, mask, pixel_values=px.flip(0)))
        _open_gates(m)
        assert not torch.allclose(m(ids, mask, pixel_values=px), m(ids, mask, pixel_values=px.flip(0)))
    every2 = Captioner(_cfg(tiny_captioner_models, cross_every=2, cross_dim=32), verbose=False)
    assert [hasattr(b, "crossattn") for b in every2.decoder.transformer.h] == [True, False]
    assert every2.report["trainable"] < m.report["trainable"]
    with pytest.raises(BudgetError, match="budget"):
        Captioner(_cfg(tiny_captioner_models, trainable_budget=m.report["trainable"] - 1), verbose=False)
    with pytest.raises(ConfigError, match="cross_every"):
        Captioner(_cfg(tiny_captioner_models, cross_every=0), verbose=False)
    with pytest.raises(ConfigError, match="cross_dim"):
        Captioner(_cfg(tiny_captioner_models, cross_dim=30), verbose=False)
    with pytest.raises(ConfigError, match="conditioning"):
        Captioner(_cfg(tiny_captioner_models).__class__(encoder=m.config.encoder, decoder=m.config.decoder,
                                                        conditioning="film"), verbose=False)


def test_cross_cached_search_equals_reference_and_batching(cross: Captioner, demo_world: Path) -> None:
    from captionlab.decode import beam_search, greedy_search, reference_beam, reference_greedy

    images = _images(demo_world, 3)
    with torch.no_grad():
        vis = cross.visual_embeds(pixel_values=cross._pixels(images))
        eos = cross.tokenizer.eos_token_id
        assert greedy_search(cross.lm_decoder(vis), 12, eos) == \
            [reference_greedy(cross.lm_decoder(vis[i:i + 1]), 12, eos)[0] for i in range(3)]
        assert beam_search(cross.lm_decoder(vis), 3, 12, eos) == \
            [reference_beam(cross.lm_decoder(vis[i:i + 1]), 3, 12, eos)[0] for i in range(3)]
    batched = cross.generate(images, method="beam", beam_size=3, max_new_tokens=12, batch_size=3)
    assert batched == cross.generate(images, method="beam", beam_size=3, max_new_tokens=12, batch_size=1)
    assert len(set(batched)) > 1  # the image matters


def test_cross_attention_capture_matches_manual(cross: Captioner, demo_world: Path) -> None:
    from captionlab.attention.capture import capture_captioner, gpt_capture, num_heads, num_layers

    assert num_layers(cross) == 2 and num_heads(cross) == 4
    images = _images(demo_world, 2)
    res = capture_captioner(cross, images, layer=1, heads="mean", unit="tokens", max_new_tokens=8,
                            min_new_tokens=4, progress=False)
    start, end = cross.image_key_span()
    for r, im in zip(res, images):
        assert r.maps.shape == (len(r.token_ids), 4, 4) and len(r.token_ids) >= 4
        seen: list[torch.Tensor] = []
        with torch.no_grad(), gpt_capture(cross.decoder, {1: seen.append}, cross=True):
            vis = cross.visual_embeds(pixel_values=cross._pixels([im]))
            ids = torch.tensor([[cross.tokenizer.bos_token_id] + r.token_ids])
            cross.decoder(input_ids=ids, cross_states=vis)
        att = seen[0][0].mean(0)  # (T, V): query t predicts token t
        manual = att[:len(r.token_ids), start:end].reshape(-1, 4, 4).numpy()
        np.testing.assert_allclose(r.maps, manual, atol=2e-5)
    with pytest.raises(ConfigError, match="rollout"):
        capture_captioner(cross, images[:1], rollout=True, progress=False)


def test_cross_checkpoint_roundtrip(cross: Captioner, demo_world: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ckpt = cross.save_trainable(tmp_path / "ckpt")
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert any(".crossattn." in k for k in saved)
    assert set(saved) == {n for n, p in cross.named_parameters() if p.requires_grad}
    images = _images(demo_world, 3)
    again = load_captioner(ckpt)
    assert again.cross and again.generate(images, method="greedy", max_new_tokens=10) == \
        cross.generate(images, method="greedy", max_new_tokens=10)
