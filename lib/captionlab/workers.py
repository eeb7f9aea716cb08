"""The warm attempt worker: a server process that has imported torch, transformers and peft once and forks a child
per training attempt, so an attempt starts in a fraction of a second instead of after 4-7 s of imports.

02's setup cell calls `start_workers(globals())` before its own imports: it starts the server if none is running
for this interpreter, captionlab source, installed packages and environment (`server_key`), and submits the notebook's
own setting at once (the server's child computes its key; a result already cached comes back at once), so a
`-p rank 8` rerun is training while the notebook is still importing. `captionlab.train.attempts.run_attempts`
then trains the other uncached attempts through the same server (`attempt_pool`), two at a time on two cores, each
exactly as it would alone (a forked child holds only the server's imports: same code, seeds and thread counts).

The server outlives the notebook: it exits after `CAPTIONLAB_WARM_WORKER` seconds (default 600) with no attempt
running, at once when its socket file is removed, and on SIGTERM (`captionlab workers stop`); a code or package
change starts another server (another key). `CAPTIONLAB_WARM_WORKER=0` turns it off: then run_attempts trains
side by side in freshly spawned processes, or a lone attempt in the notebook's own process. Its socket lives in
`CAPTIONLAB_WORKER_DIR` (default `<tmp>/captionlab-<uid>`, mode 0700: only its user can connect).

This module imports nothing heavy (the notebook's first cell imports it).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

from captionlab.utils import cpu_cores

IDLE_ENV = "CAPTIONLAB_WARM_WORKER"
DIR_ENV = "CAPTIONLAB_WORKER_DIR"
DEFAULT_IDLE = 600
# Environment variables read at import time by what the server imports: a different value needs another server.
_KEY_ENV_PREFIXES = ("CAPTIONLAB_", "HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "OPENBLAS_",
                     "CUDA_", "ACCELERATE_", "TOKENIZERS_", "PYTHON", "LD_", "GLIBC_", "MPLBACKEND")
_CONNECT_WAIT = 180.0  # seconds a client waits for a starting server (its imports) before giving up on it

_POOL: WarmPool | None = None  # this process's pool over the server, once `start_workers` opened it
_EARLY: tuple[tuple[Any, ...], Future] | None = None  # (job args, future) of the setting start_workers submitted


_JOBS: Any = None  # in the server and its children: shared memory holding how many jobs run now


def concurrent_jobs() -> int:
    """How many attempts the warm worker server runs now, seen from one of them (1 elsewhere): an attempt's share of
    the cores for side-by-side micro-batches and caption batches follows it step by step (a lone attempt's two
    micro-batches run side by side until another attempt starts beside it)."""
    return max(1, struct.unpack_from("q", _JOBS, 0)[0]) if _JOBS is not None else 1


class WorkerUnavailable(RuntimeError):
    """The warm worker server could not be reached (it failed to start or died): train elsewhere."""


# ------------------------------------------------------------------------------------------- where and which


def idle_seconds() -> int:
    """How long an idle server waits for the next attempt (`CAPTIONLAB_WARM_WORKER`; 0: no server)."""
    value = os.environ.get(IDLE_ENV, "").strip()
    try:
        return max(0, int(value)) if value else DEFAULT_IDLE
    except ValueError:
        return DEFAULT_IDLE


def server_dir() -> Path:
    """The folder of the servers' sockets, locks and logs (created 0700)."""
    path = Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / f"captionlab-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def server_key() -> str:
    """What a server's imports depend on: the interpreter, captionlab's source, the installed packages (their
    folders' modification times) and the environment variables read at import time."""
    from captionlab.resultcache import source_fingerprint

    sites = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    doc = {"python": sys.executable, "version": sys.version, "source": source_fingerprint(),
           "sites": {p: os.stat(p).st_mtime_ns for p in sites if os.path.isdir(p)},
           "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_KEY_ENV_PREFIXES)}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def socket_path(key: str | None = None) -> Path:
    """The socket of the server for `key` (default: this process's `server_key`)."""
    return server_dir() / f"{key or server_key()}.sock"


# ------------------------------------------------------------------------------------------- wire format


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj)
    sock.sendall(struct.pack("!Q", len(data)) + data)


def _recv(sock: socket.socket) -> Any:
    head = _recv_exact(sock, 8)
    return pickle.loads(_recv_exact(sock, struct.unpack("!Q", head)[0]))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


# ------------------------------------------------------------------------------------------- the server


