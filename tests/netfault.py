"""A cuttable TCP proxy for network-fault tests: forward, close cleanly, reset, blackhole, heal.

``FaultProxy`` listens on a random loopback port and forwards every connection to an
upstream (the Jupyter server). It runs its own asyncio loop on a daemon thread, so it works
the same under the blocking ``Tether`` (whose loop runs on a portal thread) and under async
tests. Its fault methods are synchronous and return once the fault is in place:

- ``cut()``: FIN both sides of every current connection; new ones are closed at once until
  ``heal()``;
- ``reset()``: the same with RST (``SO_LINGER`` 0, then close);
- ``blackhole()``: current connections stay open but every byte, both ways, is silently
  dropped (no FIN or RST ever arrives; only keepalive notices); new connections are accepted
  and never forwarded (``new="drop"``) or held and forwarded after ``heal()`` (``new="hold"``,
  what a client's SYN retransmit sees when the route comes back);
- ``deny(status)``: current connections are cut and new ones get an HTTP error (a rotated
  token or URL), until ``heal()``;
- ``heal()``: forward new connections again. Connections broken by a fault stay broken.

``proxied_server`` is the pytest fixture: ``(proxy, url, token)`` in front of the session's
``jupyter_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import pytest

from jupyter_tether.controller.embedded import LocalJupyterServer

T = TypeVar("T")
Mode = Literal["forward", "closed", "reset", "blackhole", "deny"]

_CHUNK = 256 * 1024
_QUICKACK = getattr(socket, "TCP_QUICKACK", None) if sys.platform.startswith("linux") else None
_REASONS = {401: "Unauthorized", 403: "Forbidden", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass
class ProxyCounters:
    """What went through the proxy; ``bytes_up`` is client -> server."""

    bytes_up: int = 0
    bytes_down: int = 0
    dropped_up: int = 0
    dropped_down: int = 0
    connections: int = 0
    forwarded: int = 0
    #: answered at once with FIN, RST or an HTTP error while the path was down
    refused: int = 0
    #: accepted during a blackhole and not forwarded (swallowed, or held until heal)
    held: int = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False)
class _Connection:
    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    upstream_reader: asyncio.StreamReader | None = None
    upstream_writer: asyncio.StreamWriter | None = None
    #: which directions swallow their bytes: "up" is client -> server
    blackholed: frozenset[str] = frozenset()
    held: bool = False
    ended: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client_writer, self.upstream_writer) if w is not None]


_Closer = Callable[[asyncio.StreamWriter], None]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter) -> None:
    """Close with FIN (after whatever is already buffered)."""
    with contextlib.suppress(Exception):
        writer.close()


class FaultProxy:
    """An in-process TCP proxy to ``upstream`` whose link can be broken on demand."""

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.counters = ProxyCounters()
        self._mode: Mode = "forward"
        self._deny_status = 403
        self._blackhole_new: Literal["drop", "hold"] = "drop"
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @classmethod
    def for_url(cls, url: str) -> FaultProxy:
        parts = urlsplit(url)
        assert parts.hostname and parts.port, url
        return cls(parts.hostname, parts.port)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, self.host, 0))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # pragma: no cover - reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._teardown())
                loop.close()
                self._stopped.set()

        self._thread = threading.Thread(target=run, name=f"fault-proxy-{id(self):x}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError(f"fault proxy did not start: {failure}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url_for(self, base_url: str) -> str:
        """``base_url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(base_url)
        return parts._replace(netloc=f"{self.host}:{self.port}").geturl()

    # --- faults (thread-safe, synchronous) ----------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    def cut(self, *, stay_down: bool = True) -> int:
        """FIN every current connection; with ``stay_down``, close new ones until ``heal``.

        Without ``stay_down`` the mode is left as it was (after ``heal``: forwarding).
        Returns how many connections were broken.
        """
        return self._run(self._break_all("closed", stay_down, _close))

    def reset(self, *, stay_down: bool = True) -> int:
        """RST every current connection; with ``stay_down``, reset new ones until ``heal``."""
        return self._run(self._break_all("reset", stay_down, _reset))

    def blackhole(self, *, new: Literal["drop", "hold"] = "drop",
                  direction: Literal["both", "up", "down"] = "both") -> int:
        """Silently drop the bytes of current connections; do not forward new ones.

        ``direction="down"`` drops only what the server sends: requests still arrive and
        run, their replies are lost (the case idempotent retries must get right).
        """
        return self._run(self._blackhole(new, direction))

    def deny(self, status: int = 403) -> int:
        """Cut current connections and answer new ones with an HTTP ``status``."""
        self._deny_status = status
        return self._run(self._break_all("deny", True, _close))

    def heal(self) -> None:
        """Forward new connections again (and release held ones)."""
        self._run(self._heal())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "start the proxy first"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _break_all(self, mode: Mode, stay_down: bool, closer: _Closer) -> int:
        if stay_down:
            self._mode = mode
        broken = list(self._connections)
        for conn in broken:
            self._drop(conn, closer)
        return len(broken)

    async def _blackhole(self, new: Literal["drop", "hold"], direction: str) -> int:
        self._mode = "blackhole"
        self._blackhole_new = new
        dropped = frozenset({"up", "down"} if direction == "both" else {direction})
        for conn in self._connections:
            conn.blackholed = dropped
        return len(self._connections)

    async def _heal(self) -> None:
        self._mode = "forward"
        for conn in list(self._connections):
            if conn.held and not conn.blackholed:
                await self._connect_upstream(conn)

    # --- connections --------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(reader, writer)
        mode = self._mode
        if mode in ("closed", "reset"):
            self.counters.refused += 1
            (_reset if mode == "reset" else _close)(writer)
            return
        if mode == "deny":
            self.counters.refused += 1
            await self._answer_http_error(conn)
            return
        self._connections.add(conn)
        if mode == "blackhole":
            self.counters.held += 1
            if self._blackhole_new == "drop":
                conn.blackholed = frozenset({"up", "down"})
                self._start(conn, self._pump(conn, reader, None, up=True))
            else:
                # Not read at all: its bytes wait in the kernel's buffer until heal().
                conn.held = True
            return
        await self._connect_upstream(conn)

    async def _connect_upstream(self, conn: _Connection) -> None:
        conn.held = False
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 10)
        except (OSError, TimeoutError):
            self._drop(conn, _reset)
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.upstream_reader, conn.upstream_writer = reader, writer
        self.counters.forwarded += 1
        self._start(conn, self._pump(conn, conn.client_reader, writer, up=True))
        self._start(conn, self._pump(conn, reader, conn.client_writer, up=False,
                                     quickack=sock))

    def _start(self, conn: _Connection, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        conn.tasks.append(self._loop.create_task(coro))

    async def _pump(self, conn: _Connection, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter | None, *, up: bool,
                    quickack: Any = None) -> None:
        """Copy one direction; in a blackhole, swallow bytes and never pass on FIN or RST.

        ``quickack`` is the upstream socket: ACK the server at once after every read, as the
        real client does, or the server's Nagle would add ~40 ms to every round trip here.
        """
        error = False
        direction = "up" if up else "down"
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if quickack is not None and _QUICKACK is not None:
                    with contextlib.suppress(OSError):
                        quickack.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                if direction in conn.blackholed or writer is None:
                    if up:
                        self.counters.dropped_up += len(data)
                    else:
                        self.counters.dropped_down += len(data)
                    continue
                writer.write(data)
                if up:
                    self.counters.bytes_up += len(data)
                else:
                    self.counters.bytes_down += len(data)
                await writer.drain()
        except (OSError, RuntimeError):
            error = True
        conn.ended += 1
        if conn.blackholed or writer is None:
            # Nothing crosses a blackhole; forget the pair once both ends have left.
            if conn.ended >= len(conn.tasks):
                self._drop(conn, _close)
            return
        if error:
            self._drop(conn, _reset)
        elif conn.ended >= len(conn.tasks):
            self._drop(conn, _close)
        else:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()

    async def _answer_http_error(self, conn: _Connection) -> None:
        status = self._deny_status
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                await asyncio.wait_for(conn.client_reader.readuntil(b"\r\n\r\n"), 5)
            body = (b'{"message": "%d %s from the fault proxy", "reason": null}'
                    % (status, _REASONS.get(status, "Error").encode()))
            head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            conn.client_writer.write(head + body)
            await conn.client_writer.drain()
        except (OSError, TimeoutError):
            pass
        _close(conn.client_writer)

    def _drop(self, conn: _Connection, closer: _Closer) -> None:
        self._connections.discard(conn)
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()
        for writer in conn.writers():
            closer(writer)

    async def _teardown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            self._drop(conn, _reset)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)


@contextlib.contextmanager
def fault_proxy(url: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy.for_url(url).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def proxied_server(jupyter_server: LocalJupyterServer) -> Iterator[tuple[FaultProxy, str, str]]:
    """A fresh fault proxy in front of the session's Jupyter server: (proxy, url, token)."""
    with fault_proxy(jupyter_server.url) as proxy:
        yield proxy, proxy.url_for(jupyter_server.url), jupyter_server.token
