"""The notebooks as git stores them (the working files through the `.gitattributes` clean filter): output-free,
a parsable `parameters` cell naming RunConfig fields (None: the value in params/demo.yaml), a one-line setup call,
and the runner's order matches the files."""

from __future__ import annotations

import ast
import re
from dataclasses import MISSING
from pathlib import Path

import nbformat
import papermill as pm
import pytest
import yaml
from nbgit import staged_text

from captionlab.params import FIELDS
from captionlab.report import runner
from captionlab.utils import REPO_ROOT

pytestmark = pytest.mark.xdist_group("notebook_filter")  # one worker: each notebook goes through the filter once
NB_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
DEMO = yaml.safe_load((REPO_ROOT / "params" / "demo.yaml").read_text())


def committed(path: Path) -> nbformat.NotebookNode:
    """The notebook as `git add` would store it (outputs a user saved are stripped by the filter, if set up)."""
    return nbformat.reads(staged_text(REPO_ROOT, path), as_version=4)


def test_notebook_set_matches_runner_order() -> None:
    assert [p.stem for p in NOTEBOOKS] == list(runner.ORDER)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_parameters_cell(path: Path) -> None:
    nb = committed(path)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), (
        f"{path.name}: git would commit outputs; run `make venv` (sets up the nbstripout filter of .gitattributes)")
    assert "language_info" not in nb.metadata and "widgets" not in nb.metadata, f"{path.name}: run metadata"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], f"{path.name}: first code cell must be the tagged parameters cell"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_are_run_config_fields_read_from_demo_params(path: Path, tmp_path: Path) -> None:
    nb = committed(path)
    nbformat.write(nb, tmp_path / path.name)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    source = cells[0].source
    assigned = [t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets]
    declared = pm.inspect_notebook(tmp_path / path.name)
    assert list(declared) == assigned, "papermill must parse every parameter (no '=' in comments)"
    for name in ("params_file", "run_dir", "world", "seed", "quick", "data_root"):
        assert name in declared, f"{path.name}: missing common parameter {name}"
    unknown = sorted(set(declared) - set(FIELDS))
    assert not unknown, f"{path.name}: parameters {unknown} are not RunConfig fields"
    defaults = {name: ast.literal_eval(info["default"]) for name, info in declared.items()}
    assert defaults.pop("params_file") == "params/demo.yaml"
    assert set(defaults.values()) == {None}, f"{path.name}: defaults must come from the params file, not a copy"
    assert all(name in DEMO or FIELDS[name].default is not MISSING for name in defaults)
    setup = cells[1].source.splitlines()
    call = [line for line in setup if "report.start(" in line]
    assert len(call) == 1 and call[0].startswith(f'ctx = report.start("{path.stem}", globals()') and len(call[0]) < 80


def test_no_generator_owns_the_notebooks() -> None:
    assert not (NB_DIR / "_build.py").exists()
    attrs = (REPO_ROOT / ".gitattributes").read_text()
    assert "*.ipynb filter=nbstripout" in attrs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runner_knows_the_models_each_notebook_prepares(path: Path) -> None:
    """The report runner starts a notebook once the demo models in context.NOTEBOOK_MODELS are built: that must be
    what the notebook's `report.start(..., models=[...])` asks for."""
    from captionlab.report.context import NOTEBOOK_MODELS

    calls = [node for cell in committed(path).cells if cell.cell_type == "code"
             for node in ast.walk(ast.parse(cell.source)) if isinstance(node, ast.Call)
             and getattr(node.func, "attr", getattr(node.func, "id", None)) == "start"]
    assert len(calls) == 1, f"{path.name}: one report.start(...) call"
    models = next((ast.literal_eval(k.value) for k in calls[0].keywords if k.arg == "models"), [])
    assert tuple(models) == NOTEBOOK_MODELS[path.stem]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runner_knows_which_notebooks_each_reads(path: Path) -> None:
    """A notebook that reads another's outputs (`ctx.section(...)`) runs after it when the runner runs notebooks side
    by side: that notebook must be in context.NEEDS (required) or context.READS (shown when present)."""
    from captionlab.report.context import NEEDS, READS

    source = "\n".join(c.source for c in committed(path).cells if c.cell_type == "code")
    read = {m.group(1) for m in re.finditer(r"""section\(["']([0-9]{2}_[a-z_]+)["']\)""", source)}
    assert read <= set(NEEDS.get(path.stem, {})) | set(READS.get(path.stem, ())), read
    if path.stem == "03_evaluate":
        assert read == {"01_llava_prompts"}  # the pattern finds what it looks for