def _warm_up() -> None:
    """The server's imports: what an attempt needs."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from transformers import CLIPVisionModel  # noqa: F401

    import captionlab.metrics.evaluate
    import captionlab.models.captioner
    import captionlab.train.attempts
    import captionlab.train.loop  # noqa: F401


def _lock(path: Path) -> int | None:
    """An exclusive lock on `path` held by the returned fd, or None when another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def serve(path: str | os.PathLike, idle: float) -> int:
    """The server's main loop (run by `start_server` in a new session): import, listen on `path`, fork a child per
    job, exit after `idle` seconds without a running child, when `path` stops being its socket, or on SIGTERM."""
    path = Path(path)
    held = _lock(path.with_suffix(".lock"))  # held for the server's lifetime (not by its children)
    if held is None:
        return 0  # another server for this key is starting or running
    os.ftruncate(held, 0)
    os.write(held, str(os.getpid()).encode())  # `_server_starting` reads it
    _warm_up()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.sock")
    tmp.unlink(missing_ok=True)
    listener.bind(str(tmp))
    os.chmod(tmp, 0o600)
    listener.listen(16)
    os.replace(tmp, path)  # clients connect from now on
    ino = os.stat(path).st_ino
    print(f"warm worker {os.getpid()} ready on {path} (idle timeout {idle:g} s)", flush=True)
    global _JOBS
    import mmap

    _JOBS = mmap.mmap(-1, 8)  # anonymous shared memory: the children read what the loop below writes
    children: set[int] = set()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    last = time.monotonic()
    while not stopping:
        for pid in list(children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                children.discard(pid)
                struct.pack_into("q", _JOBS, 0, len(children))
                last = time.monotonic()
        try:
            if os.stat(path).st_ino != ino:
                break  # replaced or removed: `captionlab workers stop`, or a cleaned-up folder
        except FileNotFoundError:
            break
        if not children and time.monotonic() - last > idle:
            break
        try:
            ready, _, _ = select.select([listener], [], [], 0.5)
        except InterruptedError:
            continue
        if not ready:
            continue
        conn, _ = listener.accept()
        conn.settimeout(5.0)  # a client that connects and sends nothing does not hold the server up
        try:
            request = _recv(conn)
        except Exception:  # noqa: BLE001 - a client that went away: nothing to run
            conn.close()
            continue
        if request.get("op") != "run":
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:  # the child runs the job and never returns
            listener.close()
            os.close(held)
            conn.settimeout(None)
            _child(conn, request)
        conn.close()
        children.add(pid)
        struct.pack_into("q", _JOBS, 0, len(children))
        last = time.monotonic()
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        if os.stat(path).st_ino == ino:
            path.unlink()
    except FileNotFoundError:
        pass
    return 0


def _child(conn: socket.socket, request: dict[str, Any]) -> None:
    """A forked job: the client's environment, folder, cores and priority; the target's result or error back over
    `conn`; ends as soon as the client hangs up (an interrupted notebook cancels its attempts)."""
    code = 0
    try:
        def watch() -> None:
            try:
                conn.recv(1)  # the client sends nothing more: any return means it hung up
            except OSError:
                pass
            os._exit(75)

        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.environ.clear()
            os.environ.update(request["env"])
            os.chdir(request["cwd"])
            if request["affinity"] and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, request["affinity"])
            try:
                os.setpriority(os.PRIO_PROCESS, 0, request["nice"])
            except OSError:
                pass
            threading.Thread(target=watch, daemon=True).start()
            import importlib

            module, name = request["target"].split(":")
            fn: Callable[..., Any] = getattr(importlib.import_module(module), name)
            reply = {"ok": fn(*request["args"])}
        except BaseException as exc:  # noqa: BLE001 - reported to the client, which re-raises it
            import traceback

            reply = {"error": exc, "traceback": traceback.format_exc()}
            try:
                pickle.dumps(exc)
            except Exception:  # noqa: BLE001
                reply["error"] = RuntimeError(f"{type(exc).__name__}: {exc}")
        _send(conn, reply)
    except BaseException:  # noqa: BLE001 - the child must never return into the server's loop
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


_STARTED: dict[Path, subprocess.Popen] = {}  # servers this process started
_SERVE = "import sys; from captionlab.workers import serve; sys.exit(serve(sys.argv[1], float(sys.argv[2])))"


