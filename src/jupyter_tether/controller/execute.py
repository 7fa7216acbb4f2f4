"""Run code in a kernel with ``execute_request`` and collect notebook-style outputs.

Everything the kernel sends is capped (``ExecLimits``), with a marker saying what was cut;
images are written to local files and referenced by path instead of inlined, and a run past
its timeout is interrupted.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConnectionLost, ExecError, KernelError, TetherTimeout
from ..formatting import strip_ansi
from .kernel_requests import await_reply, drain_after_interrupt
from .kernel_ws import KernelSocket

_IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif",
                "image/svg+xml": ".svg", "application/pdf": ".pdf"}

log = logging.getLogger(__name__)

OutputCallback = Callable[[str, str], None]


def cap_text(text: str, limit: int) -> tuple[str, bool]:
    """Keep the tail of ``text`` within ``limit`` chars, with a marker saying what was cut."""
    if limit <= 0 or len(text) <= limit:
        return text, False
    cut = len(text) - limit
    return f"[... {cut} chars truncated ...]\n" + text[-limit:], True


def cap_head(text: str, limit: int, what: str = "") -> tuple[str, bool]:
    """Keep the start of ``text`` within ``limit`` chars, with a marker giving the total."""
    if limit <= 0 or len(text) <= limit:
        return text, False
    label = f"{what}: " if what else ""
    return (text[:limit] + f"\n[... {label}{len(text) - limit:,} more chars not shown "
            f"({len(text):,} in all) ...]"), True


@dataclass(frozen=True)
class ExecLimits:
    """Caps on what one ``execute`` returns, whatever the kernel (or a hostile server) sends.

    Text caps follow the call's ``max_output_chars``; counts and byte totals are fixed here.
    Whatever is cut leaves a marker with what it held, and the result's ``truncated`` is set.
    """

    #: notebook outputs (display_data / execute_result) kept; later ones are only counted
    #: (the cell's own execute_result is kept even past the cap)
    max_results: int = 50
    #: MIME types kept per output
    max_mime_types: int = 16
    #: all kept output data together, as a multiple of ``max_output_chars``
    results_budget_factor: int = 8
    #: images written to files per run, and their bytes in all
    max_images: int = 20
    max_image_bytes: int = 32 * 1024 * 1024
    #: traceback entries kept (the last ones), within ``max_output_chars`` in all
    max_traceback_entries: int = 100


#: the limits ``execute`` applies unless given others
EXEC_LIMITS = ExecLimits()


def cap_traceback(lines: list[str], limit: int,
                  max_entries: int = EXEC_LIMITS.max_traceback_entries) -> tuple[list[str], bool]:
    """The last traceback entries within ``limit`` chars in all (each entry at most half).

    The innermost frames and the exception line come last, so those are kept; a first
    entry says how many were left out.
    """
    cut = False
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        if len(kept) >= max_entries:
            cut = True
            break
        if limit > 0:
            line, short = cap_head(line, max(limit // 2, 1))
            cut = cut or short
            if kept and used + len(line) > limit:
                cut = True
                break
        kept.append(line)
        used += len(line)
    kept.reverse()
    if len(kept) < len(lines):
        dropped = len(lines) - len(kept)
        kept.insert(0, f"[... {dropped:,} earlier traceback entries not shown ...]")
    return kept, cut


def _error_dict(ename: Any, evalue: Any, traceback: Any, limit: int,
                limits: ExecLimits) -> tuple[dict[str, Any], bool]:
    """An ``error`` entry from what the kernel said, every part capped."""
    lines = [strip_ansi(str(t)) for t in traceback] if isinstance(traceback, list) else []
    tb, cut_tb = cap_traceback(lines, limit, limits.max_traceback_entries)
    name, cut_name = cap_head(str(ename or ""), limit)
    value, cut_value = cap_head(str(evalue or ""), limit, "exception value")
    return {"ename": name, "evalue": value, "traceback": tb}, cut_tb or cut_name or cut_value


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
    #: outputs left out of ``results`` by the cap (a marker entry there says so too)
    omitted_results: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __bool__(self) -> bool:
        # ``if t.exec(...):`` reads as "did it work": false on error, timeout or abort.
        return self.ok

    @property
    def value(self) -> str | None:
        """The last expression's ``text/plain`` (``'42'`` for ``6 * 7``); None when the code
        ends in a statement, or failed before it."""
        for entry in reversed(self.results):
            if entry.get("type") == "execute_result":
                plain = entry.get("data", {}).get("text/plain")
                return plain if isinstance(plain, str) else None
        return None

    def raise_for_error(self) -> ExecResult:
        """Raise when the code did not run to its end; else return this result (to chain).

        ``ExecError`` (``.ename``, ``.evalue``, ``.traceback``; the remote traceback is shown
        with it) on an exception, ``TetherTimeout`` when the timeout interrupted it,
        ``ExecError`` with ``ename`` "aborted" when the kernel skipped it.
        """
        if self.status == "ok":
            return self
        if self.status == "timeout":
            raise TetherTimeout(f"the code was interrupted at its timeout after "
                                f"{self.duration_s:.1f}s{_tail_note(self.stdout, self.stderr)}")
        error = self.error or {}
        if self.status == "aborted" and not error:
            raise ExecError("aborted", "the kernel skipped the code (an earlier request "
                            "failed or was interrupted): run it again", [])
        traceback = [str(line) for line in error.get("traceback") or []]
        exc = ExecError(str(error.get("ename") or "Error"), str(error.get("evalue") or ""),
                        traceback)
        if traceback:
            exc.add_note("remote traceback:\n" + "\n".join(traceback))
        raise exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status, "stdout": self.stdout, "stderr": self.stderr,
            "results": self.results, "error": self.error,
            "execution_count": self.execution_count, "duration_s": round(self.duration_s, 4),
            "truncated": self.truncated, "images": self.images,
            "omitted_results": self.omitted_results,
        }

    def __repr__(self) -> str:
        head = self.status + (f" [{self.execution_count}]" if self.execution_count else "")
        bits = [f"<ExecResult {head} {self.duration_s:.2f}s"]
        if self.error:
            bits.append(_preview(f"{self.error.get('ename')}: {self.error.get('evalue')}",
                                 quote=False))
        value = self.value
        if value is not None:
            bits.append(f"value={_preview(value)}")
        if self.stdout:
            bits.append(f"stdout={_preview(self.stdout, tail=True)}")
        if self.stderr:
            bits.append(f"stderr={_preview(self.stderr, tail=True)}")
        displays = sum(1 for r in self.results if r.get("type") == "display_data")
        if displays:
            bits.append(f"+{displays} display{'s' if displays > 1 else ''}")
        if self.images:
            bits.append(f"+{len(self.images)} image{'s' if len(self.images) > 1 else ''}")
        if self.truncated:
            bits.append("(truncated)")
        return " ".join(bits) + ">"


_PREVIEW_CHARS = 60


def _preview(text: str, *, tail: bool = False, quote: bool = True) -> str:
    """A short one-line view of ``text`` for a repr: its start (or end), marked when cut."""
    if len(text) > _PREVIEW_CHARS:
        text = ("..." + text[-_PREVIEW_CHARS:]) if tail else (text[:_PREVIEW_CHARS] + "...")
    return repr(text) if quote else text.replace("\n", " ")


def _tail_note(stdout: str, stderr: str) -> str:
    last = (stderr or stdout).strip().splitlines()
    return f"; its last output: {last[-1][:200]!r}" if last else ""


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
    """Turns iopub messages into an ExecResult, holding at most what ``ExecLimits`` allow."""

    def __init__(self, max_output_chars: int, image_dir: Path | None,
                 on_output: OutputCallback | None, limits: ExecLimits = EXEC_LIMITS) -> None:
        self.stdout = _TailText(max_output_chars)
        self.stderr = _TailText(max_output_chars)
        self.results: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None  # an execute_result that came past the cap
        self.images: list[str] = []
        self.image_bytes = 0
        self.error: dict[str, Any] | None = None
        self.max_output_chars = max_output_chars
        self.limits = limits
        self.budget = (limits.results_budget_factor * max_output_chars
                       if max_output_chars > 0 else math.inf)
        self.used = 0  # chars of data held in ``results``
        self.omitted = 0
        self.omitted_chars = 0
        self.cut = False
        self.image_dir = image_dir
        self.on_output = on_output

    def _save_image(self, mime: str, data: Any, msg_id: str) -> dict[str, Any]:
        size = len(data) if isinstance(data, str | bytes) else 0
        if self.image_dir is None:
            return {"omitted_bytes": size}
        if not isinstance(data, str):
            return {"omitted_bytes": size, "error": "image data is not a string"}
        limits = self.limits
        # base64 decodes to 3/4 of its length: refuse before decoding what would not fit.
        estimate = len(data) if mime == "image/svg+xml" else len(data) * 3 // 4
        if len(self.images) >= limits.max_images or \
                self.image_bytes + estimate > limits.max_image_bytes:
            self.cut = True
            return {"omitted_bytes": size,
                    "note": f"not saved: at most {limits.max_images} images and "
                            f"{limits.max_image_bytes // (1024 * 1024)} MiB are saved per run"}
        try:
            raw = data.encode() if mime == "image/svg+xml" else base64.b64decode(data)
        except (binascii.Error, ValueError):
            return {"omitted_bytes": size, "error": "undecodable image data"}
        self.image_dir.mkdir(parents=True, exist_ok=True)
        path = self.image_dir / f"output-{msg_id[:12]}-{len(self.images)}{_IMAGE_TYPES[mime]}"
        path.write_bytes(raw)
        self.images.append(str(path))
        self.image_bytes += len(raw)
        return {"saved_to": str(path)}

    def _value(self, mime: str, value: Any) -> tuple[Any, int]:
        """A MIME value within ``max_output_chars``, and the chars it holds."""
        limit = self.max_output_chars
        if isinstance(value, str):
            text, cut = cap_text(value, limit)
        else:
            # application/json and other structured data: kept as is when small enough.
            try:
                text = json.dumps(value, separators=(",", ":"), default=str)
            except (TypeError, ValueError, RecursionError):
                text = repr(value)
            if limit <= 0 or len(text) <= limit:
                return value, len(text)
            text, cut = cap_head(text, limit, mime)
        self.cut = self.cut or cut
        return text, len(text)

    def _bundle(self, data: dict[str, Any], msg_id: str) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        size = 0
        for index, (mime, value) in enumerate(data.items()):
            if index >= self.limits.max_mime_types:
                self.cut = True
                out["omitted_mime_types"] = len(data) - index
                break
            mime = str(mime)[:200]
            if mime in _IMAGE_TYPES:
                out[mime] = self._save_image(mime, value, msg_id)
                size += 100
            else:
                out[mime], held = self._value(mime, value)
                size += held
        return out, size

    def _output(self, msg_type: str, data: dict[str, Any], msg_id: str) -> None:
        approx = sum(len(v) if isinstance(v, str) else 100 for v in data.values())
        past_cap = len(self.results) >= self.limits.max_results or self.used >= self.budget
        if past_cap and not (msg_type == "execute_result" and self.final is None):
            self.omitted += 1
            self.omitted_chars += approx
            self.cut = True
            return
        bundle, size = self._bundle(data, msg_id)
        entry = {"type": msg_type, "data": bundle}
        if past_cap:
            self.final = entry
        else:
            self.results.append(entry)
            self.used += size

    def feed(self, msg_type: str, content: dict[str, Any], msg_id: str) -> None:
        if msg_type == "stream":
            text = content.get("text", "")
            text = text if isinstance(text, str) else str(text)
            (self.stderr if content.get("name") == "stderr" else self.stdout).append(text)
            if self.on_output:
                self.on_output(str(content.get("name", "stdout")), text)
        elif msg_type in ("execute_result", "display_data"):
            data = content.get("data")
            data = data if isinstance(data, dict) else {}
            self._output(msg_type, data, msg_id)
            plain = data.get("text/plain")
            if self.on_output and isinstance(plain, str):
                self.on_output("result", cap_text(plain, self.max_output_chars)[0] + "\n")
        elif msg_type == "error":
            self.error, cut = _error_dict(content.get("ename"), content.get("evalue"),
                                          content.get("traceback"), self.max_output_chars,
                                          self.limits)
            self.cut = self.cut or cut
            if self.on_output:
                self.on_output("error", "\n".join(self.error["traceback"]) + "\n")

    def result(self, status: str) -> ExecResult:
        stdout, cut_out = self.stdout.text()
        stderr, cut_err = self.stderr.text()
        results = list(self.results)
        if self.omitted:
            results.append({"type": "omitted", "count": self.omitted, "data": {
                "text/plain": f"[... {self.omitted:,} more outputs not shown "
                              f"(about {self.omitted_chars:,} chars) ...]"}})
        if self.final is not None:
            results.append(self.final)
        return ExecResult(status=status, stdout=stdout, stderr=stderr, results=results,
                          error=self.error, truncated=cut_out or cut_err or self.cut,
                          images=self.images, omitted_results=self.omitted)


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
    limits: ExecLimits = EXEC_LIMITS,
) -> ExecResult:
    """Run ``code`` and wait for its reply and idle status (or the timeout, then interrupt).

    What comes back is bounded whatever the kernel sends (``limits``, default
    ``EXEC_LIMITS``): stdout and stderr keep their last ``max_output_chars`` chars; each
    text MIME value its last ``max_output_chars``, structured ones (``application/json``)
    their first, as text, when longer; the exception name and value their first
    ``max_output_chars``; the traceback its last entries within ``max_output_chars`` in
    all; at most ``limits.max_mime_types`` MIME types per output. Outputs are kept until
    there are ``limits.max_results`` of them or their data reaches ``results_budget_factor
    * max_output_chars`` chars, then a ``{"type": "omitted"}`` entry counts the rest; the
    cell's own ``execute_result`` is always kept. At most
    ``limits.max_images`` images (``max_image_bytes`` in all) are saved. Every cut leaves a
    marker with the size cut and sets ``truncated``. ``max_output_chars <= 0`` lifts the
    text caps but not the counts. A single websocket message above the socket's limit ends
    the connection with ``LimitExceeded``.
    """
    msg = sock.build("execute_request", {
        "code": code, "silent": silent, "store_history": store_history,
        "user_expressions": user_expressions or {}, "allow_stdin": False,
        "stop_on_error": True,
    })
    msg_id = msg["header"]["msg_id"]
    collector = _Collector(max_output_chars, image_dir, on_output, limits)
    started = time.monotonic()
    replies = sock.expect(msg_id)
    status = "ok"

    def feed(msg_type: str, content: dict[str, Any]) -> None:
        collector.feed(msg_type, content, msg_id)

    try:
        await sock.send(msg)
        reply, timed_out = await await_reply(replies, feed, timeout,
                                             wait_for_outputs=wait_for_outputs)
        if timed_out and reply is None:
            status = "timeout"
            if interrupt is not None:
                await interrupt()
                # Its late reply does not count: the run timed out.
                await drain_after_interrupt(replies, feed, 5)
        elif reply is None and sock.limit_error is not None:
            raise sock.limit_error
        elif reply is None and sock.kernel_lost:
            raise KernelError(f"{sock.kernel_lost} while running the code; its state is gone")
        elif reply is None:
            raise ConnectionLost(
                f"the connection to kernel {sock.kernel_id} ended before the code finished "
                f"({sock.close_reason}); the code may still be running there"
            )
    finally:
        sock.forget(msg_id)
    if sock.limit_error is not None and status == "timeout":
        raise sock.limit_error  # a flood ended the link while we waited on the interrupt
    result = collector.result(status)
    result.duration_s = time.monotonic() - started
    if reply is not None:
        apply_reply(result, reply, status, max_output_chars, limits)
    return result


def apply_reply(result: ExecResult, reply: dict[str, Any], status: str,
                max_output_chars: int, limits: ExecLimits) -> None:
    """The execute_reply's part of ``result`` (either exec path): its count and user
    expressions, and an error or "aborted" unless the cell timed out (that stays)."""
    count = reply.get("execution_count")
    result.execution_count = count if isinstance(count, int) else None
    expressions = reply.get("user_expressions")
    result.user_expressions = expressions if isinstance(expressions, dict) else {}
    if status == "ok" and reply.get("status") == "error":
        result.status = "error"
        if result.error is None:
            result.error, cut = _error_dict(reply.get("ename"), reply.get("evalue"),
                                            reply.get("traceback"), max_output_chars, limits)
            result.truncated = result.truncated or cut
    elif status == "ok" and reply.get("status") == "aborted":
        result.status = "aborted"
