"""Peak memory of a notebook run: the resident set of its Jupyter kernel and whatever that starts (by default: all of
this process's children), sampled in a background thread while the notebook executes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType


class PeakMemory:
    """`with PeakMemory() as mem: ...` then `mem.peak_mb`: the largest summed RSS of all child processes seen."""

    def __init__(self, interval: float = 0.25, roots: Callable[[], list[int]] | None = None) -> None:
        """`roots()`, if given, names the processes to measure (each with its descendants); by default every
        child of this process (right when one notebook runs at a time)."""
        self.interval = interval
        self.roots = roots
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_mb(self) -> float:
        """Peak resident memory in MB (0 when nothing was sampled)."""
        return round(self.peak_bytes / 2**20, 1)

    def sample(self) -> int:
        """The summed RSS of every descendant process right now (and update the peak)."""
        import psutil

        total = 0
        for child in self._processes(psutil):
            try:
                total += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _processes(self, psutil) -> list:
        if self.roots is None:
            return psutil.Process().children(recursive=True)
        procs = []
        for pid in self.roots():
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return procs

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