def start_server(key: str | None = None) -> Path:
    """Start the server for `key` (default: this process's) unless one is running or starting; returns its socket.

    It runs in a session of its own (a notebook's interrupt does not reach it), logging to `<key>.log` beside
    its socket."""
    path = socket_path(key)
    if _alive(path) or _server_starting(path):
        return path
    with open(path.with_suffix(".log"), "ab") as log:
        _STARTED[path] = subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(path), str(idle_seconds())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            cwd=str(server_dir()))
    return path


def _alive(path: Path) -> bool:
    """Whether a server answers on `path`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            _send(s, {"op": "ping"})
        return True
    except OSError:
        return False


def _server_pid(path: Path) -> int | None:
    """The pid `serve` wrote into the lock file of `path`, while that process is a server for `path`."""
    try:
        pid = int(path.with_suffix(".lock").read_text() or 0)
        return pid if pid > 0 and str(path) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace") else None
    except (OSError, ValueError):
        return None


def _server_starting(path: Path) -> bool:
    """Whether a server for `path` is on its way: one this process started, or the pid in its lock file, runs."""
    started = _STARTED.get(path)
    return (started is not None and started.poll() is None) or _server_pid(path) is not None


def running_servers(folder: str | os.PathLike | None = None) -> list[tuple[int, Path]]:
    """(pid, socket) of each server in `folder` (default `server_dir()`) that answers."""
    folder = Path(folder) if folder else server_dir()
    found = []
    for sock in sorted(folder.glob("*.sock")):
        pid = _server_pid(sock)
        if pid is not None and _alive(sock):
            found.append((pid, sock))
    return found


def stop_servers(folder: str | os.PathLike | None = None) -> list[int]:
    """Stop every server with a socket in `folder` (default `server_dir()`) and the attempts it is running;
    returns their pids. (`captionlab workers stop`.)"""
    folder = Path(folder) if folder else server_dir()
    stopped = []
    for pid, sock in running_servers(folder):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in stopped:  # wait (briefly) until they are gone
        for _ in range(100):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:  # started by this process: reaped now
                    break
            except ChildProcessError:
                pass
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    return stopped


# ------------------------------------------------------------------------------------------- the client


class WarmPool(Executor):
    """`concurrent.futures.Executor` over a warm worker server: `submit(target, *args)` runs `target`
    ("module:function", picklable args) in a forked child, at most `max_workers` at once; `shutdown(
    cancel_futures=True)` (or leaving a `with` block on an exception) ends the running children."""

    def __init__(self, path: Path, max_workers: int):
        self.path = path
        self.max_workers = max_workers
        self._slots = threading.Semaphore(max_workers)
        self._lock = threading.Lock()
        self._conns: dict[Future, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:  # type: ignore[override]
        """Run `fn` ("module:function") with `args` in a child of the server; a future of its return value."""
        if kwargs:
            raise TypeError("WarmPool.submit takes positional arguments only")
        target = fn if isinstance(fn, str) else f"{fn.__module__}:{fn.__qualname__}"
        future: Future = Future()
        thread = threading.Thread(target=self._run, args=(future, target, args), daemon=True)
        self._threads.append(thread)
        thread.start()
        return future

    def _run(self, future: Future, target: str, args: tuple[Any, ...]) -> None:
        with self._slots:
            if self._closed or not future.set_running_or_notify_cancel():
                return
            try:
                conn = self._connect()
                with self._lock:
                    self._conns[future] = conn
                try:
                    _send(conn, {"op": "run", "target": target, "args": args, "env": dict(os.environ),
                                 "cwd": os.getcwd(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                                 "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else []})
                    reply = _recv(conn)
                finally:
                    with self._lock:
                        self._conns.pop(future, None)
                    conn.close()
            except (OSError, EOFError) as exc:
                future.set_exception(WorkerUnavailable(f"warm worker {self.path}: {exc}"))
                return
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)
                return
        if "ok" in reply:
            future.set_result(reply["ok"])
        else:
            error = reply["error"]
            error.add_note(f"in the warm worker's child:\n{reply.get('traceback', '')}")
            future.set_exception(error)

    def _connect(self) -> socket.socket:
        """A connection to the server, waiting while it starts (its imports); WorkerUnavailable if it is gone."""
        deadline = time.monotonic() + _CONNECT_WAIT
        restarted = False
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                return s
            except OSError as exc:
                s.close()
                if not _server_starting(self.path):
                    if restarted or self._closed or time.monotonic() > deadline:
                        raise WorkerUnavailable(f"no warm worker on {self.path} ({exc})") from None
                    start_server(self.path.stem)  # it exited (idle timeout, stopped): once more
                    restarted = True
                elif self._closed or time.monotonic() > deadline:
                    raise WorkerUnavailable(f"no warm worker on {self.path} ({exc})") from None
            time.sleep(0.05)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking jobs; `cancel_futures`: hang up on the running children (they exit); `wait`: for them."""
        self._closed = self._closed or cancel_futures
        if cancel_futures:
            for future in list(self._conns):
                self.hang_up(future)
        if wait:
            for thread in self._threads:
                thread.join()

    def hang_up(self, future: Future) -> None:
        """End the child running `future`'s job (it exits when its client hangs up); the future fails."""
        future.cancel()
        with self._lock:
            conn = self._conns.get(future)
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> bool:
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def start_workers(parameters: Mapping[str, Any] | str | os.PathLike | None = None,
                  quick: bool | None = None) -> bool:
    """02's first call: start the warm worker server (if none runs for this key) and submit the notebook's own
    setting to it, where attempts train in processes (2+ cores, not quick mode, the server not turned off).

    `parameters`: the notebook's namespace (`globals()`: params_file and the overrides, as `report.start` reads
    them) or a params file. Returns whether attempts will train in the server. Nothing is submitted when the data or
    a model file is missing (the notebook's setup builds them first) or on a GPU (attempts train in the notebook)."""
    global _POOL, _EARLY
    from captionlab.params import load_config, notebook_overrides

    if not isinstance(parameters, Mapping):
        parameters = {"params_file": parameters, "quick": quick}
    params_file, given = notebook_overrides(parameters)
    try:
        cfg = load_config(params_file, given)
    except Exception:  # noqa: BLE001 - report.start names what is wrong with the params file or a parameter
        return False
    if cfg.quick or cpu_cores() < 2 or idle_seconds() <= 0:
        return False
    path = start_server()  # (again, if it has exited since: a kernel outlives the idle timeout)
    if _POOL is None or _POOL.path != path:
        _POOL = WarmPool(path, min(2, cpu_cores()))
    if _EARLY is None and _inputs_present(cfg):
        from captionlab.resultcache import ResultCache

        args = (cfg, {}, str(ResultCache().root), notebook_torch_threads(cfg.world), None, None, True)
        _EARLY = (args, _POOL.submit("captionlab.train.attempts:_attempt_worker", args))
    return True


