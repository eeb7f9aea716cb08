"""Decoding: cached batched greedy / beam search agree with no-cache batch-1 references; eos and penalties."""

from __future__ import annotations

import pytest
import torch

from captionlab.decode import (HFDecoder, PrefixLMDecoder, beam_search, generate, greedy_search, reference_beam,
                               reference_greedy)
from captionlab.models.decoder import GPT, GPTConfig, load_decoder



class ScriptedDecoder:
    """A decoder whose next-token logits are a fixed function of the tokens generated so far (per row)."""

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], vocab: int = 6, batch: int = 1) -> None:
        self.table, self.V, self.batch_size = table, vocab, batch
        self.fed: list[list[int]] = []  # tokens passed to step(), for checking eos padding
        self.penalty_context = None

    def _logits(self, seqs: list[list[int]]) -> torch.Tensor:
        out = torch.full((len(seqs), self.V), -5.0)
        for i, s in enumerate(seqs):
            for tok, val in self.table.get(tuple(s), {}).items():
                out[i, tok] = val
        return out

    def prefill(self):
        seqs = [[] for _ in range(self.batch_size)]
        return self._logits(seqs), seqs

    def step(self, next_tokens, cache):
        self.fed.append(next_tokens.tolist())
        cache = [s + [int(t)] for s, t in zip(cache, next_tokens)]
        return self._logits(cache), cache

    def reorder_cache(self, cache, index):
        return [list(cache[i]) for i in index.tolist()]

    def full_logits(self, generated):
        return self._logits(generated.tolist())


def sharp_gpt(seed: int = 0, vocab: int = 50, prefix_len: int = 0) -> GPT:
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, prefix_len=prefix_len))
    with torch.no_grad():  # peaky distributions so that cache / no-cache float differences never flip a choice
        for p in gpt.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return gpt.eval()


@pytest.fixture(scope="module")
def prefixes():
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(3, 5, 32, generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, :2] = 0  # left padding: rows have 5, 3 and 1 prefix tokens
    mask[2, :4] = 0
    return embeds, mask


@pytest.mark.parametrize("eos", [0, 3, 7])
def test_batched_cached_search_equals_per_row_references(prefixes, eos):
    gpt = sharp_gpt(prefix_len=2)
    embeds, mask = prefixes
    batch = PrefixLMDecoder(gpt, embeds, mask, bos_token_id=eos)
    greedy = greedy_search(batch, 10, eos)
    beams = beam_search(batch, 3, 10, eos, length_penalty=0.7)
    for i in range(3):
        single = PrefixLMDecoder(gpt, embeds[i:i + 1, mask[i].bool()], bos_token_id=eos)
        assert greedy[i] == greedy_search(single, 10, eos)[0] == reference_greedy(single, 10, eos)[0]
        assert beams[i] == beam_search(single, 3, 10, eos, length_penalty=0.7)[0] \
            == reference_beam(single, 3, 10, eos, length_penalty=0.7)[0]
        assert beam_search(single, 1, 10, eos) == greedy_search(single, 10, eos)
    assert all(eos not in seq and len(seq) <= 10 for seq in greedy + beams)


def test_generate_dispatch_and_repetition_penalty(prefixes):
    gpt = sharp_gpt(seed=2)
    embeds, _ = prefixes
    dec = PrefixLMDecoder(gpt, embeds[:1], bos_token_id=0)
    plain = generate(dec, "greedy", max_new_tokens=12, eos_token_id=0, beam_size=4)
    assert plain == greedy_search(dec, 12, 0)
    assert generate(dec, "beam", beam_size=2, max_new_tokens=12, eos_token_id=0, min_new_tokens=1) == \
        beam_search(dec, 2, 12, 0)
    penal = generate(dec, "greedy", max_new_tokens=12, eos_token_id=0, repetition_penalty=1e6)
    assert penal == reference_greedy(dec, 12, 0, repetition_penalty=1e6)
    assert len(set(penal[0])) == len(penal[0])  # a huge penalty forbids any repeat
    assert len(set(plain[0])) < len(plain[0])  # (this random model does repeat itself without one)
    with pytest.raises(ValueError, match="unknown decoding method"):
        generate(dec, "sample", max_new_tokens=3, eos_token_id=0)


