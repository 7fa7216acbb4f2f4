"""Port forwarding through the comm: reach a server on the remote (TensorBoard, Gradio, a
model server) at ``http://127.0.0.1:PORT`` on this machine.

``await t.forward(6006)`` listens on 127.0.0.1 (only), and carries each accepted connection
as one stream over the supervisor link (``forward_streams``). The listener stays up across
drops: connections open during a drop are reset, new ones work once the link is back.
Where the server runs jupyter-server-proxy (``<base>/proxy/<port>/`` answers), that URL is
offered too; the comm tunnel works either way.
"""

from __future__ import annotations

import errno
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import httpx2
from anyio.from_thread import BlockingPortal

from ..agent_payload import stream_state as st
from ..agent_payload.wire import Op, OpError
from ..credentials import redact
from ..errors import ConfigError, NotFound, TetherError
from .forward_streams import ByteCounters, StreamConnection, StreamLink, StreamMux, reset_local
from .rest import JupyterRest

PROXY_PROBE_TIMEOUT_S = 5.0
#: connections one forward carries at once (the supervisor allows
#: ``stream_state.MAX_STREAMS_PER_OWNER`` per controller)
MAX_CONNECTIONS = 128
#: forwards one tether keeps open at once (each is a listening socket here)
MAX_FORWARDS = 64


def check_forward_args(remote_port: Any, local_port: Any, remote_host: Any,
                       allow_remote_host: bool) -> None:
    """Refuse bad ports and hosts before anything listens (ConfigError says what to fix)."""
    try:
        st.check_port(remote_port, "remote_port")
        st.check_host(remote_host, allow_remote_host)
    except OpError as exc:
        raise ConfigError(exc.message) from None
    if not isinstance(local_port, int) or isinstance(local_port, bool) \
            or not 0 <= local_port <= 65535:
        raise ConfigError(f"local_port must be 0 (any free port) or 1..65535, got {local_port!r}")


async def server_proxy_url(rest: JupyterRest, port: int) -> str | None:
    """``<base>/proxy/<port>/`` when the server's jupyter-server-proxy answers there, else None.

    Without the extension the server answers 404; with it, a closed port gives a 5xx.
    The URL is returned with any credential in it redacted (open it with your token).
    """
    path = f"proxy/{port}/"
    try:
        with anyio.fail_after(PROXY_PROBE_TIMEOUT_S):
            async with rest.stream_get(path, {}) as response:
                status = response.status_code
    except (TimeoutError, httpx2.HTTPError, TetherError, OSError):
        return None
    if status == 404 or status >= 500:
        return None
    return redact(rest.target.http_url(path))


