"""Atomic writes leave ordinary permissions (mkstemp's 0600 must not leak into reports)."""

from __future__ import annotations

import os
import stat

import pytest

from captionlab.utils import atomic_path, atomic_write_json, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_0666_minus_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.html", "<p>hi</p>")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        with atomic_path(tmp_path / "c.pdf") as tmp:  # a file written by another program into the temp path
            tmp.write_bytes(b"%PDF")
        assert {p.name: _mode(p) for p in tmp_path.iterdir()} == {"a.html": 0o644, "b.json": 0o644, "c.pdf": 0o644}
        os.umask(0o027)
        atomic_write_text(tmp_path / "d.txt", "x")
        assert _mode(tmp_path / "d.txt") == 0o640
    finally:
        os.umask(old)


def test_overwrite_repairs_a_0600_file_from_an_old_run(tmp_path):
    path = tmp_path / "index.html"
    path.write_text("old")
    os.chmod(path, 0o600)
    old = os.umask(0o022)
    try:
        atomic_write_text(path, "new")
    finally:
        os.umask(old)
    assert path.read_text() == "new" and _mode(path) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    from captionlab.utils import atomic_dir

    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            1 / 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind
    assert [p.name for p in target.iterdir()] == ["old.txt"]  # the old content is intact
    old_umask = os.umask(0o022)
    try:
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
    finally:
        os.umask(old_umask)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # what mkdir() gives, not mkdtemp's 0700
