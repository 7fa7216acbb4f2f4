"""``Caller``: what the job, file and submit services need of a link to one supervisor.

The services send ops and receive events through this small protocol and never see the
websocket, the kernel or the REST client behind it, as an httpx client sees only its
transport. ``SupervisorLink`` is the real one (a comm over a kernel websocket that survives
drops); the tests' in-process caller drives a ``Supervisor`` object directly, so the
services' behaviour can be tested without a Jupyter server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import httpx2

from .rpc import Event, Reply

#: called with every event the supervisor publishes, on the event loop, in ``seq`` order
EventListener = Callable[[Event], None]


class Caller(Protocol):
    """A link to one supervisor: calls, events, and the server's ``/files`` beside it."""

    @property
    def where(self) -> str:
        """Where the supervisor runs, for messages and records (the server's URL)."""

    @property
    def connected(self) -> bool:
        """Whether the link is up now (after a ConnectionLost: whether it came back)."""

    @property
    def files_root(self) -> str | None:
        """The directory the server's ``GET /files`` serves (the supervisor's root), or
        None where there is no such route: downloads then use comm chunks only."""

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   buffers: Sequence[bytes] = (), timeout: float | None = 60.0,
                   idempotent: bool = True) -> Reply:
        """Send ``op`` (a ``wire.Op``) and return its reply.

        Raises RemoteError (typed by its code) for an error reply, TetherTimeout after
        ``timeout`` seconds, and ConnectionLost when the link is down for too long, or
        dropped while a call that is not ``idempotent`` was in flight (it may have run).
        """

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        """Receive every event from now on; returns a function that stops it."""

    def on_reattach(self, hook: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        """Run ``hook`` after the link comes back from a drop; returns a remover."""

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``func(*args)`` in the background, for as long as the link is open."""

    def stream_get(self, url_path: str,
                   headers: dict[str, str]) -> AbstractAsyncContextManager[httpx2.Response]:
        """``async with caller.stream_get(path, headers) as response``: a streamed GET."""

    def files_request(self, url_path: str) -> tuple[str, dict[str, str]]:
        """The full URL and the headers (credentials, cookies) of a GET of ``url_path``,
        for a client of one's own: bulk downloads read ``/files`` off the event loop."""
