"""The tiny demo CLIP: an ordinary HF checkpoint that round-trips offline, pools text at <|endoftext|>, and works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
    enc = processor(text=["a red circle", "two blue squares and a small green star"], padding=True, truncation=True,
                    return_tensors="pt")
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


def test_patch_targets_count_each_class_per_patch() -> None:
    from captionlab.data.world import CLASS_NAMES
    from captionlab.models.clip_train import patch_targets

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[0:8, 0:4] = 1  # half of patch 0
    mask[10:20, 60:64] = 2  # parts of patches 15 (patch row 1, column 7) and 23 (row 2)
    objects = [{"id": 1, "colour": "red", "shape": "star"}, {"id": 2, "colour": "blue", "shape": "circle"}]
    t = patch_targets(mask, objects)
    red_star, blue_circle, bg = CLASS_NAMES.index("red star"), CLASS_NAMES.index("blue circle"), len(CLASS_NAMES)
    assert t.shape == (64, len(CLASS_NAMES) + 1) and (t.sum(1) == 64).all()
    assert t[0, red_star] == 32 and t[0, bg] == 32
    assert t[15, blue_circle] == 6 * 4 and t[23, blue_circle] == 4 * 4
    assert t[:, :bg].sum() == (mask > 0).sum() and t[1:7].sum(0)[bg] == 6 * 64


def test_whitened_patch_embedding_decorrelates_training_patches() -> None:
    from captionlab.models.clip_train import ClipTrainConfig, build_model, init_patch_whitening

    torch.manual_seed(0)
    cfg = ClipTrainConfig()
    model = build_model(cfg, vocab_size=50)
    d, k = cfg.hidden, cfg.hidden // 2
    rng = np.random.default_rng(0)
    smooth = rng.random((200, 3, 8, 8)).repeat(8, 2).repeat(8, 3)  # 64x64 images of 8x8 blocks...
    pixels = (255 * (0.7 * smooth + 0.3 * rng.random((200, 3, 64, 64)))).astype(np.uint8)  # ...plus noise
    init_patch_whitening(model, pixels, eps=1e-6)
    x = (torch.from_numpy(pixels).float() / 255 - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) \
        / torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model.vision_model.embeddings.patch_embedding(x).flatten(2).transpose(1, 2).reshape(-1, d)
    half = out[:, :k]
    cov = torch.cov(half.t())
    assert torch.allclose(cov, torch.eye(k), atol=0.05)  # unit variance, uncorrelated
    assert torch.allclose(out[:, k:], -half)  # the +/- pairs
