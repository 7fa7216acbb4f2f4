"""Every tool failure as a ``ToolError`` whose text says what to try (``tool_errors``)."""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

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
from .limits import BoundExceeded

logger = logging.getLogger("jupyter_tether.mcp")

P = ParamSpec("P")
R = TypeVar("R")


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
