"""01's prompt-study cells and 03's evaluations are cached: a rerun reuses them without loading the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captionlab.report.cached import evaluate_decodings, prompt_study
from captionlab.resultcache import ResultCache


def _never():
    raise AssertionError("the model was loaded although every cell was cached")


def test_prompt_study_cells_are_cached(demo_world: Path, demo_llava: Path, tmp_path: Path):
    from captionlab.models.llava import load_llava

    cache = ResultCache(tmp_path / "results")
    args = dict(images_dir=demo_world / "p1_data" / "images" / "val", annotations=demo_world / "p1_data" / "val.json",
                configs={"greedy": {"num_beams": 1, "do_sample": False, "max_new_tokens": 12}}, clip=None, limit=4,
                batch_size=4, cache=cache)
    first = prompt_study(lambda: load_llava(str(demo_llava)), str(demo_llava), prompts=["Describe the image."],
                         out_dir=tmp_path / "a", **args)
    assert list(first["cached"]) == [False] and first.loc[0, "n_images"] == 4
    # the same cell again plus a new prompt: only the new cell runs (the model is loaded for it alone)
    loads = []
    second = prompt_study(lambda: loads.append(1) or load_llava(str(demo_llava)), str(demo_llava),
                          prompts=["Describe the image.", "Write a caption."], out_dir=tmp_path / "b", **args)
    assert sorted(second["cached"]) == [False, True] and loads == [1]
    reused = second[second["cached"]].iloc[0]
    assert reused["CIDEr"] == first.loc[0, "CIDEr"] and reused["prompt_idx"] == 0
    assert json.loads((tmp_path / "b" / "0_greedy.json").read_text()) == \
        json.loads((tmp_path / "a" / "0_greedy.json").read_text())
    third = prompt_study(_never, str(demo_llava), prompts=["Describe the image.", "Write a caption."],
                         out_dir=tmp_path / "c", **args)
    assert all(third["cached"]) and (tmp_path / "c" / "prompt_study.csv").exists()


@pytest.mark.slow
def test_evaluations_are_cached_per_decoding(demo_world: Path, demo_captioner, tmp_path: Path):
    from captionlab.data import load_captions
    from captionlab.report.dataset import subset

    _, checkpoint = demo_captioner
    val = subset(load_captions(demo_world / "p2_data" / "val.json"), 16)
    val_dir = demo_world / "p2_data" / "images" / "val"
    cache = ResultCache(tmp_path / "results")
    decodings = {"greedy": {"method": "greedy"}}
    r1, reused1 = evaluate_decodings(checkpoint, val, val_dir, decodings, 16, None, ["CIDEr"], tmp_path / "a", cache)
    r2, reused2 = evaluate_decodings(checkpoint, val, val_dir, {**decodings, "beam2": {"method": "beam",
                                                                                        "beam_size": 2}},
                                     16, None, ["CIDEr"], tmp_path / "b", cache)
    assert reused1 == {"greedy": False} and reused2 == {"greedy": True, "beam2": False}
    assert r2["greedy"].summary["CIDEr"] == r1["greedy"].summary["CIDEr"]
    assert (tmp_path / "b" / "predictions_greedy.json").exists() and (tmp_path / "b" / "eval_beam2.summary.json").exists()
    assert list(r2["greedy"].per_image["stem"]) == list(val.stems)