def test_eos_handling_and_padding_of_finished_rows():
    eos = 0
    dec = ScriptedDecoder({(): {1: 2.0, 2: 1.0}, (1,): {eos: 3.0}, (2,): {3: 3.0}}, batch=1)
    assert greedy_search(dec, 5, eos) == reference_greedy(dec, 5, eos) == [[1]]
    assert dec.fed == [[1]]  # one step to read the eos, none after it
    dec = ScriptedDecoder({(): {1: 2.0}, (1,): {eos: 3.0, 2: 1.0}, (1, 2): {3: 1.0}}, batch=1)
    assert greedy_search(dec, 5, eos) == [[1]]
    assert greedy_search(dec, 5, eos, min_new_tokens=2) == [[1, 2, 3]]  # eos blocked at step 1, then 2 -> 3 -> eos
    assert reference_greedy(dec, 5, eos, min_new_tokens=2) == [[1, 2, 3]]
    assert greedy_search(dec, 1, eos) == [[1]]  # cut by max_new_tokens
    assert beam_search(dec, 2, 1, eos) == [[1]]

    class TwoRows(ScriptedDecoder):  # row 0 ends after one token, row 1 after three
        def _logits(self, seqs):
            out = torch.full((len(seqs), self.V), -5.0)
            for i, s in enumerate(seqs):
                limit = 1 if self.row_of[i] == 0 else 3
                out[i, eos if len(s) >= limit else 5] = 5.0
            return out

    two = TwoRows({}, batch=2)
    two.row_of = [0, 1]
    assert greedy_search(two, 8, eos) == [[5], [5, 5, 5]]
    assert [row[0] for row in two.fed[1:]] == [eos, eos]  # the finished row is fed eos (padding)


def test_beam_length_penalty_prefers_long_or_short():
    eos = 0
    # "1 eos" has log-prob ~ -0.32 over 2 tokens; "2 3 4 eos" ~ -1.32 over 4 tokens
    table = {(): {1: 2.0, 2: 1.0}, (1,): {eos: 8.0}, (2,): {3: 8.0}, (2, 3): {4: 8.0}, (2, 3, 4): {eos: 8.0}}
    dec = ScriptedDecoder(table)
    short = beam_search(dec, 2, 6, eos, length_penalty=0.0)
    long_ = beam_search(dec, 2, 6, eos, length_penalty=3.0)
    assert short == reference_beam(dec, 2, 6, eos, length_penalty=0.0) == [[1]]
    assert long_ == reference_beam(dec, 2, 6, eos, length_penalty=3.0) == [[2, 3, 4]]
    assert greedy_search(dec, 6, eos) == [[1]]


def test_hf_decoder_matches_hf_generate_with_left_padding(tmp_path):
    from test_decoder_gpt import make_hf_gpt2

    hf, tok = make_hf_gpt2(tmp_path, seed=3, sharpen=8.0)
    tok.padding_side = "left"
    enc = tok(["a red circle", "two", "a large yellow triangle left"], return_tensors="pt", padding=True)
    eos = tok.eos_token_id
    dec = HFDecoder(hf, enc["input_ids"], enc["attention_mask"])
    ref = hf.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1, pad_token_id=eos, eos_token_id=eos)
    expected = []
    for row in ref[:, enc["input_ids"].shape[1]:].tolist():
        expected.append(row[: row.index(eos)] if eos in row else row)
    assert greedy_search(dec, 8, eos) == expected
    pen = hf.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1, pad_token_id=eos, eos_token_id=eos,
                      repetition_penalty=1.5)[:, enc["input_ids"].shape[1]:].tolist()
    assert greedy_search(dec, 8, eos, repetition_penalty=1.5) == [r[: r.index(eos)] if eos in r else r for r in pen]
    ours, _ = load_decoder(tmp_path)
    prompt = PrefixLMDecoder(ours, ours.embed_tokens(enc["input_ids"]), enc["attention_mask"])
    assert greedy_search(prompt, 8, eos) == expected  # our GPT + prefix embeddings == HF on the same prompt
    single = HFDecoder(hf, enc["input_ids"][2:, -5:])
    assert beam_search(single, 3, 8, eos) == reference_beam(single, 3, 8, eos)
    with pytest.raises(ValueError, match="left padding"):
        tok.padding_side = "right"
        bad = tok(["a red circle", "two"], return_tensors="pt", padding=True)
        HFDecoder(hf, bad["input_ids"], bad["attention_mask"])


