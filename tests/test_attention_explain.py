"""Teacher-forced explanations on tiny random models: raw maps equal generation-time captures, relevancy equals
an independent autograd computation (hand-written forward + .backward / a separately loaded eager LLaVA)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from captionlab.attention import capture_captioner_layers, capture_llava_layers
from captionlab.attention.capture import capture_captioner, llava_decoder_layers
from captionlab.attention.explain import caption_logprobs, explain, explain_all
from captionlab.errors import ConfigError
from test_attention_capture import _captioner, _images, _tiny_captioner_dirs  # noqa: E402 (tests dir on sys.path)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return _tiny_captioner_dirs(tmp_path_factory.mktemp("captioner"))


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    from captionlab.models.llava_train import save_random_llava

    return save_random_llava(tmp_path_factory.mktemp("llava"), seed=0, image_size=64, patch_size=8)


@pytest.fixture(scope="module")
def tiny_llava(tiny_llava_dir):
    from captionlab.models.llava import load_llava

    return load_llava(tiny_llava_dir, device="cpu")


# ------------------------------------------------------------------------ teacher forcing == generation


@pytest.mark.parametrize("peft", ["lora", "prefix"])
def test_captioner_teacher_forced_maps_equal_generation_time(tiny_dirs, peft):
    model = _captioner(tiny_dirs, peft)
    imgs = _images(2, seed=3)
    gen = capture_captioner_layers(model, imgs, layers="all", max_new_tokens=5, progress=False, unit="tokens")
    for b, img in enumerate(imgs):
        ids = gen[0][b].token_ids
        assert len(ids) == 5
        per = explain_all(model, img, ids, methods=["raw"], unit="tokens")
        for j in (0, 1):
            np.testing.assert_allclose(per["raw", j].head_maps, gen[j][b].head_maps, atol=2e-5)
            np.testing.assert_allclose(per["raw", j].maps, gen[j][b].maps, atol=2e-5)
    # rollout over the teacher-forced trace equals the generation-time module's rollout
    roll = capture_captioner(model, imgs[:1], rollout=True, unit="tokens", max_new_tokens=5, progress=False)[0]
    mine = explain(model, imgs[0], roll.token_ids, method="rollout", layer=-1, unit="tokens")
    np.testing.assert_allclose(mine.maps, roll.maps, atol=2e-5)
    assert mine.method == "rollout" and mine.layer == 1


def test_llava_teacher_forced_maps_equal_generation_time(tiny_llava):
    cfg = tiny_llava.model.config
    before = (cfg._attn_implementation, cfg.text_config._attn_implementation, cfg.vision_config._attn_implementation)
    img = _images(1, seed=4)
    gen = capture_llava_layers(tiny_llava, img, "Describe the image.", layers="all", max_new_tokens=5,
                               unit="tokens", progress=False)
    ids = gen[0][0].token_ids
    per = explain_all(tiny_llava, img[0], ids, methods=["raw"], prompt="Describe the image.", unit="tokens")
    for j in (0, 1):
        np.testing.assert_allclose(per["raw", j].head_maps, gen[j][0].head_maps, atol=2e-5)
    # the eager switch is undone: every config back to sdpa
    assert (cfg._attn_implementation, cfg.text_config._attn_implementation,
            cfg.vision_config._attn_implementation) == before == ("sdpa",) * 3
    assert all(lay.self_attn.config is cfg.text_config for lay in llava_decoder_layers(tiny_llava.model))


# --------------------------------------------------------------------- relevancy == independent autograd


def _chefer(atts: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Relevancy after each layer: R = I; R += mean_h((grad * A)^+) @ R (square (T, T) matrices)."""
    T = atts[0].shape[-1]
    R, out = torch.eye(T), []
    for a, g in zip(atts, grads):
        R = R + (g * a).clamp(min=0).mean(0) @ R
        out.append(R.clone())
    return out


