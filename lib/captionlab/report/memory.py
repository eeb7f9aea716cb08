"""Peak memory of a notebook run: the resident set of this process's children (the Jupyter kernel and whatever
it starts), sampled in a background thread while the notebook executes."""

from __future__ import annotations

import threading
from types import TracebackType


class PeakMemory:
    """`with PeakMemory() as mem: ...` then `mem.peak_mb`: the largest summed RSS of all child processes seen."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
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
        for child in psutil.Process().children(recursive=True):
            try:
                total += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        return total

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
