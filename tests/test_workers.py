"""The warm worker server (`captionlab.workers`): started once, reused by later clients, keyed by what its imports
depend on, runs each job in a forked child with the client's environment, ends a job whose client hangs up, stops
when told or when idle."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
from captionlab import workers
from captionlab.utils import cpu_cores


def _server_pid(path: Path) -> int:
    found = [pid for pid, sock in workers.running_servers(path.parent) if sock == path]
    assert len(found) == 1, workers.running_servers(path.parent)
    return found[0]


def _gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_server_runs_jobs_in_children_with_the_clients_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(workers.DIR_ENV, str(tmp_path / "w"))
    monkeypatch.setenv(workers.IDLE_ENV, "120")
    path = workers.start_server()
    assert workers.start_server() == path  # starting: not started twice
    with workers.WarmPool(path, 2) as pool:
        child = pool.submit("os:getpid").result(timeout=120)
        server = _server_pid(path)
        assert child not in (server, os.getpid()) and _gone(child)  # a child per job, gone when done
        monkeypatch.setenv("MY_CLIENT_VARIABLE", "x")  # set after the server started: the child still sees it
        monkeypatch.chdir(tmp_path)
        assert pool.submit("os:getenv", "MY_CLIENT_VARIABLE").result(timeout=30) == "x"
        assert pool.submit("os:getcwd").result(timeout=30) == str(tmp_path)
        monkeypatch.setenv("PYTHONCAPTIONLABTEST", "1")  # PYTHON*: read at import time, so another key
        assert workers.socket_path() != path
        monkeypatch.delenv("PYTHONCAPTIONLABTEST")
        assert workers.socket_path() == path
        with pytest.raises(ValueError) as err:  # the child's error, raised here with its traceback as a note
            pool.submit("builtins:int", "not a number").result(timeout=30)
        assert "in the warm worker's child" in "".join(getattr(err.value, "__notes__", []))
    # a second client (another notebook run) finds the same server: no new imports
    with workers.WarmPool(workers.start_server(), 1) as again:
        assert again.submit("os:getppid").result(timeout=30) == server
        sleeper = again.submit("time:sleep", 60)

        def running() -> list[psutil.Process]:
            return [c for c in psutil.Process(server).children() if c.status() != psutil.STATUS_ZOMBIE]

        deadline = time.monotonic() + 30
        while len(running()) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        (child,) = running()
        again.hang_up(sleeper)  # an interrupted notebook: its child exits at once
        assert _gone(child.pid, 5) and isinstance(sleeper.exception(timeout=5), workers.WorkerUnavailable)
    assert workers.stop_servers(path.parent) == [server] and _gone(server) and not path.exists()
    assert workers.running_servers(path.parent) == []


def test_server_key_covers_import_time_variables_only_and_its_folder_is_private(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(workers.DIR_ENV, str(tmp_path / "w"))
    key = workers.server_key()
    monkeypatch.setenv("SOME_UNRELATED_VARIABLE", "1")
    assert workers.server_key() == key
    monkeypatch.setenv("HF_HUB_OFFLINE", "0" if os.environ.get("HF_HUB_OFFLINE") == "1" else "1")
    assert workers.server_key() != key
    assert workers.server_dir() == tmp_path / "w" and (tmp_path / "w").stat().st_mode & 0o777 == 0o700
    assert workers.socket_path(key) == tmp_path / "w" / f"{key}.sock"


def test_start_workers_needs_cores_and_not_quick_and_not_turned_off(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(workers.DIR_ENV, str(tmp_path))
    assert not workers.start_workers({"params_file": "params/demo.yaml", "quick": True})
    assert not workers.start_workers({"params_file": "params/demo.yaml", "quick": "true"})  # papermill's -p string
    monkeypatch.setenv(workers.IDLE_ENV, "0")
    assert not workers.start_workers({"params_file": "params/demo.yaml"})
    assert not workers.start_workers({"params_file": tmp_path / "missing.yaml"})  # report.start names the problem
    assert workers.server_pool() is None and workers.take_early() is None and not list(tmp_path.glob("*.sock"))


@pytest.mark.slow
def test_server_exits_when_idle(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(workers.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(workers.IDLE_ENV, "1")
    path = workers.start_server()
    with workers.WarmPool(path, 1) as pool:
        assert pool.submit("os:getppid").result(timeout=120) == (server := _server_pid(path))
    assert _gone(server, 15) and not path.exists()


def test_a_lone_attempt_trains_in_the_warm_worker_submitted_early(demo_world: Path, demo_clip: Path,
                                                                  demo_gpt2: Path, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    from captionlab.data import load_predictions
    from captionlab.params import load_config
    from captionlab.resultcache import ResultCache
    from captionlab.train.attempts import run_attempts

    if cpu_cores() < 2:
        pytest.skip("one core: attempts train in the notebook's process")
    monkeypatch.setenv(workers.DIR_ENV, str(tmp_path / "w"))
    monkeypatch.setenv("CAPTIONLAB_CACHE", str(tmp_path / "cache"))  # this test's results and features
    notebook = {"params_file": "params/demo.yaml", "run_dir": str(tmp_path / "run"), "data_root": str(demo_world),
                "rank": 2, "train": {"max_steps": 3, "grad_accum": 2, "train_images": 32, "eval_images": 8},
                "quick": None, "unrelated_name": 1}
    cfg = load_config("params/demo.yaml", {k: v for k, v in notebook.items() if k in ("run_dir", "data_root",
                                                                                   "rank", "train")})
    here = run_attempts([(cfg, {})], ResultCache(tmp_path / "here"))[0]  # nothing started: in this process
    assert "process" not in capsys.readouterr().out
    try:
        assert workers.start_workers(notebook)  # 02's first cell: starts the server, submits the notebook's setting
        there = run_attempts([(cfg, {})])[0]
        out = capsys.readouterr().out
        assert "training 1 attempt in 1 process (2 cores each" in out and "submitted by the setup cell" in out
        assert (tmp_path / "cache" / "results" / "train_attempt" / ".logs" / f"{there.result.key}.log").exists()
        assert not there.result.reused and there.result.key == here.result.key
        assert load_predictions(there.predictions) == load_predictions(here.predictions)
        scores = ("CIDEr", "CLIPScore")
        assert [there.summary[k] for k in scores] == [here.summary[k] for k in scores]
        assert there.history["steps"] == here.history["steps"] and there.trainable == here.trainable
        # the rerun: the early job finds the result stored; nothing trains
        assert workers.start_workers(notebook)
        again = run_attempts([(cfg, {})])[0]
        assert again.result.reused and "training" not in capsys.readouterr().out
        assert workers.take_early() is None and workers.server_pool() is not None  # open for the next run
    finally:
        workers.stop_servers(tmp_path / "w")
