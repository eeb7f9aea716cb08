"""The suite turns deprecations raised from transformers into errors; our HF calls raise none."""

from __future__ import annotations

import warnings

import pytest
import torch


def test_transformers_deprecations_are_errors_in_the_suite():
    with pytest.raises(FutureWarning, match="renamed"):
        warnings.warn_explicit("`x` is renamed", FutureWarning, "generic.py", 1, module="transformers.utils.generic")
    with warnings.catch_warnings(record=True):  # other libraries' notices stay warnings
        warnings.warn_explicit("old api", FutureWarning, "x.py", 1, module="somelib.x")


def test_hf_decoder_uses_the_installed_cache_argument_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    from captionlab.decode import HFDecoder, greedy_search, hf_cache_kwarg

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 50, (2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a logged-once alias: no warning of any kind from our calls
        seqs = greedy_search(HFDecoder(model, ids), max_new_tokens=3, eos_token_id=49, min_new_tokens=3)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=0, eos_token_id=None)[:, 4:]
    assert seqs == ref.tolist()
    assert hf_cache_kwarg(model) in ("cache", "past_key_values")
