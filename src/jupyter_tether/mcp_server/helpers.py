"""What every tool shares: error translation, output caps, bounded waits, progress."""

from __future__ import annotations

import codecs
import functools
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError

from ..errors import (
    AuthError,
    ConfigError,
    ConnectionLost,
    InvalidArgument,
    JobError,
    KernelError,
    NotFound,
    RemoteError,
    TetherError,
    TetherTimeout,
    TransferError,
)

logger = logging.getLogger("jupyter_tether.mcp")

P = ParamSpec("P")
R = TypeVar("R")

MIB = 1024 * 1024


class BoundExceeded(Exception):
    """A tool's own ``timeout_s`` ran out (not the remote work's timeout)."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(what)
        self.what = what
        self.seconds = seconds


@asynccontextmanager
async def bounded(seconds: float, what: str) -> AsyncIterator[None]:
    """Give up after ``seconds`` with a message that says the remote side may still go on.

    Only this bound's own deadline becomes ``BoundExceeded``: a ``TetherTimeout`` from inside
    (the supervisor link's own wait ran out) goes through unchanged, to get its own hint.
    """
    with anyio.move_on_after(seconds) as scope:
        try:
            yield
        except TimeoutError as exc:
            # A plain TimeoutError at our deadline is an inner fail_after racing this bound.
            if isinstance(exc, TetherTimeout) or anyio.current_time() < scope.deadline:
                raise
            raise BoundExceeded(what, seconds) from None
    if scope.cancelled_caught:
        raise BoundExceeded(what, seconds)


def _hint(exc: BaseException, not_found: str) -> str:
    if isinstance(exc, BoundExceeded):
        return (f"{exc.what} did not finish within timeout_s={exc.seconds:g}s. Work already "
                "sent to the remote may still be going on; raise timeout_s, or check with "
                "jupyter_status / jupyter_job_list before retrying")
    if isinstance(exc, TetherTimeout | TimeoutError):
        return f"{exc}. The remote work may still be running; retry with a larger timeout_s"
    if isinstance(exc, AuthError):
        return str(exc)
    if isinstance(exc, ConnectionLost):
        return (f"{exc}. Check the server is up (jupyter_ping) and that the URL and token are "
                "current, then retry")
    if isinstance(exc, NotFound):
        return f"{exc.message}. {not_found}"
    if isinstance(exc, InvalidArgument):
        return f"invalid argument: {exc.message}"
    if isinstance(exc, RemoteError):
        return f"the remote supervisor refused: {exc.message} [{exc.code}]"
    if isinstance(exc, ConfigError | KernelError | JobError | TransferError | TetherError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"local file not found: {exc.filename or exc}"
    if isinstance(exc, IsADirectoryError | NotADirectoryError | PermissionError):
        return f"local file error: {exc}"
    if isinstance(exc, ValueError):
        return f"invalid argument: {exc}"
    return f"internal error ({type(exc).__name__}): {exc}; this is a bug in jupyter-tether"


def tool_errors(scrub: Callable[[str], str], not_found: str = "Check the name or id."
                ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Turn every failure of a tool into a ToolError whose text says what to try (no secrets).

    ``not_found`` is what to suggest when something the tool named does not exist.
    """

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(*args, **kwargs)
            except ToolError as exc:
                raise ToolError(scrub(str(exc))) from None
            except Exception as exc:
                message = scrub(_hint(exc, not_found))
                if not isinstance(exc, TetherError | OSError | ValueError | TimeoutError
                                  | BoundExceeded):
                    # Unexpected: keep the traceback for the operator, scrubbed like the rest.
                    logger.error("%s crashed: %s", fn.__name__,
                                 scrub("".join(traceback.format_exception(exc))))
                raise ToolError(message) from None

        return wrapper

    return decorate


# --- output caps ------------------------------------------------------------------------------


def cap_head(text: str, limit: int, where: str) -> tuple[str, bool]:
    """Keep the first ``limit`` chars, ending with a marker that says where the rest is."""
    if limit <= 0 or len(text) <= limit:
        return text, False
    return (text[:limit] + f"\n[... truncated: showed {limit} of {len(text)} chars; "
            f"the rest is in {where}]"), True


def cap_tail(text: str, limit: int, where: str) -> tuple[str, bool]:
    """Keep the last ``limit`` chars, starting with a marker that says where the rest is."""
    if limit <= 0 or len(text) <= limit:
        return text, False
    return (f"[... truncated: {len(text) - limit} earlier chars cut; the whole text is in "
            f"{where}]\n" + text[-limit:]), True


def cap_value(value: Any, max_chars: int = 20_000, max_items: int = 200) -> Any:
    """Cap every string and list inside a JSON-like value (for results of unknown size)."""
    if isinstance(value, str):
        return cap_tail(value, max_chars, "the remote (output cut to fit)")[0]
    if isinstance(value, dict):
        return {k: cap_value(v, max_chars, max_items) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [cap_value(v, max_chars, max_items) for v in value[:max_items]]
        if len(value) > max_items:
            items.append(f"[... {len(value) - max_items} more items not shown]")
        return items
    return value


def utf8_prefix(data: bytes, final: bool) -> int:
    """How many leading bytes of ``data`` end on a UTF-8 character boundary."""
    if final:
        return len(data)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    pending = decoder.getstate()[0]
    return len(data) - len(pending)


# --- progress ---------------------------------------------------------------------------------


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
