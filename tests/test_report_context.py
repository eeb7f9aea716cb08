"""The notebook context: parameter resolution, world preparation errors, headline and metadata files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from captionlab.errors import ConfigError
from captionlab.report import start
from captionlab.report.figures import image_grid, show, show_table


def _real_params(tmp_path: Path, extra: str = "") -> Path:
    data = tmp_path / "hw3_data"
    data.mkdir(exist_ok=True)
    pf = tmp_path / "p.yaml"
    pf.write_text(f"base: params/demo.yaml\nworld: real\ndata_root: {data}\nseed: 5\n{extra}")
    return pf


def test_start_reads_the_file_overrides_with_notebook_values_and_sets_them_back(tmp_path: Path) -> None:
    pf = _real_params(tmp_path)
    ns = {"params_file": str(pf), "run_dir": str(tmp_path / "run"), "seed": 3, "quick": "true",
          "decoder": "{data_root}/p2_data/decoder_model.bin", "zeroshot_templates": None, "rank": None,
          "unrelated": object()}
    ctx = start("02_train", ns)
    data = tmp_path / "hw3_data"
    assert ctx.world == "real" and ctx.seed == 3 and ctx.quick is True  # notebook values win over the file
    assert ctx["decoder"] == f"{data}/p2_data/decoder_model.bin" == ns["decoder"]
    assert ns["rank"] == 4 and ns["seed"] == 3  # None: the params file's (here demo.yaml's, via base) value
    assert ns["zeroshot_templates"][0] == "This is a photo of {object}"  # `{{object}}` in YAML: a literal slot
    assert ctx.cfg.rank == 4 and ctx["clip_model"] == f"{data}/models/clip"
    assert ctx.out == (tmp_path / "run" / "02_train").resolve() and ctx.out.is_dir()
    assert ctx.section("03_evaluate") == ctx.run_dir / "03_evaluate"
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        ctx["nope"]
    assert "**real** world" in ctx._repr_markdown_()


def test_unknown_key_and_wrong_type_name_the_key_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"p.yaml: unknown key 'rnak'"):
        start("x", {"params_file": str(_real_params(tmp_path, "rnak: 3\n"))})
    with pytest.raises(ConfigError, match=r"p.yaml: rank = 'eight' \(str\): expected int"):
        start("x", {"params_file": str(_real_params(tmp_path, "rank: eight\n"))})
    with pytest.raises(ConfigError, match=r"epochs = 1.5 \(float\): expected int"):
        start("x", {"params_file": str(_real_params(tmp_path)), "epochs": 1.5})


def test_missing_data_root_names_it(tmp_path: Path) -> None:
    pf = _real_params(tmp_path)
    with pytest.raises(ConfigError, match="missing_dir.*not a directory"):
        start("x", {"params_file": str(pf), "run_dir": str(tmp_path), "data_root": str(tmp_path / "missing_dir")})


def test_headline_and_save_json(tmp_path: Path) -> None:
    ctx = start("03_scores", {"params_file": str(_real_params(tmp_path)), "run_dir": str(tmp_path)})
    ctx.headline({"CIDEr": np.float32(0.5), "n": np.int64(3)}, title="Eval", notes="beam")
    h = json.loads((tmp_path / "03_scores" / "headline.json").read_text())
    assert h["metrics"] == {"CIDEr": 0.5, "n": 3} and h["world"] == "real" and h["title"] == "Eval"
    ctx.save_json("metrics.json", {"CIDEr": 0.5})
    m = json.loads((tmp_path / "03_scores" / "metrics.json").read_text())
    assert m["CIDEr"] == 0.5 and m["meta"]["world"] == "real" and "versions" in m["meta"]


def test_show_writes_png_and_table_csv(tmp_path: Path) -> None:
    fig = image_grid([np.zeros((8, 8, 3), np.uint8), np.eye(8, dtype=np.uint8)], ["img", "mask"], ncols=2)
    path = show(fig, tmp_path / "grid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df = show_table([{"a": 1.0, "b": "x"}, {"a": 0.25, "b": "y"}], tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b", "1.0,x", "0.25,y"]
    assert list(df["b"]) == ["x", "y"]


def test_demo_start_names_the_build_step(demo_world: Path, tmp_path: Path) -> None:
    ctx = start("05_clip_zero_shot", {"run_dir": str(tmp_path), "clip_model": None})
    assert ctx.data_root == demo_world and ctx.world == "demo"
    assert ctx["clip_model"] == f"{demo_world}/models/clip"
    assert "captionlab.params.prepare_world" in ctx._repr_markdown_()
