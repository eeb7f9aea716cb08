"""`evaluate` and `captionlab evaluate`: input checks, per-image tables, outputs, and the 500-caption time budget."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from captionlab.data.captions import load_captions
from captionlab.errors import ConfigError, DataError, ImageLoadError
from captionlab.metrics import evaluate, load_result
from captionlab.models.clip import load_clip


@pytest.fixture(scope="module")
def clip(demo_clip):
    return load_clip(demo_clip, device="cpu")


@pytest.fixture()
def small(tmp_path, demo_world) -> tuple[Path, Path, dict[str, list[str]]]:
    """Eight demo val images with their annotations, copied into tmp_path (course layout)."""
    src = load_captions(demo_world / "p2_data" / "val.json")
    stems = src.stems[:8]
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images, anns = [], []
    for i, s in enumerate(stems):
        shutil.copy(src.image_path(demo_world / "p2_data" / "images" / "val", s), img_dir / src.file_names[s])
        images.append({"file_name": src.file_names[s], "id": i})
        anns += [{"image_id": i, "caption": c, "id": len(anns)} for c in src.captions[s]]
    ann_path = tmp_path / "val.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": anns}))
    return ann_path, img_dir, {s: src.captions[s] for s in stems}


def _own(refs: dict[str, list[str]]) -> dict[str, str]:
    return {s: caps[0] for s, caps in refs.items()}


def test_input_checks_name_the_problem(small, clip) -> None:
    ann, img_dir, refs = small
    preds = _own(refs)
    stems = list(refs)
    with pytest.raises(DataError, match="must be a dict"):
        evaluate(list(preds.values()), ann, img_dir, clip)
    missing = {k: v for k, v in preds.items() if k not in stems[:2]}
    with pytest.raises(DataError, match=rf"2 missing \('{stems[0]}', '{stems[1]}'\)"):
        evaluate(missing, ann, img_dir, clip)
    extra = {**preds, **{f"extra_{i}": "a red circle" for i in range(7)}}
    with pytest.raises(DataError, match=r"7 unexpected \('extra_0'.*and 2 more"):
        evaluate(extra, ann, img_dir, clip)
    with pytest.raises(DataError, match=rf"not strings: '{stems[3]}'"):
        evaluate({**preds, stems[3]: 42}, ann, img_dir, clip)
    with pytest.raises(DataError, match=rf"1 caption\(s\) are empty: '{stems[4]}'"):
        evaluate({**preds, stems[4]: "  "}, ann, img_dir, clip)
    with pytest.raises(DataError, match="bad_pred.json.*differ"):  # from a file: the message names it
        bad = ann.parent / "bad_pred.json"
        bad.write_text(json.dumps(missing))
        evaluate(bad, ann, img_dir, clip)
    with pytest.raises(ConfigError, match="unknown metric"):
        evaluate(preds, ann, img_dir, clip, metrics=["CIDEr", "BLEURT"])
    with pytest.raises(ConfigError, match="images_dir"):
        evaluate(preds, ann, None, clip)

    victim = img_dir / f"{stems[5]}.jpg"
    victim.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageLoadError, match=re.escape(victim.name)):
        evaluate(preds, ann, img_dir, clip, metrics=["CLIPScore"])
    victim.unlink()
    with pytest.raises(ImageLoadError, match=rf"1 image file\(s\).*missing: '{victim.name}'"):
        evaluate(preds, ann, img_dir, clip)
    # without CLIP the images are not needed; CLIP metrics are reported unavailable, not dropped silently
    r = evaluate(preds, ann, None, clip=None, metrics=["CIDEr", "CLIPScore"])
    assert "CLIPScore" in r.summary["unavailable"] and "CIDEr" in r.summary


def test_result_tables_and_save(small, clip, tmp_path) -> None:
    ann, img_dir, refs = small
    preds = _own(refs)
    stems = list(refs)
    preds[stems[2]] = "a " + preds[stems[3]]  # one clearly wrong caption
    r = evaluate(preds, ann, img_dir, clip, metrics=["CIDEr", "CLIPScore", "RefCLIPScore", "SPICE"])
    df = r.per_image
    assert list(df.columns[:5]) == ["stem", "caption", "cider", "clipscore", "refclipscore"]
    assert list(df["stem"]) == stems and df["references"][0] == refs[stems[0]]
    assert r.summary["CIDEr"] == pytest.approx(df["cider"].mean())
    assert r.summary["CLIPScore"] == pytest.approx(df["clipscore"].mean())
    assert r.summary["RefCLIPScore"] == pytest.approx(df["refclipscore"].mean())
    assert r.summary["n_images"] == 8 and "versions" in r.summary and "git_commit" in r.summary
    assert "SPICE" in r.summary["unavailable"] or "SPICE" in r.summary
    assert r.bottom(1)["stem"].tolist() == [stems[2]]
    assert r.top(3, by="clipscore")["clipscore"].is_monotonic_decreasing
    assert re.fullmatch(r"CIDEr: [0-9.e-]+ \| CLIPScore: [0-9.e-]+", r.line())

    paths = r.save(tmp_path / "out", prefix="run1")
    summary = json.loads(paths["summary"].read_text())
    assert summary["CIDEr"] == pytest.approx(r.summary["CIDEr"]) and summary["outputs"]["per_image_csv"]
    assert paths["per_image_csv"].read_text().splitlines()[0].startswith("stem,caption,cider,clipscore,refclipscore")
    back = load_result(paths["summary"])
    assert back.per_image["cider"].tolist() == pytest.approx(df["cider"].tolist())
    assert back.per_image["references"][0] == refs[stems[0]]
    assert not list((tmp_path / "out").glob(".*"))  # no temp files left behind


def test_cli_prints_course_line_and_writes_json(small, demo_clip, capsys) -> None:
    from captionlab.cli import main

    ann, img_dir, refs = small
    pred = ann.parent / "pred.json"
    pred.write_text(json.dumps(_own(refs)))
    assert main(["evaluate", "--pred", str(pred), "--annotations", str(ann), "--images", str(img_dir),
                 "--clip", str(demo_clip), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"CIDEr: [0-9.]+ \| CLIPScore: [0-9.]+", out[0]), out
    assert any(line.startswith("RefCLIPScore: ") and "Bleu_4" in line for line in out)
    summary = json.loads((ann.parent / "pred.summary.json").read_text())
    assert summary["n_images"] == 8 and summary["CLIPScore"] > 0 and summary["params"]["clip"] == str(demo_clip)
    assert (ann.parent / "pred.per_image.csv").is_file()

    # a CLIP that cannot be loaded: one clear line, exit 2, and a pointer to the demo CLIP
    assert main(["evaluate", "--pred", str(pred), "--annotations", str(ann), "--images", str(img_dir),
                 "--clip", str(ann.parent / "no_such_clip")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "demo CLIP" in err and "no_such_clip" in err
    # a broken predictions file
    pred.write_text("{not json")
    assert main(["evaluate", "--pred", str(pred), "--annotations", str(ann), "--clip", "none"]) == 2
    assert "pred.json: invalid JSON" in capsys.readouterr().err


def test_500_captions_under_30s_and_identical_beats_shuffled(demo_world, clip) -> None:
    """The course-scale check on the demo world: 500 val captions, CIDEr + CLIPScore, timed."""
    ann = load_captions(demo_world / "p2_data" / "val.json")
    img_dir = demo_world / "p2_data" / "images" / "val"
    stems = ann.stems
    assert len(stems) == 500
    own = {s: ann.captions[s][0] for s in stems}
    perm = np.random.default_rng(1).permutation(len(stems))
    perm = np.where(perm == np.arange(len(stems)), (perm + 1) % len(stems), perm)
    shuffled = {s: ann.captions[stems[j]][0] for s, j in zip(stems, perm)}

    t0 = time.perf_counter()
    good = evaluate(own, ann, img_dir, clip, metrics=["CIDEr", "CLIPScore"])
    seconds = time.perf_counter() - t0
    print(f"evaluate(500 captions, CIDEr+CLIPScore): {seconds:.1f} s  {good.line()}  {good.summary['seconds']}")
    assert seconds < 30
    bad = evaluate(shuffled, ann, img_dir, clip, metrics=["CIDEr", "CLIPScore"])
    print(f"shuffled: {bad.line()}")
    assert good.summary["CIDEr"] > bad.summary["CIDEr"] + 1.0
    assert good.summary["CLIPScore"] > bad.summary["CLIPScore"]
    assert (good.per_image["clipscore"] > bad.per_image["clipscore"]).mean() > 0.9
