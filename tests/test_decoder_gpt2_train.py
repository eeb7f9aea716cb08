"""The tiny GPT-2 LM builder: course-format outputs, deterministic given the seed, and the demo model's quality."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from captionlab.models.decoder import load_decoder
from captionlab.models.gpt2_train import train_tiny_gpt2


def test_builder_is_deterministic_and_writes_course_files(demo_world, tmp_path):
    kw = dict(steps=3, batch_size=8, n_embd=32, n_layer=1, n_head=2)
    a = train_tiny_gpt2(demo_world, tmp_path / "a", seed=5, **kw)
    b = train_tiny_gpt2(demo_world, tmp_path / "b", seed=5, **kw)
    train_tiny_gpt2(demo_world, tmp_path / "c", seed=6, **kw)
    wa, wb, wc = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a["val_perplexity"] == b["val_perplexity"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    for name in ("config.json", "tokenizer.json", "decoder_model.bin", "encoder.json", "vocab.bpe", "train_log.json"):
        assert (tmp_path / "a" / name).exists(), name
    course = torch.load(tmp_path / "a" / "decoder_model.bin", weights_only=True)
    assert "wte.weight" in course and not any(k.startswith("transformer.") for k in course)
    assert course["h.0.attn.c_attn.weight"].shape == (32, 96)  # HF Conv1D layout (in, out)
    # the course files alone (no config.json / tokenizer.json) still give the same tokenizer and model
    alone = tmp_path / "course"
    alone.mkdir()
    for name in ("decoder_model.bin", "encoder.json", "vocab.bpe"):
        (alone / name).write_bytes((tmp_path / "a" / name).read_bytes())
    m1, t1 = load_decoder(tmp_path / "a")
    m2, t2 = load_decoder(alone / "decoder_model.bin", n_head=2)
    text = "a small red circle above a large blue star"
    assert t1(text)["input_ids"] == t2(text)["input_ids"] and t2.eos_token == "<|endoftext|>"
    ids = torch.tensor([[t1.eos_token_id] + t1(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(m1(ids).logits, m2(ids).logits)


def test_demo_gpt2_is_a_good_caption_lm(demo_gpt2):
    log = json.loads((demo_gpt2 / "train_log.json").read_text())
    assert log["val_perplexity"] < 4.0, log  # templated captions: a trained LM is far below the ~400-token vocab
    assert 200 < log["vocab_size"] <= 1024
    assert log["losses_every_50"][-1] < log["losses_every_50"][0] / 3
