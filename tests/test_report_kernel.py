"""The report runner's kernel talks over IPC: no "TCP without encryption" warning, real errors still surface."""

from __future__ import annotations

import nbformat
import pytest

from captionlab.report.runner import NotebookError, execute_notebook


def _notebook(path, *sources: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_kernel_runs_without_tcp_warning_and_errors_still_raise(tmp_path, capfd):
    src = _notebook(tmp_path / "ok.ipynb", "import os, sys\nprint(sys.version_info[0])")
    out = execute_notebook(src, tmp_path / "ok.out.ipynb", {}, cwd=tmp_path, progress=False)
    assert nbformat.read(out, 4).cells[-1].outputs[0]["text"] == "3\n"
    bad = _notebook(tmp_path / "bad.ipynb", "x = 1", "raise ValueError('boom from the kernel')")
    with pytest.raises(NotebookError, match="bad.ipynb failed at cell 2/2.*ValueError: boom from the kernel"):
        execute_notebook(bad, tmp_path / "bad.out.ipynb", {}, cwd=tmp_path, progress=False)
    err = capfd.readouterr().err
    assert "without encryption" not in err
    assert not list(tmp_path.glob("*ipc*"))  # IPC socket files live in the Jupyter runtime dir, not the cwd


def test_kernel_is_stopped_and_reaped_when_the_notebook_is_done(tmp_path):
    """The runner stops the kernel at once after the last cell (`shutdown_kernel="immediate"`): the outputs are all
    there, and the kernel and a process it started are gone (not left running) when execute_notebook returns."""
    import psutil

    from captionlab.report import runner

    src = _notebook(tmp_path / "k.ipynb", "import subprocess, sys\n"
                    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                    "print(child.pid)")
    pids: list[int] = []
    token = runner._KERNEL_PIDS.set(pids)
    try:
        out = execute_notebook(src, tmp_path / "k.out.ipynb", {}, cwd=tmp_path, progress=False)
    finally:
        runner._KERNEL_PIDS.reset(token)
    child = int(nbformat.read(out, 4).cells[-1].outputs[0]["text"])
    assert len(pids) == 1

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie has exited
        except psutil.NoSuchProcess:
            return False

    assert not alive(pids[0])
    try:
        assert not alive(child)  # the kernel's process group is stopped with it
    finally:
        if alive(child):
            psutil.Process(child).kill()