def _reference_captioner(model, image, ids):
    """Hand-written forward of the captioner's GPT (prefix conditioning, LoRA) with retain_grad on every
    attention matrix; per token, the logit's gradients by .backward(): [(atts, grads)] and the visual length."""
    from captionlab.models.decoder import GPT

    gpt = next(m for m in model.decoder.modules() if isinstance(m, GPT))
    vis = model.visual_embeds(pixel_values=model.encoder.preprocess([image])).detach()
    toks = torch.tensor([[model.tokenizer.bos_token_id] + list(ids)])
    out = []
    for t in range(len(ids)):
        x = torch.cat([vis, gpt.transformer.wte(toks)], dim=1)
        B, T, C = x.shape
        x = x + gpt.transformer.wpe(torch.arange(T))[None]
        atts = []
        for block in gpt.transformer.h:
            h = block.ln_1(x)
            H = block.attn.n_head
            q, k, v = (z.view(B, T, H, C // H).transpose(1, 2) for z in block.attn.c_attn(h).split(C, dim=2))
            s = q @ k.transpose(-1, -2) / math.sqrt(C // H)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            a = s.softmax(-1)
            a.retain_grad()
            atts.append(a)
            x = x + block.attn.c_proj((a @ v).transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        logits = gpt.lm_head(gpt.transformer.ln_f(x))
        logits[0, vis.shape[1] + t, ids[t]].backward()
        out.append(([a.detach()[0] for a in atts], [a.grad[0] for a in atts]))
        gpt.zero_grad(set_to_none=True)
    return out, vis.shape[1]


def test_captioner_relevancy_equals_independent_autograd(tiny_dirs):
    model = _captioner(tiny_dirs, "lora")
    img = _images(1, seed=5)[0]
    ids = model.tokenizer("a red circle on the left", add_special_tokens=False)["input_ids"]
    per = explain_all(model, img, ids, methods=["grad", "relevancy"], unit="tokens")
    ref, V = _reference_captioner(model, img, ids)
    s, e = model.image_key_span()
    for t in range(len(ids)):
        atts, grads = ref[t]
        rel = _chefer(atts, grads)
        for j in (0, 1):
            want_rel = rel[j][V + t, s:e].reshape(8, 8).numpy()
            np.testing.assert_allclose(per["relevancy", j].maps[t], want_rel, atol=1e-6, rtol=1e-4)
            want_grad = (grads[j] * atts[j]).clamp(min=0).mean(0)[V + t, s:e].reshape(8, 8).numpy()
            np.testing.assert_allclose(per["grad", j].maps[t], want_grad, atol=1e-6, rtol=1e-4)
    assert per["relevancy", 1].maps.max() > 0  # not trivially zero
    # words average their tokens; a string caption gives the same maps as its ids
    words = explain(model, img, "a red circle on the left", method="relevancy", layer=1)
    assert words.tokens == ["a", "red", "circle", "on", "the", "left"]
    for w, g in zip(words.maps, words.word_groups):
        np.testing.assert_allclose(w, per["relevancy", 1].maps[g].mean(0), atol=1e-7)


def _cross_captioner(tiny_dirs):
    from captionlab.models.captioner import Captioner, CaptionerConfig

    clip_dir, gpt_dir = tiny_dirs
    torch.manual_seed(2)
    cfg = CaptionerConfig(encoder=f"hfclip:{clip_dir}", decoder=str(gpt_dir), peft="lora", conditioning="cross",
                          use_cls=False, projector="linear", max_caption_tokens=8)
    model = Captioner(cfg, verbose=False).eval()
    with torch.no_grad():  # random trainable weights, gates open: the image reaches the logits
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        for name, p in model.named_parameters():
            if "gate_" in name:
                p.fill_(0.5)
    return model


def _reference_cross_relevancy(model, image, ids):
    """Hand-written forward of the cross-conditioned GPT with retain_grad on every cross- and self-attention
    matrix, .backward() of each token's logit, then Chefer et al.'s encoder-decoder rules written out per block:
    [per token: ([text-image relevancy (T, V) after each block], [gradient-weighted cross-attention (T, V)])]."""
    from captionlab.models.decoder import GPT

    gpt = next(m for m in model.decoder.modules() if isinstance(m, GPT))
    vis = model.visual_embeds(pixel_values=model.encoder.preprocess([image])).detach()
    toks = torch.tensor([[model.tokenizer.bos_token_id] + list(ids)])
    out = []
    for t in range(len(ids)):
        x = gpt.transformer.wte(toks)
        B, T, C = x.shape
        V = vis.shape[1]
        x = x + gpt.transformer.wpe(torch.arange(T))[None]
        layers = []  # (cross attention, self attention) per block
        for block in gpt.transformer.h:
            ca = block.crossattn
            H, d = ca.n_head, ca.head_dim
            q = ca.q(ca.ln_1(x)).view(B, T, H, d).transpose(1, 2)
            k, v = (z.view(B, V, H, d).transpose(1, 2) for z in ca.kv(vis).split(ca.dim, dim=2))
            c = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
            c.retain_grad()
            x = x + torch.tanh(ca.gate_attn) * ca.out((c @ v).transpose(1, 2).reshape(B, T, ca.dim))
            x = x + torch.tanh(ca.gate_ff) * ca.ff(ca.ln_2(x))
            h = block.ln_1(x)
            Hs = block.attn.n_head
            q, k, v = (z.view(B, T, Hs, C // Hs).transpose(1, 2) for z in block.attn.c_attn(h).split(C, dim=2))
            s = (q @ k.transpose(-1, -2) / math.sqrt(C // Hs)).masked_fill(
                torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            a = s.softmax(-1)
            a.retain_grad()
            x = x + block.attn.c_proj((a @ v).transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
            layers.append((c, a))
        gpt.lm_head(gpt.transformer.ln_f(x))[0, t, ids[t]].backward()
        R_tt, R_ti, per_block, cams = torch.eye(T), torch.zeros(T, V), [], []
        for c, a in layers:
            cam_c = (c.grad[0] * c.detach()[0]).clamp(min=0).mean(0)
            extra = R_tt - torch.eye(T)
            R_bar = extra / extra.sum(-1, keepdim=True).clamp(min=1e-12) + torch.eye(T)
            R_ti = R_ti + R_bar.T @ cam_c
            cams.append(cam_c)
            cam_s = (a.grad[0] * a.detach()[0]).clamp(min=0).mean(0)
            R_ti, R_tt = R_ti + cam_s @ R_ti, R_tt + cam_s @ R_tt
            per_block.append(R_ti.clone())
        out.append((per_block, cams))
        gpt.zero_grad(set_to_none=True)
    return out


def test_cross_captioner_relevancy_equals_independent_autograd(tiny_dirs):
    model = _cross_captioner(tiny_dirs)
    img = _images(1, seed=5)[0]
    ids = model.tokenizer("a red circle on the left", add_special_tokens=False)["input_ids"]
    per = explain_all(model, img, ids, methods=["raw", "grad", "relevancy"], unit="tokens")
    assert {m for m, _ in per} == {"raw", "grad", "relevancy"}
    ref = _reference_cross_relevancy(model, img, ids)
    for t in range(len(ids)):
        for j in (0, 1):
            rel, cams = ref[t]
            np.testing.assert_allclose(per["relevancy", j].maps[t], rel[j][t].reshape(8, 8).numpy(), atol=1e-6,
                                       rtol=1e-4)
            np.testing.assert_allclose(per["grad", j].maps[t], cams[j][t].reshape(8, 8).numpy(), atol=1e-6,
                                       rtol=1e-4)
    assert per["grad", 0].maps.max() > 0  # the logit is differentiated through the cross-attention maps
    # relevancy reaches a token through earlier rows' cross-attention: it differs from the token's own row
    assert per["relevancy", 1].maps.max() > 0
    assert not np.allclose(per["relevancy", 1].maps, per["grad", 1].maps)
    with pytest.raises(ConfigError, match="prefix"):
        explain(model, img, ids, method="rollout", layer=0)


def test_llava_relevancy_equals_eager_model_backward(tiny_llava_dir, tiny_llava):
    from captionlab.models.llava import load_llava

    img = _images(1, seed=6)[0]
    prompt = "Describe the image."
    ids = tiny_llava.processor.tokenizer("red circle", add_special_tokens=False)["input_ids"]
    rel = explain_all(tiny_llava, img, ids, methods=["relevancy"], prompt=prompt, unit="tokens")
    ref = load_llava(tiny_llava_dir, device="cpu", attn_implementation="eager")
    inputs = ref.prepare_inputs([img], prompt)
    L = inputs["input_ids"].shape[1]
    full = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
    pos = (full[0] == ref.image_token_id).nonzero().flatten()
    for t in range(len(ids)):
        out = ref.model(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=inputs["pixel_values"],
                        output_attentions=True, use_cache=False)
        for a in out.attentions:
            a.retain_grad()
        out.logits[0, L - 1 + t, ids[t]].backward()
        R = _chefer([a.detach()[0] for a in out.attentions], [a.grad[0] for a in out.attentions])
        for j in range(len(R)):
            np.testing.assert_allclose(rel["relevancy", j].maps[t], R[j][L - 1 + t, pos].reshape(8, 8).numpy(),
                                       atol=1e-6, rtol=1e-4)
        ref.model.zero_grad(set_to_none=True)


def test_logprobs_and_errors(tiny_dirs):
    model = _captioner(tiny_dirs, "lora")
    imgs = _images(3, seed=7)
    ids = model.tokenizer("a blue star", add_special_tokens=False)["input_ids"]
    lp = caption_logprobs(model, imgs, ids, batch_size=2)
    assert lp.shape == (3, len(ids)) and (lp < 0).all()
    one = caption_logprobs(model, imgs[1:2], ids)
    np.testing.assert_allclose(lp[1], one[0], atol=1e-5)  # batching does not change a row
    with pytest.raises(ConfigError, match="unknown method"):
        explain(model, imgs[0], ids, method="saliency")
    with pytest.raises(ConfigError, match="one layer index"):
        explain(model, imgs[0], ids, method="relevancy", layer="all")


# ------------------------------------------------------------------------------------------ faithfulness


def test_pointing_tolerance_and_patch_deletion():
    from PIL import Image

    from captionlab.attention.faithfulness import delete_patches, score_map

    mask = np.zeros((64, 64), bool)
    mask[8:16, 8:16] = True
    m = np.zeros((8, 8), np.float32)
    m[2, 2] = 1.0  # patch (2, 2) = pixels 16..23, just outside the mask
    s = score_map(m, mask, tolerance=0.0625)
    assert s["pointing_pixel"] == 0.0 and s["pointing_tol"] == 1.0
    assert s["random_point"] == pytest.approx(64 / 4096) and s["random_tol"] > s["random_point"]
    assert score_map(m, mask, tolerance=0.0)["pointing_tol"] == 0.0
    img = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    out = np.asarray(delete_patches(img, np.array([0, 9]), (8, 8))).astype(int)
    a = np.asarray(img).astype(int)
    mean = a.reshape(-1, 3).mean(0).round()
    assert (out[:8, :8] == mean).all() and (out[8:16, 8:16] == mean).all()
    assert (out[:8, 8:16] == a[:8, 8:16]).all() and (out[16:] == a[16:]).all()


def test_method_report_tables(tiny_dirs):
    from captionlab.attention.faithfulness import best_row, method_report

    model = _captioner(tiny_dirs, "lora")
    imgs = _images(2, seed=8)
    caps = ["a red circle on the left", "a blue star on the top"]
    objects = [[{"id": 1, "colour": "red", "shape": "circle"}, {"id": 2, "colour": "green", "shape": "square"}],
               [{"id": 1, "colour": "blue", "shape": "star"}]]
    masks = [np.zeros((64, 64), np.uint8) for _ in imgs]
    masks[0][0:16, 0:16], masks[0][40:60, 40:60], masks[1][20:40, 20:40] = 1, 2, 1
    summary, words = method_report(model, imgs, objects, masks, captions=caps, progress=False)
    assert set(zip(summary["method"], summary["layer"])) == {(m, j) for m in ("raw", "rollout", "grad", "relevancy")
                                                            for j in (0, 1)}
    assert (summary["n_scored"] == 4).all()  # red, circle, blue, star name exactly one object each
    scored = words[words["status"] == "scored"]
    assert scored[["deletion_drop", "deletion_random"]].notna().all().all()
    assert set(scored["word"]) == {"red", "circle", "blue", "star"}
    # deletion_random is shared by every method for a word; the drop by the map differs between methods
    per_word = scored.groupby(["image", "word"])["deletion_random"].nunique()
    assert (per_word == 1).all()
    assert scored["deletion_drop"].nunique() > 1
    best = best_row(summary, "pointing_pixel")
    assert best["pointing_pixel"] == summary["pointing_pixel"].max()
    assert {"deletion_gain", "pointing_tol", "random_tol"} <= set(summary.columns)


# ------------------------------------------------------------------------------------- browsing


def test_browser_changes_image_under_agg_with_every_layer_and_method(tiny_dirs):
    import matplotlib

    from captionlab.attention.widgets import ExplanationCache, attention_browser

    assert matplotlib.get_backend().lower() == "agg"
    model = _captioner(tiny_dirs, "lora")
    cache = ExplanationCache(model, _images(1, seed=9)[0], "a red circle on the left")
    box = attention_browser(cache, start_layer=0)
    (method_dd, layer_dd, head_dd), word, label, image = box.children[0].children, *box.children[1:]
    assert list(layer_dd.options) == [0, 1] and layer_dd.value == 0
    assert list(method_dd.options) == ["raw", "rollout", "grad", "relevancy"]
    assert attention_browser(cache).children[0].children[1].value == 1  # default start: the last layer (-1)
    assert image.format == "png" and image.value[:8] == b"\x89PNG\r\n\x1a\n"
    seen = [image.value]
    word.value = 2
    assert "circle" in label.value and image.value != seen[-1]
    seen.append(image.value)
    method_dd.value = "relevancy"
    assert head_dd.disabled and image.value not in seen
    seen.append(image.value)
    layer_dd.value = 1
    assert image.value not in seen
    bundle = box._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "captionlab-slider" in bundle["text/html"]


def test_word_slider_is_self_contained(tiny_dirs):
    import re

    from captionlab.attention.explain import explain
    from captionlab.attention.widgets import word_slider

    model = _captioner(tiny_dirs, "lora")
    res = explain(model, _images(1, seed=9)[0], "a red circle", method="relevancy", layer=1)
    page = word_slider(res).html
    assert page.count("iVBORw0KGgo") == len(res.tokens) == 3  # one base64 PNG per word
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", page) and "<script src" not in page
    assert "relevancy, layer 1" in page


def test_cli_faithfulness_methods(tiny_dirs, tmp_path):
    import argparse
    import json

    import pandas as pd
    from PIL import Image

    from transformers import AutoTokenizer, GPT2LMHeadModel

    from captionlab.cli import attention as commands

    gpt = GPT2LMHeadModel.from_pretrained(tiny_dirs[1])
    tok = AutoTokenizer.from_pretrained(tiny_dirs[1])
    with torch.no_grad():
        gpt.transformer.wte.weight[tok.eos_token_id] = 0.0  # a random decoder that does not stop at once
    gpt.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    model = _captioner((tiny_dirs[0], tmp_path / "gpt2"), "lora")
    ckpt = model.save_trainable(tmp_path / "ckpt")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "masks").mkdir()
    objs = {}
    for i, im in enumerate(_images(2, seed=10)):
        im.save(tmp_path / "imgs" / f"pic{i}.png")
        m = np.zeros((64, 64), np.uint8)
        m[10:30, 10:30] = 1
        Image.fromarray(m).save(tmp_path / "masks" / f"pic{i}.png")
        objs[f"pic{i}"] = [{"id": 1, "colour": "red", "shape": "circle", "size": "big", "bbox": [10, 10, 30, 30]}]
    (tmp_path / "objects.json").write_text(json.dumps(objs))
    (tmp_path / "preds.json").write_text(json.dumps({"pic0": "a red circle", "pic1": "a big red circle"}))
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    out = tmp_path / "faith.csv"
    args = parser.parse_args(["attention", "faithfulness", "--model", str(ckpt), "--images", str(tmp_path / "imgs"),
                              "--masks", str(tmp_path / "masks"), "--objects", str(tmp_path / "objects.json"),
                              "--methods", "raw,relevancy", "--layers", "1", "--out", str(out),
                              "--captions", str(tmp_path / "preds.json")])
    assert args.func(args) == 0
    table = pd.read_csv(out)
    assert sorted(table["method"]) == ["raw", "relevancy"] and set(table["layer"]) == {1}
    words = pd.read_csv(tmp_path / "faith_words.csv")
    assert set(words["method"]) == {"raw", "relevancy"}
    assert sorted(words["word"]) == ["circle"] * 4 + ["red"] * 4 and (table["n_scored"] == 4).all()


def test_attention_shares_split_cls_patches_text(tiny_dirs):
    from captionlab.attention.explain import attention_shares, explain_all

    model = _captioner(tiny_dirs, "lora")
    img = _images(1, seed=11)[0]
    shares = attention_shares(model, img, "a red circle")
    assert [r["layer"] for r in shares] == [0, 1]
    raw = explain_all(model, img, "a red circle", methods=["raw"], unit="tokens")
    for r in shares:
        assert r["cls"] + r["patches"] + r["other"] == pytest.approx(1.0, abs=1e-5)
        assert r["cls"] > 0  # use_cls: the CLS token sits in front of the patches
        assert r["patches"] == pytest.approx(float(raw["raw", r["layer"]].maps.sum((1, 2)).mean()), abs=1e-5)


def test_generate_ids_gives_the_placeholder_caption_for_an_immediate_eos(tiny_captioner_models, demo_world, monkeypatch):
    """An untrained captioner that stops at once (the rehearsal's p3 'sheep') still gets words to map."""
    import captionlab.decode
    from captionlab.attention.explain import EMPTY_CAPTION, caption_ids, explain, generate_ids
    from captionlab.models.captioner import EMPTY_CAPTION as GENERATED, Captioner, CaptionerConfig

    cap = Captioner(CaptionerConfig(encoder=tiny_captioner_models["encoder"], decoder=tiny_captioner_models["decoder"],
                                    peft="lora", lora_rank=2), verbose=False)
    eos = cap.tokenizer.eos_token_id
    monkeypatch.setattr(captionlab.decode, "greedy_search", lambda dec, *a, **k: [[eos, 5]] * dec.batch_size)
    images = sorted((demo_world / "p2_data" / "images" / "val").glob("*.jpg"))[:2]
    ids = generate_ids(cap, images)
    assert EMPTY_CAPTION == GENERATED and ids == [caption_ids(cap, EMPTY_CAPTION)] * 2
    assert explain(cap, images[0], ids[0]).caption == EMPTY_CAPTION
