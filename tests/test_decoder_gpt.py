"""GPT decoder: HF weight loading (dir / decoder_model.bin, both layouts), KV cache, padding, capture, PEFT parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captionlab.errors import ConfigError
from captionlab.models.decoder import GPT, GPTConfig, convert_hf_state_dict, load_decoder


CAPTIONS = ["a red circle left of a blue square", "two small green stars", "a large yellow triangle"] * 4


def make_tokenizer():
    """A tiny byte-level BPE GPT-2 tokenizer with <|endoftext|> as its only special token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CAPTIONS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    eos = "<|endoftext|>"
    return bpe, GPT2TokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=eos, pad_token=eos)


def make_hf_gpt2(out: Path, seed: int = 0, n_embd: int = 64, n_head: int = 4, sharpen: float = 1.0):
    """A random HF GPT2LMHeadModel + tokenizer saved in `out`, plus a course-format decoder_model.bin."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    _, tok = make_tokenizer()
    eos = tok.eos_token_id
    cfg = GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=n_embd, n_layer=2, n_head=n_head,
                     bos_token_id=eos, eos_token_id=eos, layer_norm_epsilon=1e-5)
    hf = GPT2LMHeadModel(cfg).eval()
    if sharpen != 1.0:  # peakier next-token distributions: no near-ties between decoding paths
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if p.dim() > 1 and "wpe" not in name:
                    p.mul_(sharpen)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    torch.save(hf.transformer.state_dict(), out / "decoder_model.bin")
    return hf, tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hfgpt2")
    hf, tok = make_hf_gpt2(out)
    return out, hf, tok


def test_logits_match_hf_from_dir_and_course_bin(hf_dir):
    out, hf, tok = hf_dir
    ids = torch.randint(0, len(tok), (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        m_dir, tok_dir = load_decoder(out)
        m_bin, _ = load_decoder(out / "decoder_model.bin", n_head=4)  # config.json next to it also gives n_head
        torch.testing.assert_close(m_dir(ids).logits, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(m_bin(ids).logits, ref, atol=1e-4, rtol=0)
    assert m_dir.config.n_head == 4 and m_dir.config.n_layer == 2 and m_dir.config.vocab_size == len(tok)
    assert tok_dir.eos_token == "<|endoftext|>" and tok_dir.pad_token_id == tok_dir.eos_token_id
    assert m_dir.lm_head.weight.data_ptr() == m_dir.transformer.wte.weight.data_ptr()


def test_bin_with_linear_layout_prefix_and_buffers_and_course_tokenizer_files(hf_dir, tmp_path):
    _, hf, tok = hf_dir
    state = {"transformer." + k: v for k, v in hf.transformer.state_dict().items()}
    n = next(k for k in state if k.endswith("c_attn.weight"))
    state = convert_hf_state_dict(state)  # -> nn.Linear layout, transposed
    assert state[n].shape == (3 * 64, 64)
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 48, 48)  # old HF buffers are ignored
    torch.save(state, tmp_path / "decoder_model.bin")
    bpe, _ = make_tokenizer()
    bpe.save_model(str(tmp_path))
    (tmp_path / "vocab.json").rename(tmp_path / "encoder.json")
    (tmp_path / "merges.txt").rename(tmp_path / "vocab.bpe")
    model, tok2 = load_decoder(tmp_path / "decoder_model.bin", n_head=4)
    ids = torch.tensor([tok("a red circle")["input_ids"]])
    assert tok2("a red circle")["input_ids"] == ids[0].tolist()
    assert tok2.eos_token == "<|endoftext|>" and tok2.pad_token == "<|endoftext|>"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_kv_cache_and_left_padding_equal_full_forward(hf_dir):
    out, _, tok = hf_dir
    model, _ = load_decoder(out)
    ids = torch.randint(0, len(tok), (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :4], use_cache=True)
        past = first.past_key_values
        steps = [first.logits]
        for t in range(4, 10):  # one token at a time
            o = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = o.past_key_values
            steps.append(o.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :3] = 0  # row 1 is 3 pads + 7 tokens
        padded = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(padded[1, 3:], model(ids[1:, 3:]).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(padded[0], full[0], atol=1e-5, rtol=0)
        assert torch.isfinite(padded).all()


def test_inputs_embeds_equal_input_ids(hf_dir):
    out, _, tok = hf_dir
    model, _ = load_decoder(out)
    ids = torch.randint(0, len(tok), (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(inputs_embeds=model.embed_tokens(ids)).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        model(input_ids=ids, inputs_embeds=model.embed_tokens(ids))


def test_capture_hook_returns_attention_and_keeps_output():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=4, prefix_len=3)
    model = GPT(cfg).eval()
    ids = torch.randint(0, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    got: list[torch.Tensor] = []
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        model.transformer.h[1].attn.capture = got.append
        out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        step = model(ids[:, 5:], attention_mask=mask, past_key_values=out.past_key_values).logits
        model.transformer.h[1].attn.capture = None
    torch.testing.assert_close(torch.cat([out.logits, step], 1), ref, atol=1e-5, rtol=0)
    assert [tuple(a.shape) for a in got] == [(2, 4, 5, 3 + 5), (2, 4, 2, 3 + 7)]
    att = got[1]
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, 2))
    assert (got[0][0, :, 2:, 3:5] == 0).all()  # real queries of row 0 give its padded keys no weight
    assert (got[0][:, :, 0, 4:] == 0).all()  # causal: query 0 sees no later keys
    assert (att[:, :, :, :3] > 0).all()  # learned prefix keys are always attended


def test_adapters_start_as_identity_and_prefix_shape(hf_dir):
    out, _, tok = hf_dir
    ids = torch.randint(0, len(tok), (1, 8), generator=torch.Generator().manual_seed(4))
    base, _ = load_decoder(out)
    adapted, _ = load_decoder(out, adapter_dim=8)
    prefixed, _ = load_decoder(out, prefix_len=2)
    assert prefixed.prefix_kv.shape == (2, 2, 4, 2, 16)
    assert {n.split(".", 3)[3].split(".")[0] for n, _ in adapted.named_parameters() if "adapter" in n} == \
        {"adapter_attn", "adapter_mlp"}
    with torch.no_grad():
        ref = base(ids).logits
        torch.testing.assert_close(adapted(ids).logits, ref, atol=1e-5, rtol=0)  # zero-init up-projection
        assert not torch.allclose(prefixed(ids).logits, ref, atol=1e-3)  # the prefix is attended
    adapted.transformer.h[0].adapter_mlp.up.weight.data.normal_()
    with torch.no_grad():
        assert not torch.allclose(adapted(ids).logits, ref, atol=1e-3)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="not a file, a directory, or a model in the local HF cache"):
        load_decoder(str(tmp_path / "missing-model"))
    (tmp_path / "decoder_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="decoder_model.bin"):
        load_decoder(tmp_path / "decoder_model.bin")
    with pytest.raises(ConfigError, match="unknown options"):
        load_decoder(tmp_path, n_heads=3)


def test_demo_gpt2_loads_both_ways(demo_gpt2):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(demo_gpt2).eval()
    model, tok = load_decoder(demo_gpt2)
    course, tok2 = load_decoder(demo_gpt2 / "decoder_model.bin")
    ids = torch.tensor([tok("<|endoftext|>a red circle on the left")["input_ids"]])
    assert tok2("a red circle")["input_ids"] == tok("a red circle")["input_ids"]
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(course(ids).logits, ref, atol=1e-4, rtol=0)
