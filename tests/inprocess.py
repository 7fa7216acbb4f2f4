"""``InProcess``: a real ``Supervisor`` in this process, behind the controller's ``Caller``.

No Jupyter, no kernel, no socket: requests go to ``Supervisor.handle`` as bytes, replies and
events come back through its ``send`` (from the calling thread or a worker thread) as they
would over the comm. Two faces over one supervisor:

- the ``Caller`` protocol (async, asyncio): ``AsyncFiles(caller)``, ``AsyncJobs(caller)``
  and ``Submits`` run against it exactly as against a ``SupervisorLink``. Errors are the
  controller's typed ``RemoteError``; a ``busy`` reply is re-sent, as the link does.
  ``mangle`` rewrites replies (a hostile remote); ``restart()`` replaces the supervisor
  with a new one on the same root (a kernel restart) and runs the re-attach hooks.
- a blocking wire face for payload tests: ``submit``/``take`` raw requests and every reply,
  ``request``, ``ok``, ``err``, ``fails``, and the ``events`` it published.

``files_root`` is None (there is no ``GET /files`` here): downloads use comm chunks.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import httpx2
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from jupyter_tether.agent_payload import app, wire
from jupyter_tether.agent_payload.supervisor import Supervisor
from jupyter_tether.controller.caller import Caller, EventListener
from jupyter_tether.controller.files import AsyncFiles
from jupyter_tether.controller.jobs import AsyncJobs
from jupyter_tether.controller.rpc import Event, Reply
from jupyter_tether.controller.submit import Submits
from jupyter_tether.errors import ConnectionLost, RemoteError, TetherTimeout

T = TypeVar("T")
Envelope = dict[str, Any]
Message = tuple[Envelope, list[bytes]]
#: ``mangle(op, reply) -> reply``: what a hostile remote answers instead
Mangle = Callable[[str, Reply], Reply]


def _same_id(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


class InProcess:
    """A Supervisor driven in this process: a ``Caller`` and a blocking wire harness."""

    def __init__(self, root: Path, *, state_dir: Path | None = None,
                 where: str = "in-process", **supervisor_options: Any) -> None:
        self.root = root
        self._state_dir = str(state_dir) if state_dir is not None else None
        self._options = supervisor_options
        self._where = where
        self.connected = True
        self.mangle: Mangle | None = None
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        #: replies nobody awaits (the blocking face), and every event, in arrival order
        self.replies: list[Message] = []
        self.events: list[Message] = []
        self._waiters: dict[Any, tuple[asyncio.AbstractEventLoop, asyncio.Future[Message]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[EventListener] = []
        self._hooks: list[Callable[[], Awaitable[None]]] = []
        self._task_group: anyio.abc.TaskGroup | None = None
        self.supervisor = self._new_supervisor()

    def _new_supervisor(self) -> Supervisor:
        return app.create_supervisor(self._send, root_dir=str(self.root),
                                     state_dir=self._state_dir, **self._options)

    # --- the supervisor's side: its send() --------------------------------------------------

    def _send(self, data: bytes, blobs: Sequence[bytes], channel: Any) -> None:
        """Any thread, maybe under the supervisor's locks: records and hands over, never waits."""
        envelope, _ = wire.decode(data, wire.MAX_REPLY_ENVELOPE_BYTES)
        message = (envelope, [bytes(b) for b in blobs])
        with self._cond:
            if envelope.get("type") == "event":
                self.events.append(message)
                loop = self._loop if self._listeners else None
                if loop is not None:
                    event = Event(int(envelope["seq"]), str(envelope.get("event")),
                                  envelope.get("body") or {}, message[1])
                    loop.call_soon_threadsafe(self._dispatch, event)
            else:
                waiter = self._waiters.pop(envelope.get("id"), None)
                if waiter is None:
                    self.replies.append(message)
                else:
                    loop, future = waiter
                    loop.call_soon_threadsafe(_settle, future, message)
            self._cond.notify_all()

    def _dispatch(self, event: Event) -> None:
        for listener in list(self._listeners):
            listener(event)

    # --- the Caller protocol -----------------------------------------------------------------

    @property
    def where(self) -> str:
        return self._where

    @property
    def files_root(self) -> str | None:
        return None

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   buffers: Sequence[bytes] = (), timeout: float | None = 60.0,
                   idempotent: bool = True) -> Reply:
        if not self.connected:
            raise ConnectionLost(f"cannot run {op!r}: the in-process link is down")
        self._attach()
        try:
            with anyio.fail_after(timeout):
                while True:
                    envelope, blobs = await self._roundtrip(op, args or {}, list(buffers))
                    error = envelope.get("error") or {}
                    if envelope.get("ok") or error.get("code") != wire.ErrorCode.BUSY:
                        break
                    await anyio.sleep(0.25)  # "not run, retry": a supervisor on its way out
        except TimeoutError:
            raise TetherTimeout(f"{op!r} got no reply within {timeout}s") from None
        if not envelope.get("ok"):
            raise RemoteError.from_wire(error)
        reply = Reply(envelope.get("result"), blobs)
        return self.mangle(op, reply) if self.mangle is not None else reply

    async def _roundtrip(self, op: str, args: dict[str, Any], buffers: list[bytes]) -> Message:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()
        request_id = next(self._ids)
        with self._cond:
            self._waiters[request_id] = (loop, future)
        try:
            self.supervisor.handle(wire.encode(wire.request(request_id, op, args)), buffers,
                                   "in-process")
            return await future
        finally:
            with self._cond:
                self._waiters.pop(request_id, None)

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        self._attach()
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def on_reattach(self, hook: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook) if hook in self._hooks else None

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._task_group is None:
            raise RuntimeError("background tasks need `async with InProcess(...)`")
        self._task_group.start_soon(func, *args)

    def stream_get(self, url_path: str,
                   headers: dict[str, str]) -> AbstractAsyncContextManager[httpx2.Response]:
        raise AssertionError("no GET /files in-process: files_root is None")

    def files_request(self, url_path: str) -> tuple[str, dict[str, str]]:
        raise AssertionError("no GET /files in-process: files_root is None")

    def _attach(self) -> None:
        with self._cond:
            self._loop = asyncio.get_running_loop()

    async def __aenter__(self) -> InProcess:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        group, self._task_group = self._task_group, None
        if group is not None:
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)
        self.close()

    def replace_supervisor(self) -> None:
        """A supervisor kernel restart as the payload sees it: a new one on the same root."""
        self.supervisor.close()
        self.supervisor = self._new_supervisor()

    async def restart(self) -> None:
        """A supervisor kernel restart: a new supervisor on the same root, then re-attach."""
        self.replace_supervisor()
        for hook in list(self._hooks):
            self.start_soon(hook)

    def close(self) -> None:
        self.supervisor.close()

    # --- the blocking wire face (payload tests) ---------------------------------------------

    def send_raw(self, data: Any, buffers: Sequence[Any] = (), channel: Any = "test") -> None:
        """Hand ``data`` (bytes or anything hostile) to the supervisor as a comm message."""
        self.supervisor.handle(data, list(buffers), channel)

    def submit(self, op: str, args: dict[str, Any] | None = None,
               buffers: Sequence[bytes] = (), request_id: Any = None) -> Any:
        """Send a request without waiting; returns its id."""
        request_id = f"t{next(self._ids)}" if request_id is None else request_id
        self.send_raw(wire.encode(wire.request(request_id, op, args)), buffers)
        return request_id

    def wait_for(self, predicate: Callable[[], Any], timeout: float) -> bool:
        """Wait until ``predicate()`` (checked whenever something arrives) holds."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def has_reply(self, request_id: Any) -> bool:
        with self._cond:
            return any(_same_id(e.get("id"), request_id) for e, _ in self.replies)

    def take(self, request_id: Any, timeout: float = 20.0) -> list[Message]:
        """Wait for a reply to ``request_id``; return (and forget) every reply with that id."""
        if not self.wait_for(lambda: self.has_reply(request_id), timeout):
            raise AssertionError(f"no reply to request {request_id!r} within {timeout} s")
        with self._cond:
            found = [m for m in self.replies if _same_id(m[0].get("id"), request_id)]
            self.replies = [m for m in self.replies if not _same_id(m[0].get("id"), request_id)]
        return found

    def clear_replies(self) -> None:
        """Forget the replies nobody took (to requests with ids no one can wait for)."""
        with self._cond:
            self.replies.clear()

    def wait(self, request_id: Any, timeout: float = 20.0) -> Message:
        (message,) = self.take(request_id, timeout)
        return message

    def request(self, op: str, args: dict[str, Any] | None = None,
                buffers: Sequence[bytes] = (), timeout: float = 20.0) -> Message:
        return self.wait(self.submit(op, args, buffers), timeout)

    def ok_full(self, op: str, args: dict[str, Any] | None = None,
                buffers: Sequence[bytes] = (), timeout: float = 20.0) -> tuple[Any, list[bytes]]:
        """The result and blobs of a request that must succeed (RemoteError if it fails)."""
        envelope, blobs = self.request(op, args, buffers, timeout)
        if not envelope["ok"]:
            raise RemoteError.from_wire(envelope["error"])
        return envelope["result"], blobs

    def ok(self, op: str, args: dict[str, Any] | None = None,
           buffers: Sequence[bytes] = (), timeout: float = 20.0) -> Any:
        return self.ok_full(op, args, buffers, timeout)[0]

    def err(self, op: str, args: dict[str, Any] | None = None,
            buffers: Sequence[bytes] = ()) -> dict[str, Any]:
        """The error of a request that must fail, as the wire carries it."""
        envelope, _ = self.request(op, args, buffers)
        assert not envelope["ok"], envelope
        error: dict[str, Any] = envelope["error"]
        return error

    def fails(self, code: str, op: str, args: dict[str, Any] | None = None,
              buffers: Sequence[bytes] = ()) -> RemoteError:
        """The typed error of a request that must fail with ``code``."""
        error = RemoteError.from_wire(self.err(op, args, buffers))
        assert error.code == code, error
        return error

    def wait_event(self, predicate: Callable[[Envelope], bool], timeout: float = 15.0) -> Envelope:
        """The first event (already published or still to come) that ``predicate`` accepts."""
        found: list[Envelope] = []

        def match() -> bool:
            found[:] = [e for e, _ in self.events if predicate(e)]
            return bool(found)

        assert self.wait_for(match, timeout), "the event never came"
        return found[0]


def _settle(future: asyncio.Future[Message], message: Message) -> None:
    if not future.done():  # a call that timed out or was cancelled meanwhile
        future.set_result(message)


def until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``predicate`` until it returns something true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture(name="remote")
def remote_fixture(tmp_path: Path) -> Any:
    """``remote``: an ``InProcess`` supervisor on a fresh root directory (``remote.root``).

    A test module imports ``remote_fixture`` to get it."""
    root = tmp_path / "remote-root"
    root.mkdir()
    harness = InProcess(root)
    yield harness
    harness.close()


class Services:
    """The controller's services on an ``InProcess`` supervisor, for blocking tests: every
    call runs on a portal's event loop (its own thread), as ``Tether`` runs them."""

    def __init__(self, portal: BlockingPortal, remote: InProcess) -> None:
        self.portal = portal
        self.remote = remote
        self.root = remote.root
        self.files = AsyncFiles(remote)
        self.jobs = AsyncJobs(remote)
        self.submits = Submits(remote, self.files, self.jobs)

    def run(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return self.portal.call(functools.partial(func, *args, **kwargs))


@pytest.fixture(name="services")
def services_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """``services``: ``Services`` on a fresh in-process supervisor, its root outside
    ``tmp_path`` (which stays the test's own). A test module imports ``services_fixture``."""
    remote = InProcess(tmp_path_factory.mktemp("remote-root"))
    with start_blocking_portal("asyncio") as portal, \
            portal.wrap_async_context_manager(remote):
        yield Services(portal, remote)


_: type[Caller] = InProcess  # InProcess must stay a Caller
