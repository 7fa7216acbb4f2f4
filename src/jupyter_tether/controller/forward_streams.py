"""The controller's end of forwarded TCP streams: one ``StreamConnection`` per accepted local
connection, and the ``StreamMux`` that routes the supervisor's stream messages to them.

Bytes read from the local socket go up as one-way ``stream_write`` posts, sent as *bulk*
(behind the link's small calls, see ``SupervisorLink.post``); bytes from the remote wait in
a per-connection inbox of at most one window, and are acknowledged only once written to
the local socket, so a slow local reader stalls its own stream and holds no more than one
window here or on the remote. Credit is ``stream_state``'s, the same objects the supervisor
uses.

Across drops: every connection open when the link drops is reset (TCP bytes are not
replayed); after the link is back, the supervisor is told to reset what it still holds of
them (``reset_below``), and new connections work as before.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import socket
import struct
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import anyio.abc

from ..agent_payload import stream_state as st
from ..agent_payload.wire import Op
from ..errors import TetherError
from .rpc import Reply

log = logging.getLogger(__name__)

#: the most bytes read from a local socket for one write (one websocket message)
UP_CHUNK = 256 * 1024
#: how often the supervisor hears that this controller's streams are alive (its lease
#: is ``streams.OWNER_LEASE_S``)
SYNC_EVERY_S = 15.0
OPEN_TIMEOUT_S = 30.0
#: how long a new connection waits for the client's first bytes to send them with the open
FIRST_BYTES_WAIT_S = 0.002


class StreamLink(Protocol):
    """What forwarding needs of a link (``SupervisorLink`` is one)."""

    @property
    def connected(self) -> bool: ...

    @property
    def where(self) -> str: ...

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   buffers: Any = (), timeout: float | None = 60.0,
                   idempotent: bool = True) -> Reply: ...

    async def post(self, op: str, args: dict[str, Any], buffers: Any = (), *,
                   bulk: bool = False) -> None: ...

    def set_stream_handler(self, handler: Any) -> None: ...

    def on_drop(self, hook: Callable[[], None]) -> Callable[[], None]: ...

    def on_reattach(self, hook: Any) -> Callable[[], None]: ...


def reset_local(stream: anyio.abc.SocketStream) -> None:
    """Make the next close send RST: the local client sees the connection fail."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class ByteCounters:
    """What went through one forward (all its connections)."""

    def __init__(self) -> None:
        self.connections = 0
        self.active = 0
        self.failed = 0
        self.bytes_up = 0  # local client -> remote server
        self.bytes_down = 0
        self.last_error = ""


