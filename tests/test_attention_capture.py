"""Attention capture on tiny random models: captured maps equal an independent full recomputation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captionlab.attention import capture_captioner, capture_captioner_layers, capture_llava
from captionlab.attention.capture import gpt_attention_modules, llava_decoder_layers, merge_words


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------------------------------ tiny LLaVA


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory) -> Path:
    from captionlab.models.llava_train import save_random_llava

    return save_random_llava(tmp_path_factory.mktemp("llava"), seed=0, image_size=64, patch_size=8)


@pytest.fixture(scope="module")
def tiny_llava(tiny_llava_dir):
    from captionlab.models.llava import load_llava

    return load_llava(tiny_llava_dir, device="cpu")


def _llava_reference(llava_dir, llava, res, prompt, layer):
    """Token maps from a separately loaded eager model's full forward with output_attentions=True."""
    from captionlab.models.llava import load_llava

    ref = load_llava(llava_dir, device="cpu", attn_implementation="eager")
    inputs = ref.prepare_inputs([res.image], prompt)
    L = inputs["input_ids"].shape[1]
    gen = torch.tensor([res.token_ids])
    ids = torch.cat([inputs["input_ids"], gen], dim=1)
    pos = (ids[0] == llava.image_token_id).nonzero().flatten()
    with torch.no_grad():
        out = ref.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                        output_attentions=True, use_cache=False)
    att = out.attentions[layer][0]  # (H, T, T)
    rows = L - 1 + torch.arange(len(res.token_ids))
    return att[:, rows][:, :, pos].permute(1, 0, 2).numpy(), pos  # (n_tokens, H, n_img)


@pytest.mark.parametrize("layer", [-1, 0])
def test_llava_maps_equal_output_attentions(tiny_llava_dir, tiny_llava, layer):
    prompt = "Describe the image."
    shared = tiny_llava.model.config.text_config
    before = shared._attn_implementation
    res = capture_llava(tiny_llava, _images(1), prompt, layer=layer, heads="mean", max_new_tokens=6,
                        progress=False)[0]
    assert res.grid == (8, 8) and res.head_maps.shape[1:] == (2, 8, 8)
    assert len(res.token_ids) == 6  # a random model does not stop early at 6 tokens (eos is one of ~300)
    ref, pos = _llava_reference(tiny_llava_dir, tiny_llava, res, prompt, layer)
    assert len(pos) == 64 and int(pos[-1] - pos[0]) == 63  # 8x8 <image> tokens, contiguous
    np.testing.assert_allclose(res.head_maps.reshape(len(res.token_ids), 2, 64), ref, atol=2e-5)
    np.testing.assert_allclose(res.token_maps, ref.mean(1).reshape(-1, 8, 8), atol=2e-5)
    # patch (r, c) is key pos[0] + r*8 + c
    t, r, c = 2, 3, 5
    assert res.token_maps[t, r, c] == pytest.approx(ref.mean(1)[t, r * 8 + c], abs=2e-5)
    # the shared config and every layer's own config are untouched afterwards
    assert shared._attn_implementation == before
    assert all(lay.self_attn.config is shared for lay in llava_decoder_layers(tiny_llava.model))
    assert not any(lay.self_attn._forward_hooks or lay.self_attn._forward_pre_hooks
                   for lay in llava_decoder_layers(tiny_llava.model))


def test_llava_capture_does_not_change_generation_and_handles_left_padding(tiny_llava):
    imgs = _images(2, seed=1)
    gen = {"max_new_tokens": 5}
    plain = tiny_llava.generate_replies(imgs, "Describe the image.", gen)
    res = capture_llava(tiny_llava, imgs, "Describe the image.", max_new_tokens=5, progress=False)
    tok = tiny_llava.processor.tokenizer
    assert [tok.decode(r.token_ids, skip_special_tokens=True) for r in res] == plain
    # different prompt lengths -> left padding: image spans differ per row, maps still match batch-1 captures
    prompts = ["Describe the image.", "Write a one-sentence caption for this image please."]
    batched = capture_llava(tiny_llava, imgs, prompts, max_new_tokens=4, batch_size=2, progress=False)
    single = [capture_llava(tiny_llava, [im], p, max_new_tokens=4, progress=False)[0] for im, p in zip(imgs, prompts)]
    for b, s in zip(batched, single):
        assert b.token_ids == s.token_ids
        np.testing.assert_allclose(b.head_maps, s.head_maps, atol=1e-4)


