"""Run code in a kernel with ``execute_request`` and collect notebook-style outputs.

Outputs are capped (keeping the tail, with a marker), images are written to local files and
referenced by path instead of inlined, and a run past its timeout is interrupted.
"""

from __future__ import annotations

import base64
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ..errors import ConnectionLost, KernelError
from .kernel_ws import KernelMessage, KernelSocket

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif",
                "image/svg+xml": ".svg", "application/pdf": ".pdf"}

log = logging.getLogger(__name__)

OutputCallback = Callable[[str, str], None]

#: how long outputs may trail the execute_reply before we stop waiting for the idle status
IDLE_GRACE_S = 2.0


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def cap_text(text: str, limit: int) -> tuple[str, bool]:
    """Keep the tail of ``text`` within ``limit`` chars, with a marker saying what was cut."""
    if limit <= 0 or len(text) <= limit:
        return text, False
    cut = len(text) - limit
    return f"[... {cut} chars truncated ...]\n" + text[-limit:], True


@dataclass
class ExecResult:
    """What a cell produced, shaped like notebook outputs but ready for a program to read."""

    status: str  # "ok", "error", "timeout" or "aborted"
    stdout: str = ""
    stderr: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    execution_count: int | None = None
    duration_s: float = 0.0
    truncated: bool = False
    images: list[str] = field(default_factory=list)
    user_expressions: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status, "stdout": self.stdout, "stderr": self.stderr,
            "results": self.results, "error": self.error,
            "execution_count": self.execution_count, "duration_s": round(self.duration_s, 4),
            "truncated": self.truncated, "images": self.images,
        }

    def __repr__(self) -> str:
        bits = [f"status={self.status!r}"]
        if self.stdout:
            bits.append(f"stdout={self.stdout[-200:]!r}")
        if self.error:
            bits.append(f"error={self.error.get('ename')}: {self.error.get('evalue')}")
        return f"ExecResult({', '.join(bits)})"