class StreamConnection:
    """One local connection carried as one remote stream."""

    def __init__(self, mux: StreamMux, sid: int, stream: anyio.abc.SocketStream,
                 counters: ByteCounters, window: int) -> None:
        self.mux = mux
        self.sid = sid
        self.local = stream
        self.counters = counters
        self.up = st.SendCredit(window)  # local -> remote
        self.down = st.ReceiveCredit(window)  # remote -> local
        self.inbox: collections.deque[bytes] = collections.deque()
        self.remote_eof = False
        self.opened = False
        #: why the connection was reset (None while it is fine)
        self.reset_reason: str | None = None
        self._tell_remote = False
        self._inbox_ready = anyio.Event()
        self._credit_ready = anyio.Event()
        self._scope: anyio.CancelScope | None = None

    # --- from the mux (sync, on the event loop) -------------------------------------------------

    def on_data(self, blob: bytes, offset: Any) -> None:
        if offset != self.down.received:
            self.abort("bytes were lost on the way (did the server's iopub rate limit drop a "
                       "message? see ServerApp.iopub_msg_rate_limit): connection reset",
                       tell_remote=True)
            return
        if not self.down.on_data(len(blob)):
            self.abort("the remote overran the credit window", tell_remote=True)
            return
        self.inbox.append(blob)
        self._inbox_ready.set()

    def on_eof(self) -> None:
        self.remote_eof = True
        self._inbox_ready.set()

    def on_ack(self, total: Any) -> None:
        if not self.up.on_ack(total):
            self.abort("the remote sent an impossible ack", tell_remote=True)
            return
        self._credit_ready.set()

    def abort(self, reason: str, *, tell_remote: bool = False) -> None:
        """Reset this connection (both ends); ``tell_remote`` when the remote does not know."""
        if self.reset_reason is None:
            self.reset_reason = reason
            self._tell_remote = tell_remote
        if self._scope is not None:
            self._scope.cancel()
        self._inbox_ready.set()
        self._credit_ready.set()

    # --- the connection's life ------------------------------------------------------------------

    def on_remote_reset(self, reason: str) -> None:
        """The remote refused or reset the stream: say why in the forward's counters."""
        self.counters.failed += 1
        self.counters.last_error = reason
        log.info("forwarded connection %d reset by the remote: %s", self.sid, reason)
        self.abort(f"the remote reset the connection: {reason}")

    async def run(self, port: int, host: str, allow_remote_host: bool) -> None:
        """Open the remote stream, carry bytes both ways, close or reset both ends.

        The open is one-way: bytes follow right behind it (no round trip per connection);
        a refusal comes back as a ``reset`` item that says why.
        """
        link, owner = self.mux.link, self.mux.owner
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                with anyio.move_on_after(OPEN_TIMEOUT_S):
                    while not link.connected and self.reset_reason is None:
                        await anyio.sleep(0.05)  # a drop: new connections wait for the heal
                if not link.connected:
                    self.abort(f"the link to {link.where} is down")
                if self.reset_reason is not None:
                    return
                # A client that speaks first (HTTP) has its request there at once: it rides
                # in the open, one message less on the way to the remote.
                first, local_eof = b"", False
                with anyio.move_on_after(FIRST_BYTES_WAIT_S):
                    try:
                        first = await self.local.receive(min(UP_CHUNK, self.up.window))
                    except anyio.EndOfStream:
                        local_eof = True
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        self.abort("the local client reset the connection")
                        return
                self.up.on_sent(len(first))
                await self._post(Op.STREAM_OPEN, {
                    "owner": owner, "sid": self.sid, "port": port, "host": host,
                    "allow_remote_host": allow_remote_host, "window": self.down.window,
                    "quiet": True}, [first] if first else [])
                self.counters.bytes_up += len(first)
                self.opened = True
                async with anyio.create_task_group() as pumps:
                    pumps.start_soon(self._pump_up, owner, local_eof)
                    pumps.start_soon(self._pump_down, owner)
        finally:
            if self.reset_reason is not None and not self.opened:
                self.counters.failed += 1
                self.counters.last_error = self.reset_reason
            await self._close()

    async def _close(self) -> None:
        self.mux.forget(self.sid)
        with anyio.CancelScope(shield=True):
            if self.reset_reason is not None:
                reset_local(self.local)
                if self._tell_remote and self.opened and self.mux.link.connected:
                    with contextlib.suppress(TetherError, anyio.BrokenResourceError):
                        await self.mux.link.post(Op.STREAM_CLOSE, {
                            "owner": self.mux.owner, "sid": self.sid, "how": "reset"})
            with contextlib.suppress(Exception):
                await self.local.aclose()

    async def _pump_up(self, owner: str, local_eof: bool) -> None:
        """Local socket -> remote stream, within the remote's credit."""
        if local_eof:
            await self._post(Op.STREAM_CLOSE, {"owner": owner, "sid": self.sid, "how": "eof"})
            return
        while True:
            while self.up.available <= 0:
                self._credit_ready = anyio.Event()
                if self.up.available <= 0:
                    await self._credit_ready.wait()
            try:
                data = await self.local.receive(min(self.up.available, UP_CHUNK))
            except anyio.EndOfStream:
                await self._post(Op.STREAM_CLOSE, {"owner": owner, "sid": self.sid,
                                                   "how": "eof"})
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.abort(f"the local client reset the connection ({exc})", tell_remote=True)
                return
            self.up.on_sent(len(data))
            await self._post(Op.STREAM_WRITE, {"owner": owner, "sid": self.sid}, [data],
                             bulk=True)
            self.counters.bytes_up += len(data)

    async def _pump_down(self, owner: str) -> None:
        """Remote stream -> local socket; credit goes back once bytes are written locally."""
        while True:
            if not self.inbox:
                if self.remote_eof:
                    with contextlib.suppress(anyio.BrokenResourceError, OSError):
                        await self.local.send_eof()
                    return
                self._inbox_ready = anyio.Event()
                if not self.inbox and not self.remote_eof:
                    await self._inbox_ready.wait()
                continue
            data = self.inbox.popleft()
            try:
                await self.local.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.abort(f"the local client went away ({exc})", tell_remote=True)
                return
            self.counters.bytes_down += len(data)
            total = self.down.on_consumed(len(data))
            if total is not None:
                await self._post(Op.STREAM_ACK, {"owner": owner, "acks": [[self.sid, total]]})

    async def _post(self, op: str, args: dict[str, Any], buffers: Any = (), *,
                    bulk: bool = False) -> None:
        try:
            await self.mux.link.post(op, args, buffers, bulk=bulk)
        except TetherError as exc:
            self.abort(f"the link dropped: {exc}")
            await anyio.sleep_forever()  # cancelled by abort's scope