def _inputs_present(cfg: Any) -> bool:
    """Whether an attempt of `cfg` finds its data and model files (else the notebook builds them first)."""
    from captionlab.models.specs import parse_spec

    p2 = Path(cfg.data_root) / "p2_data"
    paths = [p2 / "train.json", p2 / "val.json"]
    for spec in (cfg.encoder, cfg.decoder, cfg.clip_model):
        local = parse_spec(spec).local_path if spec else None
        if local is not None:
            paths.append(local)
    return all(p.exists() for p in paths)


def notebook_torch_threads(world: str) -> int | None:
    """Torch threads of a notebook's attempts: one on the demo world (its models are tiny:
    `CAPTIONLAB_TORCH_THREADS` overrides), else None (torch's default, which the notebook keeps)."""
    if world == "demo":
        return int(os.environ.get("CAPTIONLAB_TORCH_THREADS", "1"))
    return None


def server_pool() -> WarmPool | None:
    """This process's pool over the warm worker server (None until `start_workers` opened it): it stays open for
    the process's lifetime, so a notebook's training cell run again trains there too."""
    return _POOL


def take_early() -> tuple[tuple[Any, ...], Future] | None:
    """(job args, future) of the setting `start_workers` submitted, now the caller's (None if there is none)."""
    global _EARLY
    taken, _EARLY = _EARLY, None
    return taken


def spawn_pool(workers: int) -> Any:
    """A pool of `workers` spawned interpreters (no inherited torch thread pools or locks): the fallback when no
    warm worker server is used."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def stop_resource_tracker() -> None:
    """Stop multiprocessing's resource-tracker process once no worker is left: a notebook kernel that still has it
    takes 2.4 s longer to shut down (papermill waits for it). The next pool starts a new one."""
    import multiprocessing

    if multiprocessing.active_children():
        return
    try:
        from multiprocessing import resource_tracker

        resource_tracker._resource_tracker._stop()
    except Exception:  # noqa: BLE001, S110 - a private helper; without it only the shutdown is slower
        pass