def test_hf_decoder_runs_the_lm_head_on_the_last_position_only(tmp_path):
    from test_decoder_gpt import make_hf_gpt2

    hf, tok = make_hf_gpt2(tmp_path, seed=3)
    ids = tok(["a large yellow triangle left of a red circle"], return_tensors="pt")["input_ids"]
    shapes = []
    hf.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.logits.shape)))
    logits, _ = HFDecoder(hf, ids).prefill()
    assert shapes == [(1, 1, hf.config.vocab_size)]  # not (1, L, V): 576 image tokens x 32064 in LLaVA
    with torch.no_grad():
        assert torch.allclose(logits, hf(input_ids=ids).logits[:, -1].float(), atol=1e-5)

    class Wrapped(torch.nn.Module):  # a **kwargs-only wrapper gets no logits_to_keep
        def __init__(self) -> None:
            super().__init__()
            self.inner = hf

        def forward(self, **kw):
            assert "logits_to_keep" not in kw
            return self.inner(**kw)

    # all L positions through the head, then the last: the same numbers up to the GEMM's rounding (its kernel
    # depends on the row count; on AVX-512 machines M=1 and M=L round differently)
    assert torch.allclose(HFDecoder(Wrapped(), ids).prefill()[0], logits, atol=1e-5)


def test_demo_gpt2_beam_equals_reference_and_writes_captions(demo_gpt2):
    gpt, tok = load_decoder(demo_gpt2)
    eos = tok.eos_token_id
    prompts = ["a red", "two", "there is a small blue"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    batch = PrefixLMDecoder(gpt, gpt.embed_tokens(enc["input_ids"]), enc["attention_mask"])
    greedy = greedy_search(batch, 20, eos)
    beams = beam_search(batch, 3, 20, eos)
    for i in range(len(prompts)):
        ids = torch.tensor([tok(prompts[i])["input_ids"]])
        single = PrefixLMDecoder(gpt, gpt.embed_tokens(ids))
        assert greedy[i] == reference_greedy(single, 20, eos)[0]
        assert beams[i] == reference_beam(single, 3, 20, eos)[0]
    texts = [p + tok.decode(g) for p, g in zip(prompts, beams)]
    shapes = ("circle", "square", "triangle", "star")
    assert all(any(s in t for s in shapes) for t in texts), texts
    # unconditional captions from BOS alone: the LM ends them with eos well before the limit
    bos_only = PrefixLMDecoder(gpt, torch.zeros(1, 0, gpt.config.n_embd), bos_token_id=eos)
    caption = greedy_search(bos_only, 30, eos)[0]
    assert 2 < len(caption) < 30 and any(s in tok.decode(caption) for s in shapes)


def test_hf_decoder_on_demo_llava_matches_hf_generate(demo_llava, demo_world):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(demo_llava).eval()
    processor = AutoProcessor.from_pretrained(demo_llava)
    processor.tokenizer.padding_side = "left"
    images = [Image.open(p).convert("RGB") for p in sorted((demo_world / "p2_data/images/val").glob("*.jpg"))[:2]]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           add_generation_prompt=True)
             for q in ("Describe the image.", "What shapes are there? Answer briefly please.")]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    dec = HFDecoder(model, inputs["input_ids"], inputs["attention_mask"], **extra)
    n = inputs["input_ids"].shape[1]
    for kw, ours in (({"num_beams": 1}, greedy_search(dec, 12, eos)), ({"num_beams": 3}, beam_search(dec, 3, 12, eos))):
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=pad, eos_token_id=eos, **kw)
        assert ours == [r[: r.index(eos)] if eos in r else r for r in ref[:, n:].tolist()], kw
