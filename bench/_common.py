"""Helpers shared by the benchmark scripts: a local server, timing summaries, RSS sampling."""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jupyter_tether.controller.embedded import LocalJupyterServer


@contextmanager
def local_server(root: Path | None = None) -> Iterator[LocalJupyterServer]:
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp, \
            LocalJupyterServer(root or Path(tmp)) as server:
        yield server


def summary(samples_s: list[float]) -> dict[str, float]:
    """Median, p99 and mean of a list of durations, in milliseconds."""
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"median_ms": statistics.median(ordered) * 1000, "p99_ms": p99 * 1000,
            "mean_ms": statistics.fmean(ordered) * 1000, "n": float(len(ordered))}


def fmt(name: str, stats: dict[str, float]) -> str:
    return (f"{name:<44} median {stats['median_ms']:8.2f} ms   p99 {stats['p99_ms']:8.2f} ms"
            f"   (n={int(stats['n'])})")


class PeakRss:
    """Samples a process's RSS every few ms in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self._interval = interval
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._process.memory_info().rss)
            except Exception:
                return
            time.sleep(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20
