"""A notebook run and saved in place (as JupyterLab saves it) never brings outputs into git.

A scratch repository gets the project's Makefile, .gitattributes and one committed notebook; `make git-filters`
(what `make venv` runs) sets up the clean filter. The notebook is then edited (a parameter), executed in place
with outputs, execution counts, kernel `language_info`, timing and widget metadata, and staged: git stores
only the parameter change.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbgit import staged_text

from captionlab.utils import REPO_ROOT

pytest.importorskip("nbstripout", reason="nbstripout is a dev dependency (`make venv` installs it)")
# make, git and a filter process per notebook (+ a kernel): integration tests, not the edit-test loop
pytestmark = pytest.mark.slow


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


@pytest.fixture()
def scratch_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    for name in ("Makefile", ".gitattributes"):
        shutil.copy(REPO_ROOT / name, repo / name)
    # The committed text (what a fresh clone has), not the developer's possibly executed working copy.
    committed = staged_text(REPO_ROOT, REPO_ROOT / "notebooks" / "00_demo_world.ipynb")
    (repo / "notebooks" / "00_demo_world.ipynb").write_text(committed, encoding="utf-8")
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.invalid")
    git(repo, "config", "user.name", "t")
    subprocess.run(["make", "-s", "git-filters", f"PY={sys.executable}"], cwd=repo, check=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "notebook")
    return repo


def test_notebook_executed_and_saved_in_place_stages_without_outputs(scratch_repo: Path, demo_world: Path,
                                                                     tmp_path: Path) -> None:
    path = scratch_repo / "notebooks" / "00_demo_world.ipynb"
    nb = nbformat.read(path, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "run_dir = None" in params.source
    params.source = params.source.replace("run_dir = None", f'run_dir = "{tmp_path / "run"}"')
    NotebookClient(nb, kernel_name="python3", timeout=300, record_timing=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                           "version_minor": 0}}
    nb.cells[-1].metadata["scrolled"] = True
    nbformat.write(nb, path)  # JupyterLab's save: the same JSON layout (indent 1), outputs included

    saved = path.read_text()
    assert '"output_type"' in saved and '"language_info"' in saved and len(saved) > 50_000, "outputs were saved"
    assert (tmp_path / "run" / "00_demo_world" / "headline.json").exists()

    git(scratch_repo, "add", "notebooks/00_demo_world.ipynb")
    stored = git(scratch_repo, "show", ":notebooks/00_demo_world.ipynb")
    assert '"output_type"' not in stored and "language_info" not in stored and "widgets" not in stored
    assert all(c.get("execution_count") is None for c in json.loads(stored)["cells"])
    diff = git(scratch_repo, "diff", "--cached", "-U0").splitlines()
    changed = [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) == 2 and changed[0].startswith('-    "run_dir = None ') and changed[1].startswith(
        f'+    "run_dir = \\"{tmp_path / "run"}\\" '), diff  # only the edited parameter line


def test_committed_notebooks_are_what_the_filter_stores(scratch_repo: Path):
    """Every notebook in HEAD is a fixed point of the clean filter: a fresh clone shows no spurious change."""
    tracked = git(REPO_ROOT, "ls-files", "notebooks/*.ipynb").split()
    assert tracked
    for rel in tracked:
        blob = git(REPO_ROOT, "show", f"HEAD:{rel}")
        probe = scratch_repo / "notebooks" / Path(rel).name
        probe.write_text(blob, encoding="utf-8")
        assert staged_text(scratch_repo, probe) == blob, f"{rel}: committed without the nbstripout filter " \
                                                         "(run `make git-filters`, then `git add --renormalize`)"
