"""The notebook context: parameter resolution, world preparation errors, headline and metadata files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from captionlab.errors import ConfigError
from captionlab.report import start
from captionlab.report.figures import image_grid, show, show_table


def test_start_resolves_placeholders_and_keeps_nested_values(tmp_path: Path) -> None:
    data = tmp_path / "hw3_data"
    data.mkdir()
    ctx = start("02_train", params_file="", run_dir=str(tmp_path / "run"), world="real", seed=3, quick="true",
                data_root=str(data), decoder="{data_root}/p2_data/decoder_model.bin",
                templates=["This is a photo of {object}"], configs={"greedy": {"num_beams": 1}})
    assert ctx.world == "real" and ctx.seed == 3 and ctx.quick is True
    assert ctx["decoder"] == f"{data}/p2_data/decoder_model.bin"
    assert ctx["templates"] == ["This is a photo of {object}"]  # nested values are not placeholder-resolved
    assert ctx.out == (tmp_path / "run" / "02_train").resolve() and ctx.out.is_dir()
    assert ctx.section("03_evaluate") == ctx.run_dir / "03_evaluate"
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        ctx["nope"]
    assert "**real** world" in ctx._repr_markdown_()


def test_params_file_fills_keys_the_notebook_does_not_pass(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    pf = tmp_path / "p.yaml"
    pf.write_text(f"world: real\ndata_root: {data}\nextra: '{{data_root}}/x'\nseed: 5\n")
    ctx = start("x", params_file=str(pf), run_dir=str(tmp_path / "r"), seed=1)
    assert ctx.seed == 1  # notebook parameters win over the file
    assert ctx["extra"] == f"{data}/x" and ctx.world == "real"


def test_missing_data_root_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing_dir.*not a directory"):
        start("x", run_dir=str(tmp_path), world="real", data_root=str(tmp_path / "missing_dir"))


def test_headline_and_save_json(tmp_path: Path) -> None:
    ctx = start("03_evaluate", run_dir=str(tmp_path), world="real", data_root=str(tmp_path))
    ctx.headline({"CIDEr": np.float32(0.5), "n": np.int64(3)}, title="Eval", notes="beam")
    h = json.loads((tmp_path / "03_evaluate" / "headline.json").read_text())
    assert h["metrics"] == {"CIDEr": 0.5, "n": 3} and h["world"] == "real" and h["title"] == "Eval"
    ctx.save_json("metrics.json", {"CIDEr": 0.5})
    m = json.loads((tmp_path / "03_evaluate" / "metrics.json").read_text())
    assert m["CIDEr"] == 0.5 and m["meta"]["world"] == "real" and "versions" in m["meta"]


def test_show_writes_png_and_table_csv(tmp_path: Path) -> None:
    fig = image_grid([np.zeros((8, 8, 3), np.uint8), np.eye(8, dtype=np.uint8)], ["img", "mask"], ncols=2)
    path = show(fig, tmp_path / "grid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df = show_table([{"a": 1.0, "b": "x"}, {"a": 0.25, "b": "y"}], tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b", "1.0,x", "0.25,y"]
    assert list(df["b"]) == ["x", "y"]


def test_demo_world_fills_empty_model_specs(demo_world: Path, tmp_path: Path) -> None:
    ctx = start("05_clip_zero_shot", run_dir=str(tmp_path), world="demo", data_root="", clip_model="",
                encoder="hfclip:/elsewhere")
    assert ctx.data_root == demo_world
    assert ctx["clip_model"] == f"{demo_world}/models/clip" and ctx["encoder"] == "hfclip:/elsewhere"
