"""A tool call's progress as MCP progress notifications: ``activity()`` and ``Activity``."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from mcp.server.mcpserver import Context

from ..formatting import MIB

logger = logging.getLogger("jupyter_tether.mcp")


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


class Activity:
    """Progress of one tool call, sent as MCP progress notifications by ``activity()``.

    Controllers call ``transfer(done, total)`` (sync callbacks); phases of a multi-step call
    use ``phase(i, n, label)``. With neither, a heartbeat reports elapsed time, so clients
    that extend their timeout on progress keep waiting for long calls.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.progress: float | None = None
        self.total: float | None = None
        self.message: str | None = None
        self._phase_base: float | None = None

    def transfer(self, done: int, total: int) -> None:
        if self._phase_base is not None:
            fraction = (done / total) if total else 0.0
            self.progress = self._phase_base + min(1.0, fraction) * 0.999
        else:
            self.progress, self.total = float(done), float(total) if total else None
        self.message = f"{self.label}: {mib(done)} of {mib(total)} MiB"

    def phase(self, index: int, count: int, label: str) -> None:
        self.label = label
        self._phase_base = float(index)
        self.progress, self.total = float(index), float(count)
        self.message = label

    def snapshot(self) -> tuple[float, float | None, str]:
        elapsed = time.monotonic() - self.started
        if self.progress is None:
            return elapsed, None, f"{self.label}: {elapsed:.0f}s"
        return self.progress, self.total, f"{self.message} ({elapsed:.0f}s)"


@asynccontextmanager
async def activity(ctx: Context | None, label: str,
                   interval: float = 1.0) -> AsyncIterator[Activity]:
    """Report an Activity every ``interval`` seconds while the block runs."""
    act = Activity(label)
    if ctx is None:
        yield act
        return
    last = -1.0

    async def send() -> None:
        nonlocal last
        progress, total, message = act.snapshot()
        # The protocol wants strictly increasing progress values.
        progress = max(progress, last + 1e-3)
        last = progress
        try:
            await ctx.report_progress(progress, total, message)
        except Exception as exc:  # a gone client must not fail the work itself
            logger.debug("progress notification failed: %s", exc)

    async def loop() -> None:
        while True:
            await anyio.sleep(interval)
            await send()

    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(loop)
        try:
            yield act
        except Exception as exc:
            # Raised outside the task group, or anyio would wrap it in an ExceptionGroup.
            failure = exc
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
