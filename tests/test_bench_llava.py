"""The LLaVA decode benchmark rows: our KV-cache loop vs HF generate, same tokens, greedy and beam 3."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.mark.slow  # times both decode loops on two LLaVAs
def test_llava_decode_rows_ours_vs_hf(tmp_path, demo_world):
    import run
    from bench_suites import Setup, bench_llava_decode

    from captionlab.models.llava_train import save_random_llava

    llava = save_random_llava(tmp_path / "llava", seed=0, image_size=32, patch_size=8)
    s = Setup(device=torch.device("cpu"), data_root=demo_world, encoder="", decoder="", clip="", llava=str(llava),
              quick=True, threads=1, repeats=1, real=True)  # real=True: skip the 576-token model here
    rows = bench_llava_decode(s)
    names = {r["name"] for r in rows}
    assert names == {f"llava {m} {w} b{b}" for m in ("greedy", "beam3") for w in ("ours", "hf") for b in (1, 2)}
    assert all(r["seconds"] > 0 and r["section"] == "llava_decode" for r in rows)
    assert all(r["note"].endswith("on 2 images: True") for r in rows)  # ours == HF generate, greedy
    rows += [dict(rows[0], name="llava greedy ours b8"), dict(rows[1], name="llava greedy hf b8")]
    assert "llava greedy ours/hf @b8 (img/s)" in run.ratios(rows)