class PortForward:
    """A local port carried to a remote one: ``.local_port``, ``.url``, ``.close()``.

    ``async with await t.forward(6006) as fwd: ...`` closes it on exit. Counters:
    ``connections`` (accepted), ``active``, ``bytes_up`` (to the remote), ``bytes_down``.
    """

    def __init__(self, forwarder: Forwarder, listener: anyio.abc.SocketListener,
                 remote_port: int, remote_host: str, allow_remote_host: bool) -> None:
        self._forwarder = forwarder
        self._listener = listener
        self.remote_port = remote_port
        self.remote_host = remote_host
        self.allow_remote_host = allow_remote_host
        self.local_port: int = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.counters = ByteCounters()
        #: jupyter-server-proxy's URL for the same port, when the server has it
        self.proxy_url: str | None = None
        #: whether something listened on the remote port when the forward was made
        self.remote_listening: bool | None = None
        self.closed = False
        self._connections: set[StreamConnection] = set()
        self._scope: anyio.CancelScope | None = None
        self._done = anyio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}/"

    @property
    def remote(self) -> str:
        host = f"[{self.remote_host}]" if ":" in self.remote_host else self.remote_host
        return f"{host}:{self.remote_port}"

    def info(self) -> dict[str, Any]:
        c = self.counters
        return {"local_port": self.local_port, "url": self.url, "remote_host": self.remote_host,
                "remote_port": self.remote_port, "connections": c.connections,
                "active": c.active, "failed": c.failed, "bytes_up": c.bytes_up,
                "bytes_down": c.bytes_down, "last_error": c.last_error or None,
                "remote_listening": self.remote_listening, "proxy_url": self.proxy_url,
                "closed": self.closed}

    def __repr__(self) -> str:
        return f"<PortForward {self.url} -> remote {self.remote}{' closed' if self.closed else ''}>"

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                async with self._listener, anyio.create_task_group() as connections:
                    task_status.started()
                    while True:
                        stream = await self._listener.accept()
                        connections.start_soon(self._carry, stream)
        finally:
            self.closed = True
            self._done.set()

    async def _carry(self, stream: anyio.abc.SocketStream) -> None:
        counters = self.counters
        counters.connections += 1
        if counters.active >= MAX_CONNECTIONS:
            counters.failed += 1
            counters.last_error = (f"more than {MAX_CONNECTIONS} connections at once: new ones "
                                   "are reset until some close")
            reset_local(stream)
            await stream.aclose()
            return
        counters.active += 1
        connection = self._forwarder.mux.new(stream, counters)
        self._connections.add(connection)
        try:
            await connection.run(self.remote_port, self.remote_host, self.allow_remote_host)
        finally:
            counters.active -= 1
            self._connections.discard(connection)

    async def probe(self) -> bool:
        """Whether something listens on the remote port now (kept in ``remote_listening``);
        when it does, look for jupyter-server-proxy's URL of it too (``proxy_url``)."""
        self.remote_listening = await self._forwarder.probe(
            self.remote_port, self.remote_host, self.allow_remote_host)
        if self.remote_listening and self.remote_host in ("127.0.0.1", "localhost"):
            self.proxy_url = await self._forwarder.proxy_url(self.remote_port)
        return self.remote_listening

    async def close(self) -> None:
        """Stop listening and reset the connections still open."""
        self._forwarder.discard(self)
        for connection in list(self._connections):
            connection.abort("the forward was closed", tell_remote=True)
        if self._scope is not None:
            self._scope.cancel()
            await self._done.wait()
        self.closed = True

    aclose = close

    async def __aenter__(self) -> PortForward:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class Forwarder:
    """The port forwards of one tether, over one ``StreamMux``."""

    def __init__(self, link: StreamLink, rest: JupyterRest,
                 task_group: anyio.abc.TaskGroup) -> None:
        self.mux = StreamMux(link)
        self._rest = rest
        self._task_group = task_group
        self._forwards: list[PortForward] = []
        self._opening = 0  # opens in progress count against the limit too
        self.mux.start(task_group)

    async def open(self, remote_port: int, local_port: int = 0,
                   remote_host: str = "127.0.0.1", *,
                   allow_remote_host: bool = False) -> PortForward:
        check_forward_args(remote_port, local_port, remote_host, allow_remote_host)
        if len(self._forwards) + self._opening >= MAX_FORWARDS:
            raise ConfigError(f"{MAX_FORWARDS} forwards are open, the limit: close one first "
                              "(fwd.close(), or jupyter_port_forward_close)")
        self._opening += 1
        try:
            return await self._open(remote_port, local_port, remote_host, allow_remote_host)
        finally:
            self._opening -= 1

    async def _open(self, remote_port: int, local_port: int, remote_host: str,
                    allow_remote_host: bool) -> PortForward:
        try:
            listeners = await anyio.create_tcp_listener(local_host="127.0.0.1",
                                                        local_port=local_port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"local port {local_port} is already in use on this machine: "
                                  "choose another, or 0 for a free one") from None
            raise ConfigError(f"cannot listen on 127.0.0.1:{local_port}: {exc}") from None
        listener = listeners.listeners[0]  # one address given: one listener
        assert isinstance(listener, anyio.abc.SocketListener)
        forward = PortForward(self, listener, remote_port, remote_host, allow_remote_host)
        try:
            await forward.probe()
        except BaseException:
            await listener.aclose()
            raise
        await self._task_group.start(forward.serve)
        self._forwards.append(forward)
        return forward

    async def probe(self, port: int, host: str, allow_remote_host: bool) -> bool:
        """Whether something listens on the remote port now (a stream opened and reset)."""
        sid = self.mux.probe_sid()
        try:
            await self.mux.link.call(Op.STREAM_OPEN, {
                "owner": self.mux.owner, "sid": sid, "port": port, "host": host,
                "allow_remote_host": allow_remote_host, "window": st.MIN_WINDOW},
                timeout=30, idempotent=False)
        except NotFound:
            return False
        await self.mux.link.post(Op.STREAM_CLOSE, {"owner": self.mux.owner, "sid": sid,
                                                   "how": "reset"})
        return True

    async def proxy_url(self, port: int) -> str | None:
        return await server_proxy_url(self._rest, port)

    def discard(self, forward: PortForward) -> None:
        if forward in self._forwards:
            self._forwards.remove(forward)

    def list(self) -> list[dict[str, Any]]:
        return [forward.info() for forward in self._forwards]

    def find(self, local_port: int) -> PortForward | None:
        return next((f for f in self._forwards if f.local_port == local_port), None)

    async def aclose(self) -> None:
        """Close every forward and drop their streams on the remote."""
        for forward in list(self._forwards):
            await forward.close()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self.mux.reset_all("the tether is closing")
        self.mux.stop()


class BlockingPortForward:
    """``Tether.forward``'s result: the same forward, with a blocking ``close``."""

    def __init__(self, portal: BlockingPortal, forward: PortForward) -> None:
        self._portal = portal
        self.aio = forward

    @property
    def local_port(self) -> int:
        return self.aio.local_port

    @property
    def url(self) -> str:
        return self.aio.url

    @property
    def proxy_url(self) -> str | None:
        return self.aio.proxy_url

    @property
    def remote_listening(self) -> bool | None:
        return self.aio.remote_listening

    def info(self) -> dict[str, Any]:
        return self._portal.call(self.aio.info)

    def probe(self) -> bool:
        """Whether something listens on the remote port now."""
        return self._portal.call(self.aio.probe)

    def close(self) -> None:
        self._portal.call(self.aio.close)

    def __enter__(self) -> BlockingPortForward:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self.aio)

