"""Running one cell in a kernel and recording what it sends as nbformat outputs, for the file.

Unlike ``execute`` (whose result is shaped for a program to read, images saved to local
files), these outputs go into the notebook, where JupyterLab shows them: images stay inline,
text stays whole up to ``FileLimits``, ``clear_output`` and ``update_display_data`` apply as
in a front end. Everything is still bounded: a cell printing for hours must not grow the
notebook (or the controller's memory) without end.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConnectionLost, KernelError
from ..execute import cap_text
from ..kernel_requests import await_reply, drain_after_interrupt
from ..kernel_ws import KernelSocket
from .document import DOC_LIMITS, too_deep

_JSON_MIME = re.compile(r"^application/(.*\+)?json$")


@dataclass(frozen=True)
class FileLimits:
    """What one cell's outputs may hold in the notebook file."""

    max_outputs: int = 500
    #: one stream output's text (its tail is kept, with a marker)
    max_stream_chars: int = 1_000_000
    #: one MIME value (an image's base64, an HTML table); bigger ones are left out
    max_value_chars: int = 16 * 1024 * 1024
    #: all outputs of one cell
    max_cell_chars: int = 48 * 1024 * 1024


FILE_LIMITS = FileLimits()


#: nesting one output's metadata or JSON value may have: the notebook holds it 5 levels down
#: and must stay within ``DocLimits.max_depth`` (deeper, the write-back's writer recursed out)
_MAX_DEPTH = DOC_LIMITS.max_depth - 10


def _json_size(value: Any) -> int:
    try:
        return len(json.dumps(value, separators=(",", ":"), default=str))
    except (TypeError, ValueError, RecursionError):
        return 1 << 62


def _flat(value: Any) -> str:
    """A non-string value of a text MIME type as one string (its JSON when it has one)."""
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError):
        return f"[... a {type(value).__name__} value that is not JSON ...]"


class OutputRecorder:
    """Turns iopub messages of one execution into a cell's ``outputs`` list."""

    def __init__(self, limits: FileLimits = FILE_LIMITS) -> None:
        self.limits = limits
        self.outputs: list[dict[str, Any]] = []
        self.error: dict[str, Any] | None = None
        self.execution_count: int | None = None
        self._size = 0
        self._dropped = 0
        self._clear_on_next = False
        self._displays: dict[str, list[dict[str, Any]]] = {}

    def _bundle(self, data: Any) -> tuple[dict[str, Any], int]:
        bundle: dict[str, Any] = {}
        size = 0
        left_out = 0
        if not isinstance(data, dict):
            return {"text/plain": ""}, 0
        for mime, value in list(data.items())[:32]:
            mime = str(mime)[:200]
            if _JSON_MIME.match(mime):
                held = _json_size(value) if not too_deep(value, _MAX_DEPTH) else 1 << 62
            else:
                if not isinstance(value, str):
                    value = "".join(value) if isinstance(value, list) and all(
                        isinstance(v, str) for v in value) else _flat(value)
                held = len(value)
            if held > self.limits.max_value_chars:
                left_out += held
                continue
            bundle[mime] = value
            size += held
        if left_out and "text/plain" not in bundle:
            bundle["text/plain"] = f"[... an output of {left_out:,} chars was not kept ...]"
        return bundle, size

    def _add(self, output: dict[str, Any], size: int) -> bool:
        if self._clear_on_next:
            self._clear()
        if len(self.outputs) >= self.limits.max_outputs or \
                self._size + size > self.limits.max_cell_chars:
            self._dropped += 1
            return False
        self.outputs.append(output)
        self._size += size
        return True

    def _clear(self) -> None:
        self.outputs = []
        self._displays = {}
        self._size = 0
        self._clear_on_next = False

    def feed(self, msg_type: str, content: dict[str, Any]) -> None:
        if msg_type == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            text = content.get("text")
            text = text if isinstance(text, str) else str(text)
            if self._clear_on_next:
                self._clear()
            last = self.outputs[-1] if self.outputs else None
            if last is not None and last.get("output_type") == "stream" and last["name"] == name:
                before = len(last["text"])
                last["text"] = cap_text(last["text"] + text, self.limits.max_stream_chars)[0]
                self._size += len(last["text"]) - before
            else:
                self._add({"output_type": "stream", "name": name,
                           "text": cap_text(text, self.limits.max_stream_chars)[0]}, len(text))
        elif msg_type in ("display_data", "execute_result"):
            bundle, size = self._bundle(content.get("data"))
            metadata = content.get("metadata")
            output: dict[str, Any] = {"output_type": msg_type, "data": bundle,
                                      "metadata": metadata if isinstance(metadata, dict) and
                                      not too_deep(metadata, _MAX_DEPTH) and
                                      _json_size(metadata) < 100_000 else {}}
            if msg_type == "execute_result":
                count = content.get("execution_count")
                output["execution_count"] = count if isinstance(count, int) else None
            if self._add(output, size):
                transient = content.get("transient")
                display_id = transient.get("display_id") if isinstance(transient, dict) else None
                if isinstance(display_id, str):
                    self._displays.setdefault(display_id, []).append(output)
        elif msg_type == "update_display_data":
            transient = content.get("transient")
            display_id = transient.get("display_id") if isinstance(transient, dict) else None
            bundle, _ = self._bundle(content.get("data"))
            for output in self._displays.get(str(display_id), []):
                output["data"] = bundle
        elif msg_type == "error":
            traceback = content.get("traceback")
            lines = [str(line)[:100_000] for line in traceback[-200:]] \
                if isinstance(traceback, list) else []
            self.error = {"output_type": "error", "ename": str(content.get("ename", ""))[:1000],
                          "evalue": str(content.get("evalue", ""))[:100_000], "traceback": lines}
            self._add(self.error, sum(len(line) for line in lines))
        elif msg_type == "clear_output":
            if content.get("wait"):
                self._clear_on_next = True
            else:
                self._clear()

    def result(self) -> list[dict[str, Any]]:
        outputs = list(self.outputs)
        if self._dropped:
            outputs.append({"output_type": "stream", "name": "stderr",
                            "text": f"[... {self._dropped:,} more outputs not kept (jupyter-"
                                    "tether's per-cell limit) ...]\n"})
        return outputs