def test_llava_layer_list_averages_and_rollout_shapes(tiny_llava):
    img = _images(1, seed=2)
    r0, r1 = (capture_llava(tiny_llava, img, "Describe the image.", layer=j, max_new_tokens=3, unit="tokens",
                            progress=False)[0] for j in (0, 1))
    both = capture_llava(tiny_llava, img, "Describe the image.", layer=[0, 1], max_new_tokens=3, unit="tokens",
                         progress=False)[0]
    np.testing.assert_allclose(both.maps, (r0.maps + r1.maps) / 2, atol=1e-6)
    assert both.layer == [0, 1]
    roll = capture_llava(tiny_llava, img, "Describe the image.", max_new_tokens=3, unit="tokens", rollout=True,
                         progress=False)[0]
    assert roll.layer == "rollout" and roll.maps.shape == (3, 8, 8) and (roll.maps >= 0).all()
    assert roll.maps.sum() > 0


# ------------------------------------------------------------------------------- tiny PEFT captioner


def _tiny_captioner_dirs(root: Path) -> tuple[Path, Path]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    from captionlab.models.gpt2_train import build_tokenizer

    torch.manual_seed(0)
    clip_dir, gpt_dir = root / "clip", root / "gpt2"
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=64, patch_size=8)
    CLIPVisionModel(vcfg).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(clip_dir)
    gpt_dir.mkdir()
    caps = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")
            for p in ("left", "right", "top")] * 3
    tok = build_tokenizer(caps, 120, gpt_dir)
    eos = tok.eos_token_id
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)).save_pretrained(gpt_dir)
    tok.save_pretrained(gpt_dir)
    return clip_dir, gpt_dir


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return _tiny_captioner_dirs(tmp_path_factory.mktemp("captioner"))


def _captioner(tiny_dirs, peft: str, visual_pool: int = 1):
    from captionlab.models.captioner import Captioner, CaptionerConfig

    clip_dir, gpt_dir = tiny_dirs
    torch.manual_seed(1)
    cfg = CaptionerConfig(encoder=f"hfclip:{clip_dir}", decoder=str(gpt_dir), peft=peft, prefix_len=3,
                          max_caption_tokens=8, visual_pool=visual_pool)
    model = Captioner(cfg, verbose=False).eval()
    with torch.no_grad():  # random, but not all-zero, PEFT weights so they matter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        gpt_wte = next(m for m in model.decoder.modules() if isinstance(m, torch.nn.Embedding)
                       and m.num_embeddings == len(model.tokenizer))
        gpt_wte.weight[model.tokenizer.eos_token_id] = 0.0  # eos logit 0: a random decoder does not stop at once
    return model


def _manual_gpt_maps(model, res, layer: int) -> np.ndarray:
    """Attention of `layer` recomputed by hand (q, k from c_attn) over prefix + bos + caption: (n, H, n_img)."""
    mods = gpt_attention_modules(model.decoder)
    seen = {}
    handle = mods[layer].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        vis = model.visual_embeds(pixel_values=model.encoder.preprocess([res.image]))
        bos = torch.tensor([[model.tokenizer.bos_token_id]])
        ids = torch.tensor([res.token_ids], dtype=torch.long)
        embeds = torch.cat([vis, model.decoder.embed_tokens(bos), model.decoder.embed_tokens(ids)], dim=1)
        model.decoder(inputs_embeds=embeds)
        handle.remove()
        x = seen["x"]
        attn = mods[layer]
        B, T, C = x.shape
        H, hd = attn.n_head, C // attn.n_head
        q, k, _ = attn.c_attn(x).split(C, dim=2)
        q, k = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k))
        P = model.decoder.config.prefix_len
        if P:
            layer_idx = layer % len(mods)
            k = torch.cat([model.decoder.prefix_kv[layer_idx, 0][None], k], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        allowed = torch.arange(P + T)[None, :] <= (P + torch.arange(T))[:, None]
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)[0]  # (H, T, P+T)
    rows = vis.shape[1] + torch.arange(len(res.token_ids))  # query at bos predicts token 0
    start = P + model.n_cls
    n_img = res.grid[0] * res.grid[1]
    return att[:, rows, start:start + n_img].permute(1, 0, 2).numpy()


