"""The papermill runner on tiny notebooks: parameters from a params file, the venv's kernel, failures that name
the notebook and the cell, the index page, and a sweep's comparison table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from captionlab.errors import ConfigError
from captionlab.report import runner
from captionlab.report.runner import NotebookError


def _write(path: Path, params: str, *cells: str) -> Path:
    p = new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[p, *(new_code_cell(c) for c in cells)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


OK_PARAMS = 'params_file = "params/demo.yaml"\nrun_dir = None\nquick = None\nworld = None\ndata_root = None\nlr = None'
OK_CELL = """
import sys
import matplotlib.pyplot as plt
from captionlab import report
ctx = report.start("{name}", globals())
fig, ax = plt.subplots()
ax.plot([0, 1], [0, lr])
report.show(fig, ctx.path("line.png"))
ctx.headline({{"score": lr, "python": sys.executable}}, title="Section {name}")
"""


@pytest.fixture()
def tiny_notebooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _write(nbdir / "a_ok.ipynb", OK_PARAMS, OK_CELL.format(name="a_ok"))
    _write(nbdir / "b_fail.ipynb", 'run_dir = ""', "x = 1", "def f():\n    return 1 / 0\n\nf()")
    _write(nbdir / "c_never.ipynb", 'run_dir = ""', "pass")
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", nbdir)
    monkeypatch.setattr(runner, "ORDER", ("a_ok", "b_fail", "c_never"))
    (tmp_path / "data").mkdir()
    (tmp_path / "p.yaml").write_text(f"base: params/demo.yaml\ntitle: Tiny report\nworld: real\n"
                                     f"data_root: {tmp_path / 'data'}\nlr: 2.5\n")
    return tmp_path


def test_run_report_stops_at_failing_cell_and_indexes_what_ran(tiny_notebooks: Path) -> None:
    out = tiny_notebooks / "report"
    with pytest.raises(NotebookError) as info:
        runner.run_report(tiny_notebooks / "p.yaml", out_dir=out, pdf=False, progress=False)
    msg = str(info.value)
    assert "b_fail.ipynb" in msg and "cell 3/3" in msg and "ZeroDivisionError: division by zero" in msg
    assert "def f():" in msg and str(out / "index.html") in msg

    headline = json.loads((out / "a_ok" / "headline.json").read_text())
    assert headline["metrics"]["score"] == 2.5  # read from the params file the runner passed
    assert Path(headline["metrics"]["python"]).resolve() == Path(sys.executable).resolve()  # the venv's kernel
    assert "data:image/png;base64" in (out / "a_ok.html").read_text()
    assert (out / "a_ok" / "line.png").exists()

    index = (out / "index.html").read_text()
    assert "Tiny report" in index and "Section a_ok" in index and "real world" in index
    assert "failed" in index and "ZeroDivisionError" in index and "not run" in index
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["sections"]] == ["ok", "failed", "not run"]
    assert not (out / "c_never.ipynb").exists()


def test_run_report_only_selected(tiny_notebooks: Path) -> None:
    result = runner.run_report(tiny_notebooks / "p.yaml", out_dir=tiny_notebooks / "r2", notebooks="a_ok",
                               quick=True, pdf=False, render_html=False, progress=False)
    assert [s.name for s in result.sections] == ["a_ok"] and result.sections[0].status == "ok"
    assert result.sections[0].headline["quick"] is True


def test_sweep_writes_comparison_table(tiny_notebooks: Path) -> None:
    from captionlab.report.sweep import run_sweep

    nb = tiny_notebooks / "notebooks" / "a_ok.ipynb"
    sweep = tiny_notebooks / "s.yaml"
    sweep.write_text(f"base: {tiny_notebooks / 'p.yaml'}\nnotebook: {nb}\nmetrics: [score]\n"
                     "settings:\n  - {lr: 3.0}\n  - {name: big, lr: 7.0}\n")
    result = run_sweep(sweep, out_dir=tiny_notebooks / "sweep", progress=False)
    table = pd.read_csv(result.csv)
    assert list(table["setting"]) == ["lr=3.0", "big"]
    assert list(table["score"]) == [3.0, 7.0] and set(table["status"]) == {"ok"}
    assert result.png is not None and result.png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_rejects_unknown_parameter(tiny_notebooks: Path) -> None:
    from captionlab.report.sweep import run_sweep

    sweep = tiny_notebooks / "s.yaml"
    sweep.write_text(f"base: {tiny_notebooks / 'p.yaml'}\nnotebook: {tiny_notebooks / 'notebooks' / 'a_ok.ipynb'}\n"
                     "settings:\n  - {rnak: 3}\n")
    with pytest.raises(ConfigError, match="rnak"):
        run_sweep(sweep, out_dir=tiny_notebooks / "sweep", progress=False)


def test_select_and_parameters_of_the_real_notebooks() -> None:
    assert [p.stem for p in runner.select_notebooks("03,00_demo_world")] == ["00_demo_world", "03_evaluate"]
    assert [p.stem for p in runner.select_notebooks(None)] == list(runner.ORDER)
    with pytest.raises(ConfigError, match="unknown notebook 'nope'"):
        runner.select_notebooks("nope")
    run = {"params_file": "p.yaml", "run_dir": "r", "quick": True}
    chosen = runner.notebook_parameters(runner.notebook_path("02"), run, overrides={"rank": 8},
                                        per_notebook={"02_train": {"epochs": 1}, "03_evaluate": {"metrics": []}})
    assert chosen == {**run, "rank": 8, "epochs": 1}
    with pytest.raises(ConfigError, match="per_notebook.02_train: bogus"):
        runner.notebook_parameters(runner.notebook_path("02"), run, per_notebook={"02_train": {"bogus": 1}})


def test_ipc_kernels_get_their_own_sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent report kernels (two runs, xdist workers) must not share IPC socket files: jupyter_client's default
    path ("kernel-ipc" in the working directory) made one kernel client read another kernel's messages."""
    from jupyter_core.paths import jupyter_runtime_dir

    monkeypatch.chdir(tmp_path)
    km = runner.ipc_kernel_manager()
    a, b = km(), km()
    assert a.transport == b.transport == "ipc"
    assert a.ip != b.ip and Path(a.ip).parent == Path(jupyter_runtime_dir()) and not Path(a.ip).is_relative_to(tmp_path)