@dataclass
class CellResult:
    """One cell's run: its status ("ok", "error" or "aborted"), count and outputs."""

    status: str
    execution_count: int | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    duration_s: float = 0.0


async def execute_cell(sock: KernelSocket, code: str, *,
                       interrupt: Callable[[], Awaitable[None]] | None = None,
                       timeout: float | None = None,
                       limits: FileLimits = FILE_LIMITS) -> CellResult:
    """Run ``code`` as a notebook cell; wait for its reply and its outputs (idle).

    No timeout by default: a notebook cell runs as long as it needs (the caller bounds its
    own wait). With ``timeout`` the kernel is interrupted when it passes.
    """
    msg = sock.build("execute_request", {
        "code": code, "silent": False, "store_history": True, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": True})
    msg_id = msg["header"]["msg_id"]
    recorder = OutputRecorder(limits)
    started = time.monotonic()
    replies = sock.expect(msg_id)
    try:
        await sock.send(msg)
        reply, timed_out = await await_reply(replies, recorder.feed, timeout)
        if reply is None and timed_out and interrupt is not None:
            await interrupt()
            reply = await drain_after_interrupt(replies, recorder.feed, 10)
        if reply is None:
            if sock.limit_error is not None:
                raise sock.limit_error
            if sock.kernel_lost:
                raise KernelError(f"{sock.kernel_lost} while running the cell; its state is gone")
            if not timed_out:
                raise ConnectionLost(f"the connection to kernel {sock.kernel_id} ended before "
                                     f"the cell finished ({sock.close_reason}); it may still "
                                     "be running there")
    finally:
        sock.forget(msg_id)
    result = CellResult(status="timeout" if reply is None else str(reply.get("status", "ok")),
                        duration_s=time.monotonic() - started)
    if reply is not None:
        count = reply.get("execution_count")
        result.execution_count = count if isinstance(count, int) else None
        if result.status == "error" and recorder.error is None:
            # iopub lost the error message (a rate limiter, a late subscription): the reply
            # carries it too.
            recorder.feed("error", reply)
    result.error = recorder.error
    result.outputs = recorder.result()
    return result
