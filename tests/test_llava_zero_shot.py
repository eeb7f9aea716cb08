"""LLaVA captioner on a tiny *random* HF LLaVA checkpoint: loading, batching with left padding, CLI, post-processing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captionlab.errors import ConfigError
from captionlab.models.llava import load_llava, postprocess_caption
from captionlab.models.llava_train import save_random_llava

PROMPTS = ["Describe.", "Write a one-sentence caption for this small image, please.", "What?",
           "Caption the image."]


@pytest.fixture(scope="module")
def random_llava(tmp_path_factory) -> Path:
    """A tiny random LlavaForConditionalGeneration + LlavaProcessor written with save_pretrained (32 px, 16 patches)."""
    return save_random_llava(tmp_path_factory.mktemp("llava") / "tiny", seed=0)


@pytest.fixture(scope="module")
def captioner(random_llava):
    return load_llava(random_llava)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 50), (32, 32), (64, 48), (33, 70)]  # odd sizes: the processor resizes and crops
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_checkpoint_round_trips_offline_with_llava_processor_settings(random_llava, captioner):
    files = {p.name for p in random_llava.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files
    proc = captioner.processor
    assert type(proc).__name__ == "LlavaProcessor"
    assert (proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy) == (8, 1, "default")
    assert proc.tokenizer.padding_side == "left"
    assert next(captioner.model.parameters()).dtype == torch.float32  # fp32 on CPU
    assert captioner.chat_text("Hi.") == "USER: <image>\nHi. ASSISTANT:"
    assert captioner.chat_text("Hi.", system="Be brief.") == "Be brief. USER: <image>\nHi. ASSISTANT:"


def test_prepare_inputs_left_pads_and_expands_one_token_per_patch(captioner, images):
    inputs = captioner.prepare_inputs(images, PROMPTS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert inputs["pixel_values"].shape == (4, 3, 32, 32)
    assert ((ids == captioner.image_token_id).sum(1) == (32 // 8) ** 2).all()
    lengths = mask.sum(1)
    assert lengths.unique().numel() > 1  # prompts of different lengths ...
    assert (mask[:, -1] == 1).all() and (mask[lengths.argmin(), 0] == 0)  # ... padded on the left
    pad = captioner.processor.tokenizer.pad_token_id
    assert ((ids == pad) == (mask == 0)).all()
    with pytest.raises(ValueError, match="2 images but 4 prompts"):
        captioner.prepare_inputs(images[:2], PROMPTS)


@pytest.mark.parametrize("generation", [{"max_new_tokens": 8}, {"max_new_tokens": 6, "num_beams": 3}],
                         ids=["greedy", "beam3"])
def test_batched_generation_equals_one_by_one(captioner, images, generation):
    batched = captioner.generate_replies(images, PROMPTS, generation, batch_size=4)
    single = [captioner.generate_replies([im], p, generation)[0] for im, p in zip(images, PROMPTS)]
    assert batched == single
    assert len(set(batched)) > 1  # the replies depend on the image / prompt


def test_sampling_is_seeded(captioner, images):
    gen = {"do_sample": True, "temperature": 1.5, "max_new_tokens": 8, "seed": 7}
    a = captioner.generate_replies(images, "Describe.", gen)
    assert a == captioner.generate_replies(images, "Describe.", gen)
    assert a != captioner.generate_replies(images, "Describe.", {**gen, "seed": 8})


def test_generation_config_from_dict(captioner):
    from transformers import GenerationConfig

    cfg = captioner.generation_config({"num_beams": 3, "length_penalty": 0.5, "repetition_penalty": 1.2,
                                       "max_new_tokens": 12, "seed": 3})
    assert (cfg.num_beams, cfg.length_penalty, cfg.repetition_penalty, cfg.max_new_tokens) == (3, 0.5, 1.2, 12)
    assert cfg.do_sample is False and cfg.pad_token_id == captioner.processor.tokenizer.pad_token_id
    given = GenerationConfig(max_new_tokens=3)
    assert captioner.generation_config(given) is given
    with pytest.raises(ConfigError, match="num_beam"):
        captioner.generation_config({"num_beam": 3})


def test_cli_captions_a_folder(random_llava, images, tmp_path, monkeypatch):
    from captionlab.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images[:3]):
        im.save(folder / f"img_{i}.{'jpg' if i % 2 else 'png'}")
    out = tmp_path / "pred.json"
    rc = main(["llava", "--images", str(folder), "--out", str(out), "--model", str(random_llava),
               "--prompt", "Describe the image.", "--batch-size", "2", "--max-new-tokens", "5", "--num-beams", "2"])
    assert rc == 0
    preds = json.loads(out.read_text())
    assert sorted(preds) == ["img_0", "img_1", "img_2"]
    assert all(isinstance(c, str) and c.strip() for c in preds.values())


def test_cli_reports_missing_model_and_folder(random_llava, tmp_path, capsys):
    from captionlab.cli import main

    rc = main(["llava", "--images", str(tmp_path), "--out", str(tmp_path / "p.json"),
               "--model", str(tmp_path / "no_such_model")])
    assert rc == 2 and "no_such_model" in capsys.readouterr().err
    rc = main(["llava", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "p.json"),
               "--model", str(random_llava)])
    assert rc == 2 and "none" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_load_llava_errors(random_llava, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_llava(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no config.json"):
        load_llava(tmp_path)
    with pytest.raises(ConfigError, match="CUDA"):
        load_llava(random_llava, device="cpu", load_in_4bit=True)


@pytest.mark.parametrize("reply, caption", [
    ("ASSISTANT: The image shows a red circle on a striped background. It is small.",
     "A red circle on a striped background."),
    ('  "A dog running on the beach."  ', "A dog running on the beach."),
    ("USER: <image>\nDescribe. ASSISTANT: In the image, two   blue\nsquares sit side by side",
     "Two blue squares sit side by side"),
    ("This picture depicts a man riding a horse! Another sentence.", "A man riding a horse!"),
    ("Caption: 'a yellow star'", "A yellow star"),
    ("", "an image"),
    ("  ...  ", "an image"),
])
def test_postprocess_caption(reply, caption):
    assert postprocess_caption(reply) == caption