class StreamMux:
    """The forwarded streams of one link: ids, routing, drops, and the supervisor's lease."""

    def __init__(self, link: StreamLink) -> None:
        self.link = link
        self.owner = uuid.uuid4().hex
        self._sids = itertools.count(1)
        self.connections: dict[int, StreamConnection] = {}
        #: streams below this id belong to a connection that a drop reset
        self._reset_below = 0
        self._removers: list[Callable[[], None]] = []
        self.malformed = 0

    def start(self, task_group: anyio.abc.TaskGroup) -> None:
        self.link.set_stream_handler(self._on_message)
        self._removers = [self.link.on_drop(self._on_drop),
                          self.link.on_reattach(self._on_reattach)]
        task_group.start_soon(self._keep_lease)

    def stop(self) -> None:
        for remove in self._removers:
            remove()
        self._removers = []
        self.link.set_stream_handler(None)

    def new(self, stream: anyio.abc.SocketStream, counters: ByteCounters,
            window: int = st.DEFAULT_WINDOW) -> StreamConnection:
        sid = next(self._sids)
        connection = StreamConnection(self, sid, stream, counters, window)
        self.connections[sid] = connection
        return connection

    def probe_sid(self) -> int:
        """An id for a stream with no connection behind it (a reachability probe)."""
        return next(self._sids)

    def forget(self, sid: int) -> None:
        self.connections.pop(sid, None)

    async def reset_all(self, reason: str) -> None:
        """Reset every connection, and tell the supervisor to drop their streams."""
        for connection in list(self.connections.values()):
            connection.abort(reason)
        if self.link.connected:
            with contextlib.suppress(TetherError):
                await self.link.call(Op.STREAM_SYNC, {"owner": self.owner, "live": [],
                                                      "reset_below": next(self._sids)},
                                     timeout=5)

    # --- link callbacks ---------------------------------------------------------------------

    def _on_message(self, envelope: dict[str, Any], blobs: list[bytes]) -> None:
        if envelope.get("owner") != self.owner:
            return
        items = st.parse_items(envelope, len(blobs))
        if items is None:
            self.malformed += 1
            log.warning("malformed stream message from the supervisor dropped")
            return
        blob_index = 0
        for sid, kind, value in items:
            blob = b""
            if kind == st.DATA:
                blob = blobs[blob_index]
                blob_index += 1
            connection = self.connections.get(sid)
            if connection is None:
                continue
            if kind == st.DATA:
                connection.on_data(blob, value)
            elif kind == st.EOF:
                connection.on_eof()
            elif kind == st.ACK:
                connection.on_ack(value)
            else:
                # Shown in the forward's last_error (tool results) and the log: one clean line.
                connection.on_remote_reset(st.clean_reason(value))

    def _on_drop(self) -> None:
        self._reset_below = next(self._sids)
        for connection in list(self.connections.values()):
            if connection.sid < self._reset_below:
                connection.abort(f"the link to {self.link.where} dropped: open connections "
                                 "are reset (TCP bytes are not replayed)")

    async def _on_reattach(self) -> None:
        # The old comm's streams may live on in the supervisor: drop them now, not at lease end.
        await self._sync(reset_below=self._reset_below)

    async def _sync(self, reset_below: int = 0) -> None:
        live = [sid for sid, c in self.connections.items() if c.opened and c.reset_reason is None]
        args: dict[str, Any] = {"owner": self.owner, "live": live[:st.MAX_STREAMS]}
        if reset_below:
            args["reset_below"] = reset_below
        reply = await self.link.call(Op.STREAM_SYNC, args, timeout=15)
        unknown = reply.result.get("unknown", []) if isinstance(reply.result, dict) else []
        for sid in unknown if isinstance(unknown, list) else []:
            connection = self.connections.get(sid) if isinstance(sid, int) else None
            if connection is not None:
                connection.abort("the remote no longer knows this connection")

    async def _keep_lease(self) -> None:
        while True:
            await anyio.sleep(SYNC_EVERY_S)
            if self.connections and self.link.connected:
                try:
                    await self._sync()
                except TetherError as exc:
                    log.info("stream lease renewal failed: %s", exc)
