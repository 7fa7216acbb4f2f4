"""The link to the remote supervisor: inject, attach, call ops, receive events, reconnect.

One websocket to the dedicated supervisor kernel carries one comm. ``call`` sends a request
and waits for its reply across reconnects (idempotent ops are re-sent; others fail with
``ConnectionLost`` saying they may have run). Events are deduplicated by ``seq`` and gaps are
filled from the supervisor's replay ring. A maintainer task notices drops (keepalive pings,
closed sockets, kernel restarts) and reconnects with jittered exponential backoff, re-using
the same websocket ``session_id`` so the server replays what it buffered. The attach steps
themselves (open, install, park, probe) are in ``attach``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import httpx2

from ..agent_payload import wire
from ..errors import AuthError, ConnectionLost, KernelError, TetherError, TetherTimeout
from .attach import inject, open_watching, park_subshell, probe_server
from .caller import EventListener
from .kernel_requests import kernel_info
from .kernel_ws import OPEN_TIMEOUT_S, KernelMessage, KernelSocket
from .kernels import SUPERVISOR_SESSION, discard_failed_start, find_or_start
from .rest import JupyterRest
from .rpc import Event, EventSequencer, PendingCall, PendingCalls, Reply
from .state import TargetState
from .target import Target

#: reconnect jitter from a generator of our own: a notebook that seeds `random` for
#: reproducible results must not see its sequence move when the link reconnects
_JITTER = random.Random()
log = logging.getLogger(__name__)

#: bulk messages (tunnel bytes) wait until the websocket holds less than this unsent, so a
#: small call sent meanwhile queues behind at most about this much
BULK_LOW_WATER = 256 * 1024

#: gets each ``stream`` message of our comm: its envelope and blobs (see stream_state)
StreamHandler = Callable[[dict[str, Any], list[bytes]], None]


@dataclass
class LinkOptions:
    """Tunables of the link; the defaults suit a remote server over the internet."""

    kernel_name: str = "python3"
    #: keepalive: a ping this often; the link is declared dead after ``ping_timeout`` s with
    #: no pong and no byte received (bytes count, so a busy slow link is never cut)
    ping_interval: float = 2.0
    ping_timeout: float = 4.0
    #: how long a call made while disconnected waits for the link to come back
    reconnect_wait: float = 60.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    use_subshell: bool = True
    remote_state_dir: str | None = None
    #: the largest websocket message accepted from the server; a bigger one closes the
    #: connection and fails the calls in flight with LimitExceeded (one that may be re-sent
    #: only on a second such close: the message may have been another controller's)
    max_message_bytes: int = wire.MAX_KERNEL_MESSAGE_BYTES
    #: how long the supervisor kernel's websocket may take to open
    open_timeout: float = OPEN_TIMEOUT_S


class SupervisorLink:
    """Owns the supervisor kernel's websocket and comm, and keeps them alive.

    It is the services' ``Caller``: they reach the supervisor only through the methods
    under "public".
    """

    def __init__(self, target: Target, rest: JupyterRest, state: TargetState,
                 options: LinkOptions | None = None) -> None:
        self.target = target
        self.rest = rest
        self.state = state
        self.options = options or LinkOptions()
        self.session_id = state.claim_session_id("supervisor")
        self.kernel_id: str | None = None
        self.comm_id: str | None = None
        # Comms this link opened lately: a reply on an older one still answers our request.
        self._comm_ids: collections.deque[str] = collections.deque(maxlen=8)
        self.subshell_id: str | None = None
        self.facts: dict[str, Any] = {}
        self.install_outcome = ""
        self.reconnects = 0
        self.last_error = ""
        #: why the link last dropped, and when (kept after it comes back, for ``status``)
        self.last_drop = ""
        self.last_drop_at: float | None = None
        self._auth_error: AuthError | None = None
        self.connected_at: float | None = None
        self._sock: KernelSocket | None = None
        self._codec = wire.JSON
        self._generation = 0
        self._connected = anyio.Event()
        self._closing = False
        self._pending = PendingCalls()
        self._sequencer = EventSequencer()
        self._listeners: list[EventListener] = []
        self._reattach_hooks: list[Callable[[], Awaitable[None]]] = []
        self._task_group: anyio.abc.TaskGroup | None = None
        self._replay_requested = False
        self._retry_now = anyio.Event()
        self._stream_handler: StreamHandler | None = None
        self._drop_hooks: list[Callable[[], None]] = []
        self._post_ids = itertools.count(1)
        self._bulk_lock = anyio.Lock()

    # --- public ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def where(self) -> str:
        return self.target.display_url

    @property
    def files_root(self) -> str | None:
        root = self.facts.get("root_dir")
        return str(root) if root else None

    def start_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._task_group is None:
            raise ConnectionLost("the link is not open")
        self._task_group.start_soon(func, *args)

    def stream_get(self, url_path: str,
                   headers: dict[str, str]) -> AbstractAsyncContextManager[httpx2.Response]:
        return self.rest.stream_get(url_path, headers)

    def files_request(self, url_path: str) -> tuple[str, dict[str, str]]:
        headers = {**self.target.auth_headers(), "User-Agent": "jupyter-tether"}
        cookie = self.rest.cookie_header(url_path)
        if cookie:
            headers["Cookie"] = cookie
        return self.target.http_url(url_path), headers

    @property
    def last_seq(self) -> int:
        return self._sequencer.contiguous

    async def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """First connect (errors propagate to the caller), then keep the link alive."""
        self._task_group = task_group
        await self._connect()
        task_group.start_soon(self._maintain)

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def on_reattach(self, hook: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        """Run ``hook`` after every reconnect (to re-subscribe follows, say); returns a remover."""
        self._reattach_hooks.append(hook)
        return lambda: self._reattach_hooks.remove(hook) if hook in self._reattach_hooks else None

    def on_drop(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call ``hook`` (sync) as soon as a drop is noticed; returns a remover."""
        self._drop_hooks.append(hook)
        return lambda: self._drop_hooks.remove(hook) if hook in self._drop_hooks else None

    def set_stream_handler(self, handler: StreamHandler | None) -> None:
        """Route the supervisor's ``stream`` messages on our comm to ``handler``."""
        self._stream_handler = handler

    @property
    def generation(self) -> int:
        """Bumped on every (re)connect: what was sent on an older one is gone."""
        return self._generation

    async def post(self, op: str, args: dict[str, Any], buffers: Sequence[bytes] = (), *,
                   bulk: bool = False) -> None:
        """Send a one-way request now (no reply is awaited, none is re-sent after a drop).

        ``bulk`` messages go one at a time, and only once the websocket has sent most of
        what it holds: calls and small posts never queue behind more than
        ``BULK_LOW_WATER`` of tunnel bytes. Raises ConnectionLost when the link is down.
        """
        if bulk:
            async with self._bulk_lock:
                while True:
                    sock = self._sock
                    if sock is None or not self.connected or sock.closed.is_set():
                        break
                    if sock.write_buffer_size() <= BULK_LOW_WATER:
                        break
                    await anyio.sleep(0.0005)
                await self._post_now(op, args, buffers)
        else:
            await self._post_now(op, args, buffers)

    async def _post_now(self, op: str, args: dict[str, Any], buffers: Sequence[bytes]) -> None:
        sock = self._sock
        if sock is None or not self.connected:
            raise ConnectionLost(f"cannot send {op!r}: the link to {self.target.display_url} "
                                 "is down")
        # String ids: a reply to a post (an error) can never match a pending call's int id.
        envelope = wire.encode(wire.request(f"p{next(self._post_ids)}", op, args), self._codec)
        msg = sock.build("comm_msg", {"comm_id": self.comm_id, "data": {"tether": 1}},
                         header_extra=self._subshell_header())
        await sock.send(msg, [envelope, *buffers])

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   buffers: Sequence[bytes] = (), timeout: float | None = 60.0,
                   idempotent: bool = True) -> Reply:
        """Send ``op`` and return its reply; raise RemoteError, ConnectionLost or TetherTimeout."""
        call = self._pending.new(op, args or {}, list(buffers), idempotent)
        try:
            with anyio.fail_after(timeout):
                while True:
                    if call.done:
                        if call.error is None or call.error.code != wire.ErrorCode.BUSY:
                            break
                        # "Not run, retry" (whatever the op): a supervisor on its way out,
                        # in a kernel restart or an upgrade; its successor answers shortly.
                        await anyio.sleep(0.25)
                        call.error, call.sent_generation = None, -1
                        call.rearm()
                    await self._wait_connected(op)
                    if call.done:
                        # Answered while we waited: on reconnect the server replays the
                        # replies it buffered for our session. Re-sending would run it twice
                        # and wait for a second reply that resolve() ignores.
                        continue
                    if call.sent_generation != self._generation:
                        self._check_resendable(call)
                        call.rearm()
                        await self._send_request(call)
                    await call.wakeup.wait()
                    if call.done:
                        continue
                    if not self.connected:
                        # Say so now rather than after the link is back (or never).
                        self._check_resendable(call)
                    call.rearm()
                if call.failure is not None:
                    raise call.failure
                if call.error is not None:
                    raise call.error
                assert call.reply is not None
                return call.reply
        except TimeoutError:
            if not self.connected:
                raise ConnectionLost(
                    f"{op!r} got no reply within {timeout}s: the link to "
                    f"{self.target.display_url} is down ({self.last_error or 'reconnecting'})"
                ) from None
            raise TetherTimeout(f"{op!r} got no reply within {timeout}s") from None
        finally:
            self._pending.discard(call)

    @staticmethod
    def _check_resendable(call: PendingCall) -> None:
        if call.sent_generation >= 0 and not call.idempotent:
            raise ConnectionLost(
                f"the connection dropped while {call.op!r} was in flight; it may or "
                "may not have run on the remote: check before retrying"
            )

    async def aclose(self) -> None:
        self._closing = True
        self.state.release_session_id(self.session_id)
        if self._sock is not None:
            if self.comm_id is not None:
                msg = self._sock.build("comm_close", {"comm_id": self.comm_id, "data": {}},
                                       header_extra=self._subshell_header())
                try:
                    await self._sock.send(msg)
                except ConnectionLost:
                    pass
            await self._sock.aclose()
        self._connected = anyio.Event()
        self._pending.wake_all()

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "kernel_id": self.kernel_id,
            "session_id": self.session_id,
            "comm_id": self.comm_id,
            "subshell_id": self.subshell_id,
            "protocol": self._sock.protocol if self._sock else None,
            "codec": self._codec,
            "install": self.install_outcome,
            "payload_hash": self.facts.get("payload_hash"),
            "supervisor_pid": self.facts.get("pid"),
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "last_drop": self.last_drop,
            "last_drop_at": self.last_drop_at,
            "last_seq": self.last_seq,
            "connected_since": self.connected_at,
        }

    # --- connecting -----------------------------------------------------------------------

    async def _wait_connected(self, op: str) -> None:
        if not self._connected.is_set():
            self._retry_now.set()  # someone waits: no need to sit out the backoff
        deadline = anyio.current_time() + self.options.reconnect_wait
        while not self._connected.is_set():
            if self._closing:
                raise ConnectionLost("the tether is closed")
            if self._auth_error is not None:
                # Waiting cannot help: the server refuses these credentials.
                raise AuthError(
                    f"cannot run {op!r}: {self._auth_error} The supervisor and its jobs are "
                    "still there: connect again with the fresh URL to re-attach to them."
                )
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                break
            # Poll: ``_connected`` is replaced on every drop, and closing or an auth failure
            # must end the wait as well.
            with anyio.move_on_after(min(remaining, 0.25)):
                await self._connected.wait()
        else:
            return
        raise ConnectionLost(
            f"cannot run {op!r}: the link to {self.target.display_url} has been down for "
            f"{self.options.reconnect_wait:.0f}s (last error: {self.last_error or 'unknown'})"
        )

    async def _open_supervisor_kernel(self) -> tuple[str, KernelSocket, dict[str, Any], str]:
        """Find or start the supervisor kernel, open its websocket and install the payload:
        its id, the open socket, its ``kernel_info`` and how the install went.

        A kernel started just now whose websocket never opens, that the server drops while
        we connect, or that dies or restarts under the install, is replaced once
        (``discard_failed_start`` says why)."""
        assert self._task_group is not None
        for attempt in (1, 2):
            kernel_id, started = await find_or_start(
                self.rest, SUPERVISOR_SESSION, kernel_name=self.options.kernel_name,
                state=self.state, open_timeout=self.options.open_timeout)
            sock = KernelSocket(self.target, kernel_id, session_id=self.session_id,
                                cookies=self.rest.cookie_header,
                                ping_interval=self.options.ping_interval,
                                ping_timeout=self.options.ping_timeout,
                                max_message_bytes=self.options.max_message_bytes,
                                open_timeout=self.options.open_timeout)
            opened = False
            try:
                await open_watching(sock, kernel_id, self.rest, self._task_group)
                opened = True
                sock.comm_handler = self._on_comm
                info = await kernel_info(sock)
                outcome = await inject(sock, kernel_id, self.options.remote_state_dir)
            except (ConnectionLost, KernelError) as exc:
                await sock.aclose()
                # Not a failed start: an install that failed in a kernel that stayed up.
                came_up = opened and not isinstance(exc, ConnectionLost) and not sock.kernel_lost
                if not started or attempt == 2 or came_up:
                    raise
                await discard_failed_start(self.rest, "supervisor", kernel_id, exc)
                continue
            except BaseException:
                await sock.aclose()
                raise
            return kernel_id, sock, info, outcome
        raise AssertionError("unreachable")

    async def _connect(self) -> None:
        assert self._task_group is not None
        kernel_id, sock, info, outcome = await self._open_supervisor_kernel()
        try:
            self.subshell_id = None
            self.install_outcome = outcome
            previous_comm = self.comm_id
            self.comm_id = uuid.uuid4().hex
            self._comm_ids.append(self.comm_id)
            await sock.send(sock.build("comm_open", {
                "comm_id": self.comm_id, "target_name": wire.COMM_TARGET, "data": {}}))
            if previous_comm is not None:
                # The old comm lives on in the kernel after a drop: close it, or every
                # reconnect would leave one more behind.
                await sock.send(sock.build("comm_close", {"comm_id": previous_comm, "data": {}}))
            self._sock = sock
            self.kernel_id = kernel_id
            self._generation += 1
            self._codec = wire.JSON
            hello = await self._handshake(sock)
            if self.options.use_subshell and "kernel subshells" in info.get("supported_features", []):
                self.subshell_id = hello.get("parked_subshell_id") or await park_subshell(sock)
        except BaseException:
            await sock.aclose()
            raise
        previous_instance = self.facts.get("instance_id")
        self.facts = hello
        if "msgpack" in hello.get("codecs", []) and "msgpack" in wire.available_codecs():
            self._codec = wire.MSGPACK
        first = previous_instance is None
        if first:
            # What happened before we came is none of our events: replaying the supervisor's
            # ring (up to 32 MiB) on every connect cost each new controller, a CLI call say,
            # and every controller attached beside it (iopub goes to all), all of it again.
            last = hello.get("last_seq")
            self._sequencer = EventSequencer(last if isinstance(last, int) and last > 0 else 0)
        elif previous_instance != hello.get("instance_id"):
            # A new supervisor numbers its events from 1 again.
            self._sequencer = EventSequencer()
        self._connected.set()
        self.connected_at = time.time()
        if not first:
            # In the background: the maintainer must be back watching the socket at once.
            self._task_group.start_soon(self._request_replay)

    async def _handshake(self, sock: KernelSocket) -> dict[str, Any]:
        # hello goes out in JSON: a remote without msgpack can always read it.
        call = self._pending.new(wire.Op.HELLO, {"protocol": wire.PROTOCOL_VERSION}, [], True)
        try:
            await self._send_request(call)
            with anyio.fail_after(30):
                while not call.done:
                    if sock.limit_error is not None:
                        raise sock.limit_error
                    if sock.closed.is_set():
                        raise ConnectionLost(f"the connection closed during hello: "
                                             f"{sock.close_reason}")
                    with anyio.move_on_after(0.25):
                        await call.wakeup.wait()
        except TimeoutError:
            raise KernelError("the supervisor did not answer hello within 30s") from None
        finally:
            self._pending.discard(call)
        if call.error is not None:
            raise call.error
        assert call.reply is not None
        result: dict[str, Any] = call.reply.result
        return result

    def _subshell_header(self) -> dict[str, Any] | None:
        return {"subshell_id": self.subshell_id} if self.subshell_id else None

    async def _send_request(self, call: PendingCall) -> None:
        sock = self._sock
        if sock is None:
            raise ConnectionLost("not connected")
        envelope = wire.encode(wire.request(call.id, call.op, call.args), self._codec)
        msg = sock.build("comm_msg", {"comm_id": self.comm_id, "data": {"tether": 1}},
                         header_extra=self._subshell_header())
        call.sent_generation = self._generation
        try:
            await sock.send(msg, [envelope, *call.buffers])
        except ConnectionLost:
            pass  # the maintainer reconnects; call() re-sends or fails it

    async def _request_replay(self) -> None:
        """Ask the supervisor to re-send events we have not seen (after a drop or a gap)."""
        if self._replay_requested:
            return
        self._replay_requested = True
        try:
            reply = await self.call(wire.Op.EVENTS_SINCE, {"seq": self._sequencer.contiguous},
                                    timeout=30)
            if not reply.result.get("complete", True):
                log.warning("events before the replay ring were lost; followers re-read files")
            # Whatever is still missing below what the supervisor has sent is gone for good.
            self._sequencer.skip_to(min(self._sequencer.highest, reply.result.get("last_seq", 0)))
        except TetherError as exc:  # runs as a background task: nothing may escape it
            log.info("event replay failed: %s", exc)
        finally:
            self._replay_requested = False

    # --- incoming ---------------------------------------------------------------------------

    def _on_comm(self, msg: KernelMessage) -> None:
        content = msg.content
        if msg.msg_type == "comm_close":
            if content.get("comm_id") == self.comm_id and self._sock is not None:
                self.last_error = "the supervisor closed our comm (upgrade or shutdown)"
                self._sock.abort()
            return
        if not isinstance(content.get("data"), dict) or "tether" not in content["data"]:
            return
        if not msg.buffers:
            return
        try:
            envelope, _ = wire.decode(msg.buffers[0], wire.MAX_REPLY_ENVELOPE_BYTES)
        except wire.DecodeError:
            log.warning("undecodable envelope from the supervisor dropped")
            return
        kind = envelope.get("type")
        if kind == "stream":
            # Tunnel bytes of our current comm only: streams of an older one were reset.
            if content.get("comm_id") == self.comm_id and self._stream_handler is not None:
                try:
                    self._stream_handler(envelope, msg.buffers[1:])
                except Exception:
                    log.exception("stream handler failed")
        elif kind == "reply":
            # Other controllers' replies reach us too (iopub is broadcast): only ours count.
            if content.get("comm_id") in self._comm_ids:
                self._pending.resolve(envelope, msg.buffers[1:])
        elif kind == "event":
            seq = envelope.get("seq")
            if not isinstance(seq, int) or not self._sequencer.accept(seq):
                return
            event = Event(seq, str(envelope.get("event")), envelope.get("body") or {},
                          msg.buffers[1:])
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    log.exception("event listener failed")
            if self._sequencer.has_gap and not self._replay_requested and self._task_group:
                self._task_group.start_soon(self._request_replay)

    # --- keeping alive ------------------------------------------------------------------------

    async def _maintain(self) -> None:
        while not self._closing:
            sock = self._sock
            assert sock is not None
            await sock.closed.wait()
            if self._closing:
                return
            self._connected = anyio.Event()
            self.connected_at = None
            self.last_error = self.last_error or sock.close_reason
            self.last_drop, self.last_drop_at = self.last_error, time.time()
            log.info("link to %s dropped: %s", self.target.display_url, sock.close_reason)
            if sock.limit_error is not None:
                self._pending.fail_sent(self._generation, sock.limit_error)
            self._pending.wake_all()
            for hook in list(self._drop_hooks):
                try:
                    hook()
                except Exception:
                    log.exception("drop hook failed")
            await self._reconnect()

    async def _reconnect(self) -> None:
        delay = self.options.backoff_initial
        while not self._closing:
            attempt_started = anyio.current_time()
            self._retry_now = anyio.Event()
            try:
                await probe_server(self.rest, self.options.ping_timeout)
                await self._connect()
            except AuthError as exc:
                # Retrying with the same credentials cannot help; calls fail with this message.
                self.last_error = str(exc)
                self._auth_error = exc
                self._pending.wake_all()
            except (TetherError, OSError) as exc:
                self.last_error = str(exc)
            except Exception as exc:
                # An odd answer (a proxy's HTML page, say) must not end the reconnect loop.
                log.warning("reconnect attempt failed", exc_info=True)
                self.last_error = f"{type(exc).__name__}: {exc}"
            else:
                self.reconnects += 1
                self.last_error = ""
                self._auth_error = None
                self._pending.wake_all()
                # In the background, like the replay: a hook waiting on a reply must not keep
                # the maintainer from noticing the next drop.
                assert self._task_group is not None
                for hook in list(self._reattach_hooks):
                    self._task_group.start_soon(self._run_hook, hook)
                return
            # The backoff spaces the *starts* of attempts: one that already waited out a
            # timeout (a blackholed path) is followed by the next at once. A call that
            # starts waiting meanwhile cuts the wait short, so the first call after the
            # path heals reconnects at once instead of after up to 1.5 * backoff_max.
            pause = delay * (0.5 + _JITTER.random()) - (anyio.current_time() - attempt_started)
            if pause > 0:
                with anyio.move_on_after(pause):
                    await self._retry_now.wait()
                    await anyio.sleep(min(pause, self.options.backoff_initial))
            delay = min(delay * 2, self.options.backoff_max)

    @staticmethod
    async def _run_hook(hook: Callable[[], Awaitable[None]]) -> None:
        try:
            await hook()
        except Exception:
            log.warning("re-attach hook failed", exc_info=True)
