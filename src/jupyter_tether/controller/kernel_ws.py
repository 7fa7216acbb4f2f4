"""One kernel websocket (``/api/kernels/<id>/channels``): framing, routing and TCP tuning.

Speaks the ``v1.kernel.websocket.jupyter.org`` binary protocol when the server offers it and
the legacy JSON protocol otherwise. A reader task routes every incoming message: replies and
outputs to whoever waits on the parent ``msg_id``, comm messages to a comm handler.

What the server sends is bounded: one message may be at most ``max_message_bytes`` (default
``wire.MAX_KERNEL_MESSAGE_BYTES``), websockets buffers at most ``MAX_QUEUED_FRAMES`` frames
before it stops reading the socket, and at most ``MAX_UNREAD_MESSAGES`` may wait unread for
one request. Past any of them the connection is closed with ``limit_error`` set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import websockets
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from websockets.asyncio.client import ClientConnection

from ..agent_payload import wire
from ..credentials import redact
from ..errors import AuthError, ConnectionLost, KernelError, LimitExceeded
from .kernel_wire import (
    FrameError,
    dumps,
    frame_legacy,
    frame_v1,
    new_message,
    unframe_legacy,
    unframe_v1,
)
from .target import Target, tls_context, tls_hint

log = logging.getLogger(__name__)

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"
#: frames websockets buffers before it pauses reading the socket (TCP then slows the server)
MAX_QUEUED_FRAMES = 16
#: messages that may wait unread for one request: a consumer that far behind a flood is
#: not catching up, and the queue would grow without bound
MAX_UNREAD_MESSAGES = 10_000
# Above this backlog the reader yields after each message so that its consumer keeps up.
_YIELD_ABOVE = 64
_MIB = 1024 * 1024


@dataclass
class KernelMessage:
    """A decoded Jupyter message as it came off the websocket."""

    channel: str
    header: dict[str, Any]
    parent_header: dict[str, Any]
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def parent_id(self) -> str | None:
        value = self.parent_header.get("msg_id")
        return str(value) if value else None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FrameError(f"the message's {what} is not a JSON object")
    return value


def _tune_socket(connection: ClientConnection) -> socket.socket | None:
    """Disable Nagle: a stock server would otherwise stall every small round trip ~40 ms."""
    sock = connection.transport.get_extra_info("socket")
    if sock is None:
        return None
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


_QUICKACK = getattr(socket, "TCP_QUICKACK", None) if sys.platform.startswith("linux") else None


class _TrackedConnection(ClientConnection):
    """A websocket connection that notes when bytes last arrived, frame complete or not."""

    last_data_at = 0.0

    def data_received(self, data: bytes) -> None:
        self.last_data_at = time.monotonic()
        super().data_received(data)


#: how long a kernel websocket may take to open: the server holds the handshake until the
#: kernel answers (a kernel just started takes a few seconds; one that hangs, forever)
OPEN_TIMEOUT_S = 20.0


class KernelSocket:
    """A connected kernel websocket with a reader task and message routing.

    ``open`` connects and starts the reader in the caller's task group; ``closed`` is set
    when the connection ends for any reason, so an owner can reconnect.
    """

    def __init__(
        self,
        target: Target,
        kernel_id: str,
        *,
        session_id: str,
        cookies: Callable[[str], str | None] | None = None,
        ping_interval: float | None = 10.0,
        ping_timeout: float | None = 10.0,
        open_timeout: float = OPEN_TIMEOUT_S,
        close_timeout: float = 1.0,
        max_message_bytes: int = wire.MAX_KERNEL_MESSAGE_BYTES,
    ) -> None:
        self.target = target
        self.kernel_id = kernel_id
        # The server signs what it forwards to the kernel: ours go unsigned.
        self._session_id = session_id
        # The Cookie header for a URL path (``JupyterRest.cookie_header``): asked at open.
        self._cookies = cookies
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self.max_message_bytes = max_message_bytes
        self._connection: ClientConnection | None = None
        self._sock: socket.socket | None = None
        self.protocol = "legacy"
        self.closed = anyio.Event()
        self.close_reason = ""
        self._waiters: dict[str, MemoryObjectSendStream[KernelMessage]] = {}
        self.comm_handler: Callable[[KernelMessage], None] | None = None
        #: set when the kernel itself went away (restart, shutdown, crash), not just the link
        self.kernel_lost = ""
        #: set when the connection was closed because the server broke a limit
        self.limit_error: LimitExceeded | None = None
        self._backlogged = False  # a consumer is behind: the reader yields to it

    @property
    def session_id(self) -> str:
        return self._session_id

    async def open(self, task_group: anyio.abc.TaskGroup) -> None:
        url = self.target.ws_url(f"api/kernels/{self.kernel_id}/channels",
                                 session_id=self.session_id)
        headers = dict(self.target.auth_headers())
        cookie = self._cookies(f"api/kernels/{self.kernel_id}/channels") if self._cookies else None
        if cookie:
            headers["Cookie"] = cookie
        # Only for wss: an ssl argument, even None, breaks websockets' ws->wss redirect.
        tls: dict[str, Any] = {"ssl": tls_context()} if url.startswith("wss:") else {}
        try:
            self._connection = await websockets.connect(
                url,
                additional_headers=headers,
                subprotocols=[V1_PROTOCOL],  # type: ignore[list-item]
                # File chunks and big replies exceed the 1 MiB default; above this the
                # server is broken or hostile (websockets checks a frame's declared length).
                max_size=self.max_message_bytes,
                compression=None,  # binary chunks do not compress; save the CPU
                # Our own keepalive (below): websockets' would call a link dead whose pong
                # is merely queued behind megabytes of download on a slow uplink.
                ping_interval=None,
                create_connection=_TrackedConnection,
                open_timeout=self._open_timeout,
                # After a missed keepalive pong websockets waits this long for the server's
                # FIN before dropping the TCP connection; on a dead path that FIN never comes.
                close_timeout=self._close_timeout,
                write_limit=4 * 1024 * 1024,
                max_queue=MAX_QUEUED_FRAMES,
                proxy=None,
                **tls,
            )
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AuthError(
                    f"the server refused the kernel websocket (HTTP {status}): the token or URL "
                    "may have expired; pass the fresh URL/token"
                ) from None
            if status == 404:
                raise KernelError(f"kernel {self.kernel_id} does not exist on the server") from None
            raise ConnectionLost(f"kernel websocket refused: HTTP {status}") from None
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            raise ConnectionLost(
                f"cannot open the kernel websocket to {self.target.display_url}: "
                f"{redact(str(exc)) or type(exc).__name__}{tls_hint(str(exc))}"
            ) from None
        self.protocol = "v1" if self._connection.subprotocol == V1_PROTOCOL else "legacy"
        if self._ping_interval:
            task_group.start_soon(self._keepalive)
        self._sock = _tune_socket(self._connection)
        task_group.start_soon(self._reader)

    # --- sending ----------------------------------------------------------------------------

    def build(self, msg_type: str, content: dict[str, Any], *, channel: str = "shell",
              metadata: dict[str, Any] | None = None,
              header_extra: dict[str, Any] | None = None) -> dict[str, Any]:
        msg = new_message(msg_type, content, session=self._session_id,
                          username="jupyter-tether", channel=channel, metadata=metadata)
        if header_extra:
            msg["header"].update(header_extra)
        return msg

    async def send(self, msg: dict[str, Any], buffers: list[bytes] | tuple[bytes, ...] = ()) -> str:
        connection = self._connection
        if connection is None or self.closed.is_set():
            raise ConnectionLost(f"kernel websocket is closed ({self.close_reason or 'not open'})")
        channel = msg["channel"]
        if self.protocol == "v1":
            parts = [dumps(msg["header"]), dumps(msg["parent_header"]),
                     dumps(msg["metadata"]), dumps(msg["content"]), *buffers]
            frame: bytes | str = frame_v1(channel, parts)
        else:
            legacy = {k: msg[k] for k in ("header", "parent_header", "metadata", "content",
                                          "channel")}
            frame = frame_legacy(legacy, list(buffers)) if buffers else dumps(legacy).decode()
        try:
            await connection.send(frame)
        except websockets.ConnectionClosed as exc:
            self._mark_closed(f"send failed: {exc}")
            raise ConnectionLost(f"kernel websocket closed while sending: {exc}") from None
        return str(msg["header"]["msg_id"])

    def write_buffer_size(self) -> int:
        """Bytes handed to the socket and not yet sent (0 when closed)."""
        connection = self._connection
        if connection is None or self.closed.is_set():
            return 0
        return int(connection.transport.get_write_buffer_size())

    # --- receiving --------------------------------------------------------------------------

    def expect(self, msg_id: str) -> MemoryObjectReceiveStream[KernelMessage]:
        """A stream of every message whose parent is ``msg_id``; call before sending it.

        Unbounded on purpose: dropping a message here could lose the reply or the idle
        status. The reader is the one consumer and drains it as fast as messages come.
        """
        send, receive = anyio.create_memory_object_stream[KernelMessage](math.inf)
        self._waiters[msg_id] = send
        return receive

    def expect_into(self, msg_id: str, stream: MemoryObjectSendStream[KernelMessage]) -> None:
        """Route messages whose parent is ``msg_id`` into an existing stream (a clone of it)."""
        self._waiters[msg_id] = stream.clone()

    def forget(self, msg_id: str) -> None:
        stream = self._waiters.pop(msg_id, None)
        if stream is not None:
            stream.close()

    def _decode(self, frame: bytes | str) -> KernelMessage:
        """The message in ``frame``; FrameError (or a JSON error) when it is not one."""
        if self.protocol == "v1" and not isinstance(frame, str):
            channel, parts = unframe_v1(frame)
            header, parent, metadata, content = (json.loads(bytes(p)) for p in parts[:4])
            buffers = [bytes(p) for p in parts[4:]]
        else:
            if isinstance(frame, str):
                msg, views = _object(json.loads(frame), "frame"), list[memoryview]()
            else:
                msg, views = unframe_legacy(frame)
            channel = msg.get("channel", "")
            header, parent = msg.get("header"), msg.get("parent_header")
            metadata, content = msg.get("metadata", {}), msg.get("content", {})
            buffers = [bytes(p) for p in views]
        return KernelMessage(channel if isinstance(channel, str) else "",
                             _object(header, "header"), _object(parent, "parent header"),
                             _object(metadata, "metadata"), _object(content, "content"),
                             buffers)

    async def _keepalive(self) -> None:
        """Ping every ``ping_interval``; abort when neither the pong nor any byte came back.

        Any bytes received after the ping prove the path alive (the pong may be queued
        behind a large frame); silence for ``ping_timeout`` means a dead path (a blackhole
        sends no FIN), and the connection is dropped so the owner reconnects at once.
        """
        connection = self._connection
        assert connection is not None and self._ping_interval
        timeout = self._ping_timeout or self._ping_interval
        while not self.closed.is_set():
            await anyio.sleep(self._ping_interval)
            sent_at = time.monotonic()
            try:
                # Our own payload: without one, websockets draws it from the global `random`,
                # moving the sequence of a notebook that seeded it for reproducible results.
                pong = await connection.ping(secrets.token_bytes(4))
            except websockets.ConnectionClosed:
                return
            try:
                with anyio.move_on_after(timeout):
                    await pong
                    continue
            except websockets.ConnectionClosed:
                return
            last = getattr(connection, "last_data_at", 0.0)
            if last < sent_at and not self.closed.is_set():
                self._mark_closed(f"keepalive: no answer for {timeout:g}s")
                connection.transport.abort()
                return

    async def _reader(self) -> None:
        assert self._connection is not None
        reason = "closed"
        try:
            async for frame in self._connection:
                if self._sock is not None and _QUICKACK is not None:
                    # Linux drops back to delayed ACKs after each read; re-arm every time.
                    with contextlib.suppress(OSError):
                        self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                try:
                    msg = self._decode(frame)
                except Exception:
                    log.warning("undecodable kernel message dropped", exc_info=True)
                    continue
                self._route(msg)
                if self._backlogged:
                    # A consumer takes one message per turn of the event loop, while this
                    # loop routes all that one socket read brought: let it catch up.
                    self._backlogged = False
                    await anyio.lowlevel.checkpoint()
        except websockets.ConnectionClosed as exc:
            reason = f"connection closed: {exc}"
            too_big = getattr(self._connection.protocol, "parser_exc", None)
            if isinstance(too_big, websockets.exceptions.PayloadTooBig):
                self._exceeded(LimitExceeded(
                    f"the server sent kernel {self.kernel_id} a message above the "
                    f"{self.max_message_bytes / _MIB:.0f} MiB limit ({too_big}; "
                    "MAX_KERNEL_MESSAGE_BYTES): the connection was closed to protect this "
                    "process's memory. A broken or hostile server, or an output far too big "
                    "to return: write it to a file on the remote instead",
                    limit="MAX_KERNEL_MESSAGE_BYTES", value=self.max_message_bytes))
                reason = str(self.limit_error)
        except (OSError, anyio.BrokenResourceError) as exc:
            reason = f"connection error: {exc}"
        finally:
            self._mark_closed(reason)

    def _route(self, msg: KernelMessage) -> None:
        if msg.channel == "iopub" and msg.msg_type in ("comm_msg", "comm_close"):
            if self.comm_handler is not None:
                try:
                    self.comm_handler(msg)
                except Exception:
                    log.exception("comm handler failed")
            return
        if msg.channel == "iopub" and msg.msg_type in ("status", "shutdown_reply"):
            # A REST restart or shutdown shows up only as the old kernel's shutdown_reply; a
            # crash as a "restarting" or "dead" status from the server. Either way the kernel
            # we talk to is gone: close, so owners notice now rather than at a timeout.
            state = "shut down" if msg.msg_type == "shutdown_reply" else \
                msg.content.get("execution_state")
            if state in ("restarting", "dead", "shut down"):
                self.kernel_lost = f"kernel {self.kernel_id} {state}"
                self.abort(self.kernel_lost)
                return
        parent = msg.parent_id
        if parent is not None:
            stream = self._waiters.get(parent)
            if stream is not None:
                try:
                    stream.send_nowait(msg)
                except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                backlog = stream.statistics().current_buffer_used
                self._backlogged = backlog > _YIELD_ABOVE
                if backlog > MAX_UNREAD_MESSAGES:
                    self._exceeded(LimitExceeded(
                        f"the server sent more than {MAX_UNREAD_MESSAGES:,} messages for one "
                        f"request to kernel {self.kernel_id} faster than they could be read "
                        "(MAX_UNREAD_MESSAGES): the connection was closed to protect this "
                        "process's memory", limit="MAX_UNREAD_MESSAGES",
                        value=MAX_UNREAD_MESSAGES))

    def _exceeded(self, error: LimitExceeded) -> None:
        """Close the connection over a broken limit; owners find why in ``limit_error``."""
        if self.limit_error is None:
            self.limit_error = error
            log.warning("%s", error)
        self.abort(str(self.limit_error))

    def _mark_closed(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()
            for stream in self._waiters.values():
                stream.close()
            self._waiters.clear()

    async def aclose(self) -> None:
        connection = self._connection
        self._mark_closed("closed by us")
        if connection is not None:
            with anyio.move_on_after(2, shield=True):
                await connection.close()

    def abort(self, reason: str = "aborted") -> None:
        """Drop the TCP connection at once (keepalive says it is dead, or the kernel went)."""
        self._mark_closed(reason)
        if self._connection is not None:
            self._connection.transport.abort()


def new_session_id() -> str:
    return uuid.uuid4().hex