TIMED_CELL = """
import json, time
from pathlib import Path
t0 = time.time()
ballast = bytearray({mb} * 2**20)  # resident memory this kernel holds
time.sleep(2.0)
out = Path(run_dir) / "{name}"
out.mkdir(parents=True, exist_ok=True)
(out / "span.json").write_text(json.dumps([t0, time.time()]))
{extra}
"""


@pytest.fixture()
def side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three notebooks: `a_big` and `b_small` independent, `c_after` reads a_big's output (context.NEEDS)."""
    from captionlab.report import context

    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    params = 'params_file = "params/demo.yaml"\nrun_dir = ""'
    _write(nbdir / "a_big.ipynb", params, TIMED_CELL.format(name="a_big", mb=400, extra=""))
    _write(nbdir / "b_small.ipynb", params, TIMED_CELL.format(name="b_small", mb=0, extra=""))
    _write(nbdir / "c_after.ipynb", params, TIMED_CELL.format(
        name="c_after", mb=0, extra="assert (Path(run_dir) / 'a_big' / 'span.json').exists()"))
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", nbdir)
    monkeypatch.setattr(runner, "ORDER", ("a_big", "b_small", "c_after"))
    monkeypatch.setitem(context.NEEDS, "c_after", {"a_big": ["{run_dir}/a_big/span.json"]})
    (tmp_path / "data").mkdir()
    (tmp_path / "p.yaml").write_text(f"base: params/demo.yaml\nworld: real\ndata_root: {tmp_path / 'data'}\n")
    return tmp_path


def _span(out: Path, name: str) -> tuple[float, float]:
    t0, t1 = json.loads((out / name / "span.json").read_text())
    return t0, t1


def test_notebooks_run_side_by_side_in_dependency_order(side_by_side: Path) -> None:
    out = side_by_side / "report"
    result = runner.run_report(side_by_side / "p.yaml", out_dir=out, pdf=False, progress=False, jobs=2)
    assert [s.name for s in result.sections] == ["a_big", "b_small", "c_after"]  # the index keeps the order
    assert [s.status for s in result.sections] == ["ok", "ok", "ok"]
    (a0, a1), (b0, b1), (c0, _) = (_span(out, n) for n in ("a_big", "b_small", "c_after"))
    assert b0 < a1 and a0 < b1  # a_big and b_small ran at the same time
    assert c0 >= a1  # c_after started after what it reads was written
    peak = {s.name: s.extras["peak_memory_mb"] for s in result.sections}
    assert peak["a_big"] > 400 and 0 < peak["b_small"] < 300  # each section measures its own kernel only


def test_after_a_failure_nothing_new_starts(side_by_side: Path) -> None:
    _write(side_by_side / "notebooks" / "a_big.ipynb", 'run_dir = ""', "import time\ntime.sleep(0.5)\n1 / 0")
    out = side_by_side / "report"
    with pytest.raises(NotebookError, match="a_big.ipynb"):
        runner.run_report(side_by_side / "p.yaml", out_dir=out, pdf=False, progress=False, jobs=2)
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["sections"]] == ["failed", "ok", "not run"]  # b_small ran to its end


def test_a_notebook_waits_for_its_demo_models(tmp_path: Path) -> None:
    """While the background build runs, a notebook is ready only once the models it uses are built."""
    from captionlab.demo import MARKER, build_key
    from captionlab.params import load_config

    cfg = load_config("params/demo.yaml", {"data_root": str(tmp_path)})
    (tmp_path / "world.json").write_text("{}")

    class Building:  # a model build still running
        def poll(self):
            return None

    names = ["00_demo_world", "05_clip_zero_shot", "01_llava_prompts"]
    assert runner._ready("00_demo_world", cfg, names, set(), Building())
    assert not runner._ready("05_clip_zero_shot", cfg, names, set(), Building())
    (tmp_path / "models" / "clip").mkdir(parents=True)
    (tmp_path / "models" / "clip" / MARKER).write_text(json.dumps({"key": build_key("clip")}))
    assert runner._ready("05_clip_zero_shot", cfg, names, set(), Building())
    assert not runner._ready("01_llava_prompts", cfg, names, set(), Building())  # llava is still building
    assert runner._ready("01_llava_prompts", cfg, names, set(), None)  # no build running: it builds what it needs
