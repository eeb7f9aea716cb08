"""Notebooks run alone and in any order: a missing upstream output stops the setup call with one line naming the
notebook to run first (before anything is built), and `report run --only 04` runs what 04 needs first."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from captionlab.errors import MissingInputError
from captionlab.params import load_config
from captionlab.report import runner, start
from captionlab.report.context import upstream_notebooks
from captionlab.utils import REPO_ROOT


def test_setup_names_the_notebook_to_run_first(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError) as info:
        start("04_attention", {"run_dir": str(tmp_path)}, models=["llava"])
    msg = str(info.value)
    assert "\n" not in msg and "from 02_train: run notebooks/02_train.ipynb first" in msg
    assert info.value._render_traceback_() == [f"MissingInputError: {msg}"]  # IPython shows just this line
    (tmp_path / "02_train" / "checkpoint" / "best").mkdir(parents=True)
    with pytest.raises(MissingInputError, match=r"clipscore_pairs.csv from 03_evaluate: run notebooks/03_evaluate"):
        start("04_attention", {"run_dir": str(tmp_path)})
    assert not (tmp_path / "04_attention").exists()


def test_upstream_notebooks_are_only_the_missing_ones(tmp_path: Path) -> None:
    cfg = load_config("params/demo.yaml", {"run_dir": str(tmp_path)})
    assert upstream_notebooks("04_attention", cfg) == ["02_train", "03_evaluate"]
    assert upstream_notebooks("03_evaluate", cfg) == ["02_train"]
    assert upstream_notebooks("05_clip_zero_shot", cfg) == []
    (tmp_path / "02_train" / "checkpoint" / "best").mkdir(parents=True)
    assert upstream_notebooks("04_attention", cfg) == ["03_evaluate"]


def test_only_04_runs_what_04_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []

    def fake_execute(notebook, output, parameters, **kwargs):
        ran.append(Path(notebook).stem)
        nbformat.write(nbformat.v4.new_notebook(), str(output))
        return output

    monkeypatch.setattr(runner, "execute_notebook", fake_execute)
    monkeypatch.setattr(runner, "_start_model_builds", lambda *a: None)  # no notebook runs: nothing to build for
    runner.run_report("params/demo.yaml", out_dir=tmp_path, notebooks="04", render_html=False, pdf=False,
                      progress=False)
    assert ran == ["02_train", "03_evaluate", "04_attention"]


def test_notebook_04_alone_on_a_fresh_run_dir_prints_one_line(tmp_path: Path, demo_world: Path) -> None:
    nb = nbformat.read(REPO_ROOT / "notebooks" / "04_attention.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = params.source.replace("run_dir = None", f'run_dir = "{tmp_path}"')
    with pytest.raises(CellExecutionError):
        NotebookClient(nb, kernel_name="python3", timeout=300,
                       resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "MissingInputError"
    assert errors[0].traceback == [f"MissingInputError: {errors[0].evalue}"]
    assert "run notebooks/02_train.ipynb first" in errors[0].evalue
