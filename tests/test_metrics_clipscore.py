"""CLIP loader and CLIPScore / RefCLIPScore: exact against the model's own embeddings, batch-size invariant, and
the demo CLIP prefers true captions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captionlab.data.captions import load_captions
from captionlab.data.images import load_image
from captionlab.errors import ConfigError
from captionlab.metrics.clipscore import ClipScore, RefClipScore, clip_scores, harmonic_mean
from captionlab.models.clip import load_clip


@pytest.fixture(scope="module")
def clip(demo_clip):
    return load_clip(demo_clip, device="cpu")


@pytest.fixture(scope="module")
def val(demo_world):
    ann = load_captions(demo_world / "p2_data" / "val.json")
    return ann, demo_world / "p2_data" / "images" / "val"


def test_load_clip_backend_api(clip, demo_clip) -> None:
    assert clip.kind == "hf" and clip.context_length > 0 and clip.logit_scale > 0
    assert load_clip(str(demo_clip)) is clip  # loaded once
    assert load_clip(clip) is clip
    assert not clip.model.training and not any(p.requires_grad for p in clip.model.parameters())
    assert isinstance(clip.vision_model, torch.nn.Module) and clip.vision_model is clip.model.vision_model
    from PIL import Image

    img = clip.encode_images([Image.new("RGB", (64, 64), "red"), Image.new("RGB", (40, 30), "blue")])
    txt = clip.encode_texts(["a red circle", "a blue square"])
    assert img.dtype == torch.float32 and img.device.type == "cpu" and img.shape == (2, clip.embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert clip.encode_texts([]).shape == (0, clip.embed_dim)


def test_long_texts_truncate_with_eos(clip) -> None:
    """Texts beyond the context length are cut to ctx-1 tokens + EOS (as clip.tokenize(truncate=True))."""
    n = clip.context_length
    long = clip.encode_texts(["red " * (3 * n)])
    cut = clip.encode_texts(["red " * (n - 2)])  # bos + (n-2) words + eos = n tokens
    assert torch.allclose(long, cut, atol=1e-6)
    assert not torch.allclose(long, clip.encode_texts(["red " * (n - 4)]), atol=1e-4)


def test_clipscore_equals_direct_computation_and_is_batch_invariant(clip, demo_clip, val) -> None:
    from transformers import CLIPModel, CLIPProcessor

    ann, img_dir = val
    stems = ann.stems[:24]
    images = [load_image(ann.image_path(img_dir, s)) for s in stems]
    caps = [ann.captions[s][0] for s in stems[1:]] + [ann.captions[stems[0]][0]]  # some wrong, some right pairs
    caps[:12] = [ann.captions[s][1] for s in stems[:12]]
    refs = [ann.captions[s] for s in stems]

    model = CLIPModel.from_pretrained(demo_clip).eval()
    proc = CLIPProcessor.from_pretrained(demo_clip)
    with torch.no_grad():
        out = model(**proc(text=caps, images=images, return_tensors="pt", padding=True, truncation=True))
        flat_refs = [r for rs in refs for r in rs]
        ref_out = model.get_text_features(**proc(text=flat_refs, return_tensors="pt", padding=True, truncation=True))
    ref_emb = torch.nn.functional.normalize(getattr(ref_out, "pooler_output", ref_out), dim=-1)
    cos = (out.image_embeds * out.text_embeds).sum(-1).double().numpy()
    direct = 2.5 * np.maximum(cos, 0)
    ref_cos = (ref_emb.view(len(stems), 5, -1) * out.text_embeds[:, None]).sum(-1).max(-1).values.double().numpy()
    r = np.maximum(ref_cos, 0)
    with np.errstate(invalid="ignore"):
        direct_ref = np.where(direct + r > 0, 2 * direct * r / (direct + r), 0.0)

    results = [clip_scores(clip, images, caps, refs, batch_size=bs) for bs in (1, 5, 64)]
    for r in results:
        np.testing.assert_allclose(r["clipscore"], direct, atol=1e-5)
        np.testing.assert_allclose(r["refclipscore"], direct_ref, atol=1e-5)
        np.testing.assert_allclose(r["clipscore"], results[0]["clipscore"], atol=1e-6)
    assert (direct[:12] > 0).all()  # a trained model: the max(., 0) is not what makes these agree
    assert direct[:12].mean() > direct[12:].mean()  # right captions beat shifted ones

    # pycocoevalcap-shaped wrappers agree, and paths work as well as PIL images
    res = {s: [c] for s, c in zip(stems, caps)}
    paths = {s: ann.image_path(img_dir, s) for s in stems}
    mean, per = ClipScore(clip, paths, batch_size=7).compute_score(None, res)
    assert mean == pytest.approx(direct.mean(), abs=1e-5) and per == pytest.approx(direct, abs=1e-5)
    mean, per = RefClipScore(clip, paths).compute_score(dict(zip(stems, refs)), res)
    assert per == pytest.approx(direct_ref, abs=1e-5)


def test_harmonic_mean_edge_cases() -> None:
    np.testing.assert_allclose(harmonic_mean([0.0, 1.0, 2.0], [0.0, 1.0, 0.5]), [0.0, 1.0, 0.8])


def test_demo_clip_ranks_true_caption_first(clip, val) -> None:
    """For >= 90 % of p2 val images the tiny CLIP scores the image's caption above another image's caption."""
    ann, img_dir = val
    stems = ann.stems
    img = clip.encode_images([load_image(ann.image_path(img_dir, s)) for s in stems])
    perm = np.random.default_rng(0).permutation(len(stems))
    perm = np.where(perm == np.arange(len(stems)), (perm + 1) % len(stems), perm)
    wins = []
    for k in range(5):  # each of the five references against the same-index reference of another image
        own = clip.encode_texts([ann.captions[s][k] for s in stems])
        other = own[torch.from_numpy(perm)]
        wins.append(((img * own).sum(-1) > (img * other).sum(-1)).numpy())
    rate = float(np.mean(wins))
    print(f"demo CLIP ranks the true caption first for {rate:.1%} of (image, reference) pairs "
          f"({np.mean(wins[0]):.1%} with the first reference)")
    assert np.mean(wins[0]) >= 0.9 and rate >= 0.9


def test_bad_specs_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="demo CLIP"):
        load_clip(tmp_path / "nope")
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        load_clip("open_clip:NotAModel-99")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load an HF CLIP"):
        load_clip(tmp_path / "empty")


def test_open_clip_random_weights_offline() -> None:
    """`open_clip:ARCH` without a tag builds random weights offline, behind the same API."""
    from PIL import Image

    clip = load_clip("open_clip:ViT-S-32", device="cpu")
    assert clip.kind == "open_clip" and clip.context_length == 77
    s = clip_scores(clip, [Image.new("RGB", (50, 50), "red")] * 3, ["a", "b " * 200, "c"], [["x"], ["y", "z"], ["c"]])
    assert s["clipscore"].shape == (3,) and np.all(s["clipscore"] >= 0) and np.isfinite(s["refclipscore"]).all()
    assert clip.vision_model is clip.model.visual


def test_image_embeddings_are_cached_by_what_produced_them(clip, val, tmp_path, monkeypatch) -> None:
    import os
    import shutil

    from captionlab.metrics import clipscore

    monkeypatch.setenv("CAPTIONLAB_CACHE", str(tmp_path / "cache"))
    ann, img_dir = val
    paths = []
    for s in ann.stems[:6]:
        paths.append(tmp_path / f"{s}.jpg")
        shutil.copy(ann.image_path(img_dir, s), paths[-1])
    calls = {"n": 0}
    encode = type(clip).encode_images

    def counting(self, images, batch_size=64, progress=None):
        calls["n"] += len(images)
        return encode(self, images, batch_size=batch_size, progress=progress)

    monkeypatch.setattr(type(clip), "encode_images", counting)
    first = clipscore.encode_image_files(clip, paths, batch_size=4)
    assert calls["n"] == 6 and len(list((tmp_path / "cache" / "clip_images").glob("*.npy"))) == 1
    again = clipscore.encode_image_files(clip, paths, batch_size=4)
    assert calls["n"] == 6 and torch.equal(first, again)  # read back exactly, nothing encoded
    assert torch.equal(clipscore.encode_image_files(clip, paths, batch_size=4, cache=False), first)
    assert calls["n"] == 12
    clipscore.encode_image_files(clip, paths, batch_size=2)  # another batch size: its own entry
    assert calls["n"] == 18
    shutil.copy(ann.image_path(img_dir, ann.stems[7]), paths[0])  # an image replaced: computed again
    os.utime(paths[0], ns=(1, 1))
    changed = clipscore.encode_image_files(clip, paths, batch_size=4)
    assert calls["n"] == 24 and not torch.equal(changed[0], first[0]) and torch.equal(changed[1:], first[1:])
