"""A notebook run in a kernel: cells one after another, outputs written back as they come.

A run lives in the tether's task group, so a caller's bounded wait can end while the run
goes on: the caller gets a handle (``run_id``) and follows it with ``wait``. Outputs are
written back into the file at most once a second (and at the end), each write a fresh
read-modify-write that puts outputs on the cells by id, so what a person changed in
between is kept.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from ...errors import TetherError
from ..kernel_ws import KernelSocket
from .document import DOC_LIMITS, ImageSaver, cell_view
from .outputs import CellResult, execute_cell

#: how often outputs are written back into the notebook during a run (and at its end)
WRITE_EVERY_S = 1.0

#: what a write-back is given: cell id -> (execution_count, outputs)
Updates = dict[str, tuple[int | None, list[dict[str, Any]]]]


@dataclass
class CellRecord:
    """One cell of a run: where it was, what it ran and how it went."""

    id: str
    index: int
    code: str
    status: str = "queued"  # queued, running, ok, error, aborted, timeout, skipped
    execution_count: int | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float | None = None

    def view(self, mode: str, images: ImageSaver | None) -> dict[str, Any]:
        shown = cell_view({"cell_type": "code", "id": self.id, "source": self.code,
                           "execution_count": self.execution_count, "outputs": self.outputs},
                          self.index, mode, images)
        shown.pop("source", None)  # the caller has it; the outputs are the news
        shown.pop("cell_type", None)
        shown["status"] = self.status
        if self.duration_s is not None:
            shown["duration_s"] = round(self.duration_s, 3)
        return shown


@dataclass
class NotebookRun:
    """A run's state; ``done`` is set when it has ended, however it ended."""

    run_id: str
    path: str
    kernel_id: str
    kernel: str  # how the kernel was chosen: session, notebook, work or given
    cells: list[CellRecord]
    write_back: bool
    stop_on_error: bool = True
    status: str = "running"  # running, ok, error, cancelled, failed
    problem: str | None = None
    revision: str | None = None
    write_error: str | None = None
    missing: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope | None = None

    @property
    def finished(self) -> int:
        return sum(1 for c in self.cells if c.status not in ("queued", "running"))

    def current(self) -> CellRecord | None:
        return next((c for c in self.cells if c.status == "running"), None)

    def snapshot(self, mode: str, images: ImageSaver | None) -> dict[str, Any]:
        current = self.current()
        shown = [c for c in self.cells if c.status not in ("queued", "skipped")]
        result: dict[str, Any] = {
            "run_id": self.run_id, "path": self.path, "status": self.status,
            "kernel_id": self.kernel_id, "kernel": self.kernel,
            "cells_done": self.finished, "cells_total": len(self.cells),
            "running_cell": current.id if current else None,
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "cells": [c.view(mode, images) for c in shown[-DOC_LIMITS.max_view_cells:]],
            "skipped": [c.id for c in self.cells if c.status == "skipped"][:200],
            "written": self.write_back and self.write_error is None,
            "revision": self.revision,
        }
        for key in ("problem", "write_error"):
            if getattr(self, key):
                result[key] = getattr(self, key)
        if self.missing:
            result["missing_cells"] = self.missing[:200]
        return result


@dataclass
class RunHooks:
    """What a run needs of the tether: its kernel socket and lock, an interrupt, a writer."""

    socket: Callable[[], Awaitable[KernelSocket]]
    lock: anyio.Lock
    interrupt: Callable[[], Awaitable[None]]
    #: writes outputs back; returns (new revision, ids of cells no longer in the file)
    write: Callable[[Updates], Awaitable[tuple[str, list[str]]]]


async def drive(run: NotebookRun, hooks: RunHooks) -> None:
    """Run the cells in order; never raises (the run's state says how it ended)."""
    pending: Updates = {}

    async def flush() -> None:
        if not run.write_back or not pending:
            return
        batch = dict(pending)
        try:
            run.revision, missing = await hooks.write(batch)
            run.missing.extend(m for m in missing if m not in run.missing)
            run.write_error = None
        except Exception as exc:  # a run lives in the tether's task group: anything raised
            # here would end the tether, and every call on it, with the run
            why = exc if isinstance(exc, TetherError) else f"{type(exc).__name__}: {exc}"
            run.write_error = f"outputs not written back: {why}"
            return
        for key in batch:
            if pending.get(key) is batch[key]:
                del pending[key]

    try:
        with anyio.CancelScope() as scope:
            run.scope = scope
            async with hooks.lock:
                sock = await hooks.socket()
                last_write = time.monotonic()
                stop = False
                for record in run.cells:
                    if stop:
                        record.status = "skipped"
                        continue
                    record.status = "running"
                    result: CellResult = await execute_cell(sock, record.code,
                                                            interrupt=hooks.interrupt)
                    record.status, record.duration_s = result.status, result.duration_s
                    record.execution_count, record.outputs = result.execution_count, result.outputs
                    pending[record.id] = (record.execution_count, record.outputs)
                    stop = run.stop_on_error and record.status != "ok"
                    if time.monotonic() - last_write >= WRITE_EVERY_S:
                        await flush()
                        last_write = time.monotonic()
            await flush()
        if scope.cancelled_caught:
            run.status = "cancelled"
        else:
            bad = [c for c in run.cells if c.status not in ("ok", "skipped")]
            run.status = "error" if bad else "ok"
    except Exception as exc:  # the run's own failure: reported by its state, never raised
        run.status, run.problem = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        for record in run.cells:
            if record.status in ("queued", "running"):
                record.status = "skipped" if record.status == "queued" else "aborted"
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            await flush()  # what finished before a cancel or a failure still lands in the file
        run.done.set()