class _TailText:
    """Accumulates text but keeps only about the last ``limit`` chars, counting what it drops.

    A cell printing for hours must not grow the controller's memory without bound.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0

    def append(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.limit > 0 and self.size > 2 * self.limit:
            joined = "".join(self.parts)
            self.dropped += len(joined) - self.limit
            self.parts, self.size = [joined[-self.limit:]], self.limit

    def text(self) -> tuple[str, bool]:
        """The kept tail, with a marker saying how much was cut (same form as cap_text)."""
        whole = "".join(self.parts)
        cut = self.dropped
        if self.limit > 0 and len(whole) > self.limit:
            cut += len(whole) - self.limit
            whole = whole[-self.limit:]
        if not cut:
            return whole, False
        return f"[... {cut} chars truncated ...]\n" + whole, True


class _Collector:
    def __init__(self, max_output_chars: int, image_dir: Path | None,
                 on_output: OutputCallback | None) -> None:
        self.stdout = _TailText(max_output_chars)
        self.stderr = _TailText(max_output_chars)
        self.results: list[dict[str, Any]] = []
        self.images: list[str] = []
        self.error: dict[str, Any] | None = None
        self.max_output_chars = max_output_chars
        self.image_dir = image_dir
        self.on_output = on_output

    def _save_image(self, mime: str, data: Any, msg_id: str) -> str | None:
        if self.image_dir is None:
            return None
        self.image_dir.mkdir(parents=True, exist_ok=True)
        path = self.image_dir / f"output-{msg_id[:12]}-{len(self.images)}{_IMAGE_TYPES[mime]}"
        raw = data.encode() if mime == "image/svg+xml" else base64.b64decode(data)
        path.write_bytes(raw)
        self.images.append(str(path))
        return str(path)

    def _bundle(self, data: dict[str, Any], msg_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for mime, value in data.items():
            if mime in _IMAGE_TYPES:
                saved = self._save_image(mime, value, msg_id)
                out[mime] = {"saved_to": saved} if saved else {"omitted_bytes": len(value)}
            elif isinstance(value, str):
                out[mime], _ = cap_text(value, self.max_output_chars)
            else:
                out[mime] = value
        return out

    def feed(self, msg_type: str, content: dict[str, Any], msg_id: str) -> None:
        if msg_type == "stream":
            text = content.get("text", "")
            (self.stderr if content.get("name") == "stderr" else self.stdout).append(text)
            if self.on_output:
                self.on_output(content.get("name", "stdout"), text)
        elif msg_type in ("execute_result", "display_data"):
            self.results.append({"type": msg_type,
                                 "data": self._bundle(content.get("data", {}), msg_id)})
            if self.on_output and "text/plain" in content.get("data", {}):
                self.on_output("result", content["data"]["text/plain"] + "\n")
        elif msg_type == "error":
            tb = [strip_ansi(line) for line in content.get("traceback", [])]
            self.error = {"ename": content.get("ename", ""), "evalue": content.get("evalue", ""),
                          "traceback": tb}
            if self.on_output:
                self.on_output("error", "\n".join(tb) + "\n")

    def result(self, status: str) -> ExecResult:
        stdout, cut_out = self.stdout.text()
        stderr, cut_err = self.stderr.text()
        return ExecResult(status=status, stdout=stdout, stderr=stderr, results=self.results,
                          error=self.error, truncated=cut_out or cut_err, images=self.images)


async def execute(
    sock: KernelSocket,
    code: str,
    *,
    timeout: float | None = 120.0,
    silent: bool = False,
    store_history: bool = True,
    user_expressions: dict[str, str] | None = None,
    max_output_chars: int = 20_000,
    image_dir: Path | None = None,
    on_output: OutputCallback | None = None,
    interrupt: Callable[[], Awaitable[None]] | None = None,
    wait_for_outputs: bool = True,
) -> ExecResult:
    """Run ``code`` and wait for its reply and idle status (or the timeout, then interrupt)."""
    msg = sock.build("execute_request", {
        "code": code, "silent": silent, "store_history": store_history,
        "user_expressions": user_expressions or {}, "allow_stdin": False,
        "stop_on_error": True,
    })
    msg_id = msg["header"]["msg_id"]
    collector = _Collector(max_output_chars, image_dir, on_output)
    started = time.monotonic()
    replies = sock.expect(msg_id)
    reply: dict[str, Any] | None = None
    idle = False
    status = "ok"
    try:
        await sock.send(msg)
        with anyio.move_on_after(timeout) as scope:
            async for incoming in replies:
                if incoming.channel == "shell" and incoming.msg_type == "execute_reply":
                    reply = incoming.content
                    # Outputs end with the idle status on iopub; but iopub can lose messages
                    # (a kernel restart's late-joining subscription, the rate limiter), and
                    # the reply alone must not then wait for ever.
                    scope.deadline = min(scope.deadline, anyio.current_time() + IDLE_GRACE_S)
                elif incoming.channel == "iopub":
                    if incoming.msg_type == "status":
                        idle = incoming.content.get("execution_state") == "idle"
                    else:
                        collector.feed(incoming.msg_type, incoming.content, msg_id)
                if reply is not None and (idle or not wait_for_outputs):
                    break
        if scope.cancelled_caught and reply is None:
            status = "timeout"
            if interrupt is not None:
                await interrupt()
                # Give the kernel a moment to report the KeyboardInterrupt it raised.
                with anyio.move_on_after(5):
                    async for incoming in replies:
                        if incoming.channel == "shell" and incoming.msg_type == "execute_reply":
                            break
                        if incoming.channel == "iopub" and incoming.msg_type != "status":
                            collector.feed(incoming.msg_type, incoming.content, msg_id)
        elif reply is None and sock.kernel_lost:
            raise KernelError(f"{sock.kernel_lost} while running the code; its state is gone")
        elif reply is None:
            raise ConnectionLost(
                f"the connection to kernel {sock.kernel_id} ended before the code finished "
                f"({sock.close_reason}); the code may still be running there"
            )
    finally:
        sock.forget(msg_id)
    result = collector.result(status)
    result.duration_s = time.monotonic() - started
    if reply is not None:
        result.execution_count = reply.get("execution_count")
        result.user_expressions = reply.get("user_expressions") or {}
        if status == "ok" and reply.get("status") == "error":
            result.status = "error"
            if result.error is None:
                result.error = {"ename": reply.get("ename", ""), "evalue": reply.get("evalue", ""),
                                "traceback": [strip_ansi(t) for t in reply.get("traceback", [])]}
        elif status == "ok" and reply.get("status") == "aborted":
            result.status = "aborted"
    return result


async def kernel_info(sock: KernelSocket, timeout: float = 30.0) -> dict[str, Any]:
    """Ask until the kernel answers on shell *and* iopub, then return its kernel_info.

    A request sent while a kernel (re)starts is simply lost, and after a restart the server's
    iopub subscription joins late: replies on shell flow while iopub (where every comm reply
    travels) still drops messages. Like jupyter_server's own "nudge", keep asking until a
    status message for one of our requests comes back on iopub.
    """
    deadline = anyio.current_time() + timeout
    sent: list[str] = []
    send_reply, replies = anyio.create_memory_object_stream[KernelMessage](math.inf)
    info: dict[str, Any] | None = None
    try:
        interval = 0.5
        while anyio.current_time() < deadline:
            msg = sock.build("kernel_info_request", {})
            sent.append(msg["header"]["msg_id"])
            sock.expect_into(sent[-1], send_reply)
            await sock.send(msg)
            with anyio.move_on_after(min(interval, max(0.0, deadline - anyio.current_time()))):
                iopub_seen = False
                async for incoming in replies:
                    if incoming.msg_type == "kernel_info_reply":
                        info = incoming.content
                    elif incoming.channel == "iopub":
                        iopub_seen = True
                    if info is not None and iopub_seen:
                        return info
            if sock.closed.is_set():
                raise ConnectionLost(f"kernel websocket closed: {sock.close_reason}")
            interval = min(interval * 2, 4.0)
    finally:
        for msg_id in sent:
            sock.forget(msg_id)
        send_reply.close()
    if info is not None:
        log.warning("kernel %s answers but its iopub stays silent", sock.kernel_id)
        return info
    raise KernelError(f"kernel {sock.kernel_id} did not answer kernel_info in {timeout}s")


async def control_request(sock: KernelSocket, msg_type: str, content: dict[str, Any],
                          timeout: float = 20.0) -> dict[str, Any]:
    """Send a control-channel request (e.g. ``create_subshell_request``) and await its reply."""
    msg = sock.build(msg_type, content, channel="control")
    replies = sock.expect(msg["header"]["msg_id"])
    reply_type = msg_type.replace("_request", "_reply")
    try:
        await sock.send(msg)
        with anyio.fail_after(timeout):
            async for incoming in replies:
                if incoming.msg_type == reply_type:
                    return incoming.content
    except TimeoutError:
        raise KernelError(f"kernel {sock.kernel_id} did not answer {msg_type}") from None
    finally:
        sock.forget(msg["header"]["msg_id"])
    raise ConnectionLost(f"kernel websocket closed: {sock.close_reason}")
