"""Smoke test of benchmarks/run.py in --quick mode, plus the pieces the figures rely on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_hf_twin_and_no_eos_generate_identical_fixed_length_tokens(demo_gpt2):
    from bench_suites import NoEos, hf_twin
    from captionlab.decode import (
        PrefixLMDecoder,
        beam_search,
        greedy_search,
        reference_greedy,
    )
    from captionlab.models.decoder import load_decoder

    gpt, tok = load_decoder(demo_gpt2 / "decoder_model.bin")
    gpt.eval()
    hf = hf_twin(gpt)
    torch.manual_seed(0)
    x = torch.randn(3, 5, gpt.config.n_embd) * 0.5
    ones = torch.ones(3, 5, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(gpt(inputs_embeds=x).logits, hf(inputs_embeds=x).logits, atol=1e-4)
    eos = tok.eos_token_id
    ours = greedy_search(NoEos(PrefixLMDecoder(gpt, x, ones), eos), 7, eos)
    ref = hf.generate(inputs_embeds=x, attention_mask=ones, max_new_tokens=7, min_new_tokens=7, do_sample=False,
                      pad_token_id=eos, eos_token_id=eos).tolist()
    assert ours == ref and all(len(r) == 7 and eos not in r for r in ours)
    naive = reference_greedy(NoEos(PrefixLMDecoder(gpt, x[:1], ones[:1]), eos), 7, eos)
    assert naive == ours[:1]
    assert all(len(r) == 7 for r in beam_search(NoEos(PrefixLMDecoder(gpt, x, ones), eos), 3, 7, eos))


def test_quick_run_writes_json_plot_and_readme_section(tmp_path, demo_gpt2, demo_clip, demo_llava):
    import run

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{run.START}\nold table\n{run.END}\n\ntail\n")
    out = tmp_path / "bench"
    assert run.main(["--quick", "--only", "decode,train", "--out", str(out), "--readme", str(readme)]) == 0
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    assert {r["section"] for r in rows} == {"decode", "train"}
    names = {r["name"] for r in rows}
    for m in ("greedy", "beam3"):
        assert {f"{m} naive", f"{m} ours b4", f"{m} hf b4", f"{m} ours+lora b1"} <= names
    for r in rows:
        assert r["seconds"] > 0 and r["throughput"] == pytest.approx(r["n"] / r["seconds"], rel=1e-2)
    assert "greedy ours/naive @b4 (img/s)" in data["ratios"]
    assert {f"train cached/uncached, {c} (samples/s)" for c in ("prefix", "cross")} <= set(data["ratios"])
    meta = data["run_metadata"]["bench"]
    assert meta["torch_threads"] == 1 and meta["quick"] and meta["world"] == "demo"
    assert (out / "bench.png").stat().st_size > 1000
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n") and text.endswith("\n\ntail\n")
    assert "old table" not in text and text.count(run.START) == 1 and "| greedy ours/naive @b4" in text
    assert run.main(["--quick", "--only", "nope", "--out", str(out), "--readme", ""]) == 2
