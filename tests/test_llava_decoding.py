"""LLaVA captioning decodes greedy / beam search with our KV-cache loop; it must give HF generate's tokens
(batched, left padding) on the demo LLaVA and on a tiny LLaVA with llava-1.5's 576 image tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from captionlab.models.llava import load_llava
from PIL import Image

CONFIGS = [{"max_new_tokens": 24}, {"max_new_tokens": 24, "repetition_penalty": 1.3},
           {"max_new_tokens": 24, "num_beams": 3},
           {"max_new_tokens": 24, "num_beams": 3, "length_penalty": 0.5}]
PROMPTS = ["Describe the image.", "Write a one-sentence caption for this image, please.", "Caption?"]


@pytest.fixture(scope="module")
def demo(demo_llava):
    return load_llava(demo_llava)


@pytest.fixture(scope="module")
def llava576(tmp_path_factory):
    from captionlab.models.llava_train import save_random_llava
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    out = save_random_llava(tmp_path_factory.mktemp("llava576"), seed=1, image_size=336, patch_size=14)
    cfg = LlavaConfig.from_pretrained(out)
    cfg.text_config.max_position_embeddings = 1024
    torch.manual_seed(1)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
    return load_llava(out)


def _demo_images(world: Path, n: int) -> list[Image.Image]:
    from captionlab.data import list_images, load_image

    return [load_image(p) for p in list_images(world / "p1_data" / "images" / "val")[:n]]


def _hf_tokens(captioner, inputs, config) -> list[list[int]]:
    """HF generate's new tokens per row, cut before the first eos (what our loop returns)."""
    eos = captioner.processor.tokenizer.eos_token_id
    out = captioner.model.generate(**inputs, generation_config=config)[:, inputs["input_ids"].shape[1]:]
    return [row[:row.index(eos)] if eos in row else row for row in out.tolist()]


def _check_same_as_hf(captioner, images, generation) -> list[list[int]]:
    config = captioner.generation_config(generation)
    assert captioner.decoding_backend(config) == "ours"
    inputs = captioner.prepare_inputs(images, PROMPTS[:len(images)])
    assert bool((inputs["attention_mask"][:, 0] == 0).any())  # the prompts differ: rows are left-padded
    with torch.inference_mode():
        ours = captioner.generate_tokens(inputs, config)
        hf = _hf_tokens(captioner, inputs, config)
    assert ours == hf
    return ours


@pytest.mark.parametrize("generation", CONFIGS, ids=["greedy", "greedy-rep", "beam3", "beam3-lp"])
def test_demo_llava_our_loop_equals_hf_generate(demo, demo_world, generation):
    tokens = _check_same_as_hf(demo, _demo_images(demo_world, 3), generation)
    assert any(0 < len(t) < generation["max_new_tokens"] for t in tokens)  # the trained model stops at eos


@pytest.mark.parametrize("generation", CONFIGS[::2], ids=["greedy", "beam3"])
def test_576_token_llava_our_loop_equals_hf_generate(llava576, generation):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)) for _ in range(3)]
    inputs = llava576.prepare_inputs(images[:1], PROMPTS[0])
    assert int((inputs["input_ids"][0] == llava576.image_token_id).sum()) == 576
    _check_same_as_hf(llava576, images, {**generation, "max_new_tokens": 6})


def test_options_our_loop_lacks_go_to_hf_generate(demo, demo_world):
    backend = lambda g: demo.decoding_backend(demo.generation_config(g))
    assert backend({"num_beams": 3, "length_penalty": 0.7}) == "ours"
    assert backend({"min_new_tokens": 2}) == "ours"
    for generation in ({"do_sample": True, "top_p": 0.9}, {"no_repeat_ngram_size": 2},
                       {"num_beams": 3, "min_new_tokens": 2}, {"num_beams": 3, "repetition_penalty": 1.2}, {"num_beams": 3, "early_stopping": True},
                       {"eos_token_id": [2, 5]}, {"bad_words_ids": [[5]]}):
        assert backend(generation) == "hf", generation
    images = _demo_images(demo_world, 2)
    replies = demo.generate_replies(images, PROMPTS[0], {"no_repeat_ngram_size": 1, "max_new_tokens": 12})
    for reply in replies:  # HF's no-repeat processor ran: no word (here: token) twice
        words = reply.split()
        assert words and len(words) == len(set(words))
    sampled = [demo.caption(images, PROMPTS[0], {"do_sample": True, "seed": 3, "max_new_tokens": 12})
               for _ in range(2)]
    assert sampled[0] == sampled[1] and all(sampled[0])
