"""One line on stderr per tool call: which tool, on which target, how long, ok or the error.

``ToolCallLog`` is a server middleware (it sees every ``tools/call`` before and after the
tool runs), so the tools themselves know nothing of it. ``serve()`` routes its logger to
stderr: ``-v`` adds each call's arguments (credentials scrubbed, long values cut), ``-q``
silences it. The arguments never reach the log without ``-v``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp_types import CallToolResult

from ..credentials import redact

LOGGER_NAME = "jupyter_tether.mcp.calls"
logger = logging.getLogger(LOGGER_NAME)

#: Argument names whose values are credentials wherever they appear (env vars included).
SECRET_NAME = re.compile(r"token|secret|passw|api[_-]?key|auth|credential|private[_-]?key|"
                         r"cookie|session[_-]?id", re.IGNORECASE)
MAX_VALUE_CHARS = 200
MAX_ERROR_CHARS = 300


class TargetNames(Protocol):
    """What the log asks of the pool: where a call goes (see ``TetherPool``)."""

    def target_label(self, server_url: str | None, job_id: str | None) -> str: ...

    def scrub(self, text: str) -> str: ...


def scrub_arguments(value: Any, scrub: Callable[[str], str], key: str = "") -> Any:
    """``value`` fit for a log line: credentials (by name, by known value, in URLs) as
    ``***``, long strings cut, base64 payloads only counted."""
    if key and SECRET_NAME.search(key):
        return "***"
    if isinstance(value, Mapping):
        return {str(k): scrub_arguments(v, scrub, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_arguments(v, scrub) for v in value]
    if isinstance(value, str):
        if key.endswith("base64"):
            return f"<{len(value)} base64 chars>"
        text = scrub(redact(value))
        if len(text) > MAX_VALUE_CHARS:
            text = text[:MAX_VALUE_CHARS] + f"...<{len(value)} chars>"
        return text
    return value


def _error_text(result: HandlerResult) -> str | None:
    """The error a tool call ended with (None when it succeeded)."""
    if isinstance(result, CallToolResult):
        if not result.is_error:
            return None
        texts = [getattr(c, "text", "") for c in result.content]
    elif isinstance(result, dict) and result.get("isError") is True:
        texts = [str(c.get("text", "")) for c in result.get("content") or []
                 if isinstance(c, dict)]
    else:
        return None
    text = " ".join(" ".join(texts).split()) or "error"
    text = re.sub(r"^Error executing tool \S+: ", "", text)  # the SDK's prefix: the tool is named
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


class ToolCallLog(ServerMiddleware[Any]):
    """Logs ``HH:MM:SS tool target=T 0.12s ok`` (or ``error: ...``) per tool call."""

    def __init__(self, names: Callable[[], TargetNames | None], *,
                 with_arguments: bool = False) -> None:
        self._names = names  # the pool, once the server runs (None before)
        self.with_arguments = with_arguments

    async def __call__(self, ctx: ServerRequestContext[Any, Any],
                       call_next: CallNext) -> HandlerResult:
        if ctx.method != "tools/call" or not logger.isEnabledFor(logging.INFO):
            return await call_next(ctx)
        params = ctx.params or {}
        tool = str(params.get("name") or "?")
        arguments = params.get("arguments")
        arguments = arguments if isinstance(arguments, Mapping) else {}
        started = time.monotonic()
        outcome = "error: the call raised (see the error above)"
        try:
            result = await call_next(ctx)
            error = _error_text(result)
            outcome = "ok" if error is None else f"error: {error}"
            return result
        finally:
            self._log(tool, arguments, time.monotonic() - started, outcome)

    def _log(self, tool: str, arguments: Mapping[str, Any], seconds: float,
             outcome: str) -> None:
        names = self._names()
        scrub: Callable[[str], str] = names.scrub if names is not None else redact
        server_url = arguments.get("server_url")
        job_id = arguments.get("job_id")
        try:
            target = names.target_label(
                server_url if isinstance(server_url, str) else None,
                job_id if isinstance(job_id, str) else None) if names is not None else "-"
        except Exception:  # a refused server_url: the call's own error says why
            target = redact(str(server_url))
        line = f"{tool} target={scrub(target)} {seconds:.2f}s {scrub(outcome)}"
        if self.with_arguments:
            shown = scrub_arguments(dict(arguments), scrub)
            line += " args=" + json.dumps(shown, ensure_ascii=False, default=str)
        logger.info("%s", line)


def route_to_stderr(verbosity: int) -> None:
    """Send the call log to stderr: 0 nothing, 1 one line per call, 2 with arguments (the
    middleware's ``with_arguments`` decides that part)."""
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbosity > 0 else logging.WARNING)
