"""The tiny demo CLIP: an ordinary HF checkpoint that round-trips offline, pools text at <|endoftext|>, and works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from captionlab.data import load_id2label
from captionlab.models.clip_train import BOS_ID, EOS_ID, PAD_ID, build_tokenizer, clip_quality


def test_tokenizer_is_word_level_with_specials() -> None:
    tok = build_tokenizer(["A red circle, to the LEFT of a blue star"])
    enc = tok(["a red circle", "a blue star to the left of a red circle"], padding=True)
    first = enc["input_ids"][0]
    assert first[0] == BOS_ID and first[4] == EOS_ID and first[5:] == [PAD_ID] * (len(first) - 5)
    assert enc["attention_mask"][0] == [1] * 5 + [0] * (len(first) - 5)
    assert tok.unk_token_id not in enc["input_ids"][1]
    assert tok.decode(tok("A Red Circle")["input_ids"], skip_special_tokens=True) == "a red circle"
    assert tok("a zebra")["input_ids"][2] == tok.unk_token_id


@pytest.fixture(scope="module")
def clip(demo_clip: Path):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(demo_clip).eval()
    processor = CLIPProcessor.from_pretrained(demo_clip)
    return model, processor


def test_checkpoint_round_trips_offline(demo_clip: Path, clip) -> None:
    model, processor = clip
    cfg = model.config
    assert cfg.vision_config.image_size == 64 and cfg.vision_config.patch_size == 8
    # transformers pools at the first eos id unless eos_token_id == 2 (legacy argmax): ours must be the real id
    assert cfg.text_config.eos_token_id == processor.tokenizer.eos_token_id == EOS_ID != 2
    assert processor.tokenizer.pad_token_id == cfg.text_config.pad_token_id == PAD_ID
    assert processor.image_processor.crop_size["height"] == processor.image_processor.crop_size["width"] == 64
    labels = load_id2label(demo_clip.parents[1] / "p1_data" / "id2label.json").values()
    ids = processor.tokenizer([f"this is a photo of a {lab}" for lab in labels])["input_ids"]
    assert all(processor.tokenizer.unk_token_id not in row for row in ids)
    log = json.loads((demo_clip / "train_log.json").read_text())
    assert log["loss_last"] < log["loss_first"]


def test_text_pooling_uses_eos_position(clip) -> None:
    model, processor = clip
    enc = processor(text=["a red circle", "two blue squares and a small green star"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    eos_pos = enc["attention_mask"].sum(1) - 1
    assert (enc["input_ids"][torch.arange(2), eos_pos] == EOS_ID).all()
    manual = out.last_hidden_state[torch.arange(2), eos_pos]
    assert torch.allclose(out.pooler_output, manual)
    # padding must not change the pooled text embedding
    with torch.no_grad():
        alone = model.text_model(**processor(text=["a red circle"], return_tensors="pt")).pooler_output
    assert torch.allclose(alone[0], out.pooler_output[0], atol=1e-5)


def test_retrieval_and_zero_shot_quality(demo_clip: Path, demo_world: Path, clip) -> None:
    model, processor = clip
    q = clip_quality(model, processor, demo_world)
    assert q["pairwise_retrieval"] >= 0.95, q
    assert q["zeroshot_accuracy"] >= 0.90, q
    logged = json.loads((demo_clip / "train_log.json").read_text())["quality"]
    assert logged["zeroshot_accuracy"] == pytest.approx(q["zeroshot_accuracy"], abs=0.01)
