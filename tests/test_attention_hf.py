"""HF attention capture through transformers' AttentionInterface on a LLaVA with llava-1.5's 576 image tokens
(CLIP 336 px / patch 14) but tiny widths, grouped-query attention (2 query heads, 1 key/value head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captionlab.attention import capture_llava
from captionlab.attention.capture import hf_capture, llava_attention_modules


@pytest.fixture(scope="module")
def llava576_dir(tmp_path_factory) -> Path:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from captionlab.models.llava_train import save_random_llava

    out = save_random_llava(tmp_path_factory.mktemp("llava576"), seed=0, image_size=336, patch_size=14)
    cfg = LlavaConfig.from_pretrained(out)
    cfg.text_config.num_key_value_heads = 1  # GQA: keys/values shared by the 2 query heads
    cfg.text_config.max_position_embeddings = 1024
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llava576(llava576_dir):
    from captionlab.models.llava import load_llava

    return load_llava(llava576_dir, device="cpu")


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)) for _ in range(n)]


def test_576_tokens_left_padded_batch_equals_batch_one(llava576):
    imgs = _images(3, seed=0)
    prompts = ["Describe the image.", "Write a one-sentence caption for this image please, in a few words.",
               "Caption?"]
    inputs = llava576.prepare_inputs(imgs, prompts)
    assert int((inputs["input_ids"][0] == llava576.image_token_id).sum()) == 576
    assert bool((inputs["attention_mask"] == 0).any())  # rows really are left-padded
    batched = capture_llava(llava576, imgs, prompts, layer=[0, 1], max_new_tokens=4, batch_size=3, unit="tokens",
                            progress=False)
    for im, p, b in zip(imgs, prompts, batched):
        single = capture_llava(llava576, [im], p, layer=[0, 1], max_new_tokens=4, unit="tokens", progress=False)[0]
        assert b.grid == (24, 24) and b.token_ids == single.token_ids and len(b.token_ids) == 4
        np.testing.assert_allclose(b.head_maps, single.head_maps, atol=2e-5)
        assert b.head_maps.std() > 0  # not the uniform maps of a wrong mask
        np.testing.assert_allclose(b.head_maps.sum((-1, -2)) <= 1 + 1e-5, True)


def test_576_capture_equals_eager_output_attentions_and_leaves_model_as_it_was(llava576_dir, llava576):
    from captionlab.models.llava import load_llava

    img, prompt = _images(1, seed=1), "Describe the image."
    before = llava576.model.config.text_config._attn_implementation
    res = capture_llava(llava576, img, prompt, layer=1, max_new_tokens=3, unit="tokens", progress=False)[0]
    assert llava576.model.config.text_config._attn_implementation == before
    ref = load_llava(llava576_dir, device="cpu", attn_implementation="eager")
    inputs = ref.prepare_inputs([res.image], prompt)
    ids = torch.cat([inputs["input_ids"], torch.tensor([res.token_ids])], dim=1)
    pos = (ids[0] == llava576.image_token_id).nonzero().flatten()
    with torch.no_grad():
        out = ref.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                        output_attentions=True, use_cache=False)
    rows = inputs["input_ids"].shape[1] - 1 + torch.arange(3)
    want = out.attentions[1][0][:, rows][:, :, pos].permute(1, 0, 2).numpy()
    np.testing.assert_allclose(res.head_maps.reshape(3, 2, 576), want, atol=2e-5)

    # teacher-forced use (for explain methods): one no-cache forward inside hf_capture gives the full matrices
    seen: dict[int, torch.Tensor] = {}
    mods = llava_attention_modules(llava576.model)
    with torch.no_grad(), hf_capture(mods, {0: lambda p: seen.__setitem__(0, p)}):
        llava576.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                       use_cache=False)
    np.testing.assert_allclose(seen[0][0].numpy(), out.attentions[0][0].numpy(), atol=2e-5)
    assert set(seen) == {0}  # only the armed layer materialised its probabilities