@pytest.mark.parametrize("peft,pool", [("lora", 1), ("prefix", 1), ("lora", 2)])
def test_captioner_maps_equal_manual_attention(tiny_dirs, peft, pool):
    model = _captioner(tiny_dirs, peft, pool)
    g = 8 // pool
    P = model.decoder.config.prefix_len
    assert model.image_key_span() == (P + 1, P + 1 + g * g)
    imgs = _images(2, seed=3)
    results = capture_captioner_layers(model, imgs, layers=[0, 1], max_new_tokens=5, progress=False)
    plain = model.generate(imgs, method="greedy", max_new_tokens=5)
    for layer in (0, 1):
        for res, cap in zip(results[layer], plain):
            assert res.caption == cap  # capture does not change what is generated
            assert res.grid == (g, g) and res.head_maps.shape == (len(res.token_ids), 2, g, g)
            ref = _manual_gpt_maps(model, res, layer)
            np.testing.assert_allclose(res.head_maps.reshape(len(res.token_ids), 2, g * g), ref, atol=2e-5)
    # only the captured layers compute attention explicitly, and hooks are removed afterwards
    assert all(m.capture is None for m in gpt_attention_modules(model.decoder))


def test_captioner_heads_words_and_layer_average(tiny_dirs):
    model = _captioner(tiny_dirs, "lora")
    img = _images(1, seed=4)
    res = capture_captioner(model, img, layer=-1, heads="mean", max_new_tokens=6, progress=False)[0]
    hm = res.head_maps
    np.testing.assert_allclose(res.with_heads("max").token_maps, hm.max(1), atol=1e-7)
    np.testing.assert_allclose(res.with_heads(1).token_maps, hm[:, 1], atol=1e-7)
    words = res.as_words()
    assert " ".join(words.tokens) == " ".join(res.caption.split())
    assert sum(len(g) for g in words.word_groups) <= len(res.token_ids)
    for w, g in zip(words.maps, words.word_groups):
        np.testing.assert_allclose(w, hm[g].mean((0, 1)), atol=1e-6)
    assert res.as_tokens().maps.shape == (len(res.token_ids), 8, 8)
    avg = capture_captioner(model, img, layer="all", unit="tokens", max_new_tokens=6, progress=False)[0]
    per = capture_captioner_layers(model, img, layers="all", unit="tokens", max_new_tokens=6, progress=False)
    np.testing.assert_allclose(avg.maps, (per[0][0].maps + per[1][0].maps) / 2, atol=1e-7)
    roll = capture_captioner(model, img, rollout=True, unit="tokens", max_new_tokens=6, progress=False)[0]
    assert roll.maps.shape == avg.maps.shape and roll.layer == "rollout"


def test_merge_words_groups_subword_tokens(tiny_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs[1])
    ids = tok("a purplish circle on the left", add_special_tokens=False)["input_ids"]
    pieces, groups = merge_words(ids, tok)
    assert "".join(pieces) == tok.decode(ids)
    words = ["".join(pieces[i] for i in g).strip() for g in groups]
    assert words == ["a", "purplish", "circle", "on", "the", "left"]
    assert len(groups[1]) > 1  # "purplish" is not in the tiny vocabulary as one token


def test_cli_series_writes_pngs_named_after_images(tiny_llava_dir, tmp_path, capsys):
    import argparse

    from captionlab.cli import attention as commands

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, im in enumerate(_images(2, seed=5)):
        im.save(img_dir / f"pic{i}.jpg")
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["attention", "series", "--model", str(tiny_llava_dir), "--images", str(img_dir),
                              "--out", str(tmp_path / "out"), "--layer", "0,1", "--max-new-tokens", "3", "--frames"])
    assert args.func(args) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == ["pic0.png", "pic1.png"]
    assert (out / "pic0").is_dir() and any((out / "pic0").glob("00_*.png"))
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_cache_for_captures_layers_once_and_browser_switches(tiny_llava):
    from captionlab.attention import attention_browser, cache_for

    cache = cache_for(tiny_llava, _images(1, seed=6)[0], "Describe the image.", layers=[0, 1], max_new_tokens=3)
    assert sorted(cache.by_layer) == [0, 1]
    direct = capture_llava(tiny_llava, _images(1, seed=6), "Describe the image.", layer=0, heads=1,
                           max_new_tokens=3, progress=False)[0]
    np.testing.assert_allclose(cache.get(0, 1).maps, direct.maps, atol=1e-6)
    box = attention_browser(cache)
    _, layer_dd, head_dd = box.children[0].children
    head_dd.value = "max"
    layer_dd.value = 0
    assert sorted(cache.by_layer) == [0, 1]  # switching reused the captured layers
