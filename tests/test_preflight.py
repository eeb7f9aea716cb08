"""`captionlab report check`: passes on the rehearsal params, names every problem of a broken copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from captionlab.cli import main
from captionlab.report.preflight import check_annotations, preflight
from captionlab.utils import REPO_ROOT


def _broken_copy(rehearsal_world: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """A copy of the rehearsal params + data with a missing image, a missing annotation key and a bad model path."""
    data = tmp_path / "hw3_data"
    shutil.copytree(rehearsal_world / "hw3_data", data, ignore=shutil.ignore_patterns("decoder_model.bin"))
    (data / "p2_data" / "decoder_model.bin").symlink_to(rehearsal_world / "hw3_data" / "p2_data" / "decoder_model.bin")
    val = json.loads((data / "p2_data" / "val.json").read_text())
    gone = val["images"][0]["file_name"]
    (data / "p2_data" / "images" / "val" / gone).unlink()
    train = json.loads((data / "p2_data" / "train.json").read_text())
    del train["annotations"][3]["caption"]
    (data / "p2_data" / "train.json").write_text(json.dumps(train))
    params = yaml.safe_load((REPO_ROOT / "params" / "rehearsal.yaml").read_text())
    params["data_root"] = str(data)
    params["llava_model"] = str(tmp_path / "no-such-llava")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(params))
    return path, gone, str(tmp_path / "no-such-llava")


def test_check_passes_on_the_rehearsal_params(rehearsal_world, capsys):
    assert main(["report", "check", "--params", "params/rehearsal.yaml", "--no-pdf"]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "hw3_repo (params `tokenizer`)" in out
    assert "decoder vocabulary 50257 = tokenizer 50257" in out and "(estimate)" in out


def test_check_names_each_problem_of_a_broken_copy(rehearsal_world, tmp_path, capsys):
    path, gone, llava = _broken_copy(rehearsal_world, tmp_path)
    assert main(["report", "check", "--params", str(path), "--no-pdf"]) == 1
    out = capsys.readouterr().out
    problems = out.split("problem(s):", 1)[1]
    assert f"image {gone}" in problems and "does not exist" in problems
    assert "train.json: annotations[3] has no 'caption'" in problems
    assert f"{llava}: does not exist" in problems
    assert out.count("\n  - ") == 3, problems


def test_report_run_stops_at_the_preflight(rehearsal_world, tmp_path, capsys):
    path, _, _ = _broken_copy(rehearsal_world, tmp_path)
    assert main(["report", "run", "--params", str(path), "--no-pdf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "preflight" in err and "3 problem(s)" in err
    assert not (tmp_path / "out" / "index.html").exists()


def test_annotations_that_reference_unknown_images_or_broken_files(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    ann = {"images": [{"file_name": "a.jpg", "id": 1}, {"id": 2}],
           "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 7, "caption": "y"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    problems, n_images, n_caps = check_annotations(tmp_path / "ann.json", tmp_path)
    text = "\n".join(problems)
    assert "images[1] has no 'file_name'" in text and "references image_id 7" in text
    assert "a.jpg: does not open as an image" in text and (n_images, n_caps) == (1, 1)


def test_gpu_estimates_for_the_course_route():
    result = preflight("params/dlcv2024.yaml", gpu="A100", pdf=False)
    est = {c.item: c for c in result.checks if c.area == "estimate"}
    assert set(est) >= {"01_llava_prompts", "01_llava_prompts (4-bit)", "02_train", "06_vit_analysis"}
    assert "7.06 B params bf16" in est["01_llava_prompts"].detail
    gb = lambda c: float(c.detail.split("~", 1)[1].split(" GB", 1)[0])  # noqa: E731
    assert 14 < gb(est["01_llava_prompts"]) < 40 and gb(est["01_llava_prompts (4-bit)"]) < gb(est["01_llava_prompts"])
    t4 = {c.item: c for c in preflight("params/dlcv2024.yaml", gpu="T4", pdf=False).checks}
    assert t4["01_llava_prompts"].status == "PROBLEM" and "does NOT fit" in t4["01_llava_prompts"].detail
    assert t4["01_llava_prompts (4-bit)"].status == "estimate"


def test_a_fresh_checkout_passes_before_the_demo_world_is_built(tmp_path):
    """`make demo` on a fresh clone runs the preflight before anything is generated: the demo world's data and tiny
    models are built by the run, so their absence is not a problem (a real world's missing data still is)."""
    from captionlab.params import load_params
    from captionlab.report.preflight import preflight

    p = load_params("params/demo.yaml", {"data_root": str(tmp_path / "seed0")})
    res = preflight(p, pdf=False)
    assert res.ok, res.table()
    rows = {(c.area, c.item): c.detail for c in res.checks}
    assert "not generated yet" in rows[("data", "data_root")]
    assert "not trained yet" in rows[("models", "encoder")] and "not trained yet" in rows[("models", "llava_model")]
    assert not preflight({**p, "world": "dlcv2024"}, pdf=False).ok  # the course data must exist
