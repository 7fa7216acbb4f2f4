"""The Supervisor: takes request envelopes, dispatches ops, replies, and emits sequenced events.

It is plain Python with no kernel in sight: ``comm_binding`` feeds it bytes from a comm, and
tests feed it bytes directly. Services (jobs, files, host facts) register their ops on it.

Threading: ``handle`` is called on the kernel's shell (or subshell) thread. Quick ops run
inline; ops registered ``blocking=True`` run on a worker pool so a slow op never delays a
ping. An op that waits for something (``job_wait``) holds no thread at all: it returns a
``Deferred`` from ``Supervisor.defer`` and settles it later from whichever thread sees the
outcome. ``send`` callbacks must be thread-safe (ipykernel's iopub socket is).
"""

import collections
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from . import wire
from .wire import ErrorCode, Op, OpError

# send(envelope_bytes, blobs, channel) -> None ; channel None means "any open channel".
SendFn = Callable[[bytes, Sequence[bytes], Any], None]


class Result:
    """An op's result plus raw binary blobs to ship alongside it."""

    __slots__ = ("buffers", "value")

    def __init__(self, value: Any, buffers: Sequence[bytes] = ()):
        self.value = value
        self.buffers = list(buffers)


class Request:
    """One decoded request as an op handler sees it."""

    __slots__ = ("args", "buffers", "channel", "codec", "id", "op")

    def __init__(self, request_id: Any, op: str, args: Dict[str, Any], buffers: List[bytes],
                 channel: Any, codec: str):
        self.id = request_id
        self.op = op
        self.args = args
        self.buffers = buffers
        self.channel = channel
        self.codec = codec


Handler = Callable[[Request], Any]

# What a handler returns to send no reply at all: a one-way message (a tunnel's bytes, whose
# progress comes back as credit, not as one reply per chunk; iopub carries 1000 msg/s).
NO_REPLY = object()


class Deferred:
    """A reply an op sends later: the handler returns it, then someone settles it once.

    ``resolve(value)`` sends an ok reply (``value`` may be a ``Result``), ``reject(exc)`` an
    error reply; only the first settlement counts, so racing settlers are harmless.
    """

    __slots__ = ("_done", "_lock", "_settle")

    def __init__(self, settle: Callable[[Any, Optional[BaseException]], None]):
        self._settle = settle
        self._lock = threading.Lock()
        self._done = False

    def resolve(self, value: Any) -> bool:
        return self._finish(value, None)

    def reject(self, error: BaseException) -> bool:
        return self._finish(None, error)

    def _finish(self, value: Any, error: Optional[BaseException]) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
        self._settle(value, error)
        return True


class EventRing:
    """Bounded replay ring of encoded events, by count and by bytes."""

    def __init__(self, max_events: int = 4096, max_bytes: int = 32 * 1024 * 1024):
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._items: Deque[Tuple[int, bytes, List[bytes], int]] = collections.deque()
        self._bytes = 0

    def append(self, seq: int, envelope: bytes, blobs: List[bytes]) -> None:
        size = len(envelope) + sum(len(b) for b in blobs)
        self._items.append((seq, envelope, blobs, size))
        self._bytes += size
        while self._items and (len(self._items) > self.max_events or self._bytes > self.max_bytes):
            self._bytes -= self._items.popleft()[3]

    def since(self, seq: int) -> Tuple[List[Tuple[int, bytes, List[bytes]]], bool]:
        """Events with a seq above ``seq``, and whether that covers everything after it."""
        items = [(s, e, b) for (s, e, b, _) in self._items if s > seq]
        oldest = self._items[0][0] if self._items else None
        complete = oldest is None or oldest <= seq + 1
        return items, complete


class Supervisor:
    """Dispatches requests to registered ops and publishes events with a global ``seq``."""

    def __init__(
        self,
        send: SendFn,
        *,
        root_dir: Optional[str] = None,
        state_dir: Optional[str] = None,
        payload_hash: str = "",
        max_workers: int = 32,
        event_ring: Optional[EventRing] = None,
    ):
        self._send = send
        self.root_dir = os.path.abspath(root_dir or os.getcwd())
        self.state_dir = os.path.abspath(state_dir or os.path.join(self.root_dir, ".jupyter_tether"))
        self.payload_hash = payload_hash
        self.instance_id = uuid.uuid4().hex
        self.started_at = time.time()
        self._ops: Dict[str, Tuple[Handler, bool]] = {}
        self._hello_extras: List[Callable[[], Dict[str, Any]]] = []
        self._closers: List[Callable[[], None]] = []
        self._seq = 0
        self._event_lock = threading.Lock()
        self._ring = event_ring or EventRing()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tether-op")
        self._closed = False
        self.counters: Dict[str, int] = collections.Counter()
        self.register(Op.HELLO, self._op_hello)
        self.register(Op.PING, self._op_ping)
        self.register(Op.EVENTS_SINCE, self._op_events_since)
        self.register(Op.OPS, lambda req: sorted(self._ops))

    # --- registration ---------------------------------------------------------------------

    def register(self, op: str, handler: Handler, *, blocking: bool = False) -> None:
        self._ops[op] = (handler, blocking)

    def add_hello_extra(self, provider: Callable[[], Dict[str, Any]]) -> None:
        """Let a service add facts (live jobs, say) to every ``hello`` reply."""
        self._hello_extras.append(provider)

    def add_closer(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    # --- the request path -----------------------------------------------------------------

    def handle(self, envelope: Any, buffers: Sequence[Any] = (), channel: Any = None) -> None:
        """Handle one incoming envelope. Never raises: every failure becomes an error reply."""
        self.counters["requests"] += 1
        codec = wire.MSGPACK
        request_id: Any = None
        try:
            message, codec = wire.decode(envelope)
            request_id = message.get("id")
            if message.get("type") != "request":
                raise OpError(ErrorCode.MALFORMED, "expected a request envelope")
            if not isinstance(request_id, (int, str)) or isinstance(request_id, bool):
                raise OpError(ErrorCode.MALFORMED, "request id must be an int or a string")
            op = message.get("op")
            if not isinstance(op, str):
                raise OpError(ErrorCode.MALFORMED, "op must be a string")
            args = message.get("args", {})
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise OpError(ErrorCode.MALFORMED, "args must be a map")
            entry = self._ops.get(op)
            if entry is None:
                raise OpError(
                    ErrorCode.UNKNOWN_OP, "unknown op %r" % op, {"known_ops": sorted(self._ops)}
                )
            blobs = [b.tobytes() if isinstance(b, memoryview) else bytes(b) for b in buffers]
            req = Request(request_id, op, args, blobs, channel, codec)
        except wire.DecodeError as exc:
            self.counters["malformed"] += 1
            self._reply(channel, codec, wire.reply_error(None, ErrorCode.MALFORMED, str(exc)))
            return
        except OpError as exc:
            self.counters["errors"] += 1
            self._reply(channel, codec, wire.reply_error(request_id, exc.code, exc.message,
                                                         exc.details))
            return
        except Exception as exc:  # pragma: no cover - defensive: malformed beyond imagination
            self._reply(channel, codec, wire.reply_error(request_id, ErrorCode.MALFORMED, str(exc)))
            return
        handler, blocking = entry
        if not blocking:
            self._run(handler, req)
            return
        if not self._closed:
            try:
                self._pool.submit(self._run, handler, req)
                return
            except RuntimeError:  # close() shut the pool down between the check and here
                pass
        # Never run a blocking op inline on the shell thread: say why and let the client retry.
        self.counters["refused_closed"] += 1
        self._reply(channel, codec, wire.reply_error(
            request_id, ErrorCode.BUSY, "supervisor is shutting down: %s not run, retry" % op))

    def defer(self, req: Request) -> Deferred:
        """A reply to ``req`` that its handler returns now and settles later (any thread)."""
        return Deferred(lambda value, error: self._complete(req, value, error))

    def _run(self, handler: Handler, req: Request) -> None:
        try:
            value = handler(req)
        except Exception as exc:
            self._complete(req, None, exc)
            return
        if not isinstance(value, Deferred) and value is not NO_REPLY:
            self._complete(req, value, None)

    def _complete(self, req: Request, value: Any, error: Optional[BaseException]) -> None:
        blobs: List[bytes] = []
        if error is None:
            if isinstance(value, Result):
                value, blobs = value.value, value.buffers
            envelope = wire.reply_ok(req.id, value)
        elif isinstance(error, OpError):
            self.counters["errors"] += 1
            envelope = wire.reply_error(req.id, error.code, error.message, error.details)
        else:
            self.counters["internal_errors"] += 1
            trace = "".join(traceback.format_exception(type(error), error,
                                                       error.__traceback__, limit=8))
            envelope = wire.reply_error(
                req.id,
                ErrorCode.INTERNAL,
                "%s failed: %s: %s" % (req.op, type(error).__name__, error),
                {"traceback": trace},
            )
        self._reply(req.channel, req.codec, envelope, blobs)

    def _reply(self, channel: Any, codec: str, envelope: Dict[str, Any],
               blobs: Sequence[bytes] = ()) -> None:
        try:
            data = wire.encode(envelope, codec)
        except Exception as exc:  # an op returned something unencodable: say so, do not die
            data = wire.encode(wire.reply_error(envelope.get("id"), ErrorCode.INTERNAL,
                                                "reply not encodable: %s" % exc), codec)
            blobs = ()
        try:
            self._send(data, list(blobs), channel)
        except Exception:  # a dead channel must not kill the supervisor
            self.counters["send_failures"] += 1

    def push(self, channel: Any, envelope: Dict[str, Any], blobs: Sequence[bytes] = ()) -> bool:
        """Send an unsequenced message on one client's channel, outside the event stream
        (tunnel bytes: no seq, never replayed). False when the channel could not take it."""
        try:
            self._send(wire.encode(envelope, wire.MSGPACK), list(blobs), channel)
        except Exception:
            self.counters["send_failures"] += 1
            return False
        return True

    # --- events -----------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._seq

    def emit(self, name: str, body: Dict[str, Any], blobs: Sequence[bytes] = (),
             *, replayable: bool = True) -> int:
        """Publish an event to every attached client; returns its ``seq``."""
        with self._event_lock:
            self._seq += 1
            seq = self._seq
            data = wire.encode(wire.event(seq, name, body), wire.MSGPACK)
            blob_list = list(blobs)
            if replayable:
                self._ring.append(seq, data, blob_list)
            try:
                self._send(data, blob_list, None)
            except Exception:
                self.counters["send_failures"] += 1
        return seq

    # --- built-in ops -----------------------------------------------------------------------

    def facts(self) -> Dict[str, Any]:
        caps = {"msgpack": "msgpack" in wire.available_codecs()}
        for name in ("psutil", "zstandard"):
            try:
                __import__(name)
                caps[name] = True
            except ImportError:
                caps[name] = False
        return {
            "protocol": wire.PROTOCOL_VERSION,
            "payload_hash": self.payload_hash,
            "instance_id": self.instance_id,
            "codecs": wire.available_codecs(),
            "capabilities": caps,
            "ops": sorted(self._ops),
            "python": sys.version.split()[0],
            "python_executable": sys.executable,
            "platform": sys.platform,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "root_dir": self.root_dir,
            "state_dir": self.state_dir,
            "started_at": self.started_at,
            "last_seq": self._seq,
        }

    def _op_hello(self, req: Request) -> Dict[str, Any]:
        client_protocol = wire.arg(req.args, "protocol", int, wire.PROTOCOL_VERSION)
        if client_protocol != wire.PROTOCOL_VERSION:
            raise OpError(
                ErrorCode.CONFLICT,
                "protocol %s not supported (supervisor speaks %s): upgrade jupyter-tether"
                % (client_protocol, wire.PROTOCOL_VERSION),
            )
        result = self.facts()
        for provider in self._hello_extras:
            try:
                result.update(provider())
            except Exception as exc:  # a broken extra must not break the handshake
                result.setdefault("hello_errors", []).append(repr(exc))
        return result

    def _op_ping(self, req: Request) -> Dict[str, Any]:
        return {"pong": True, "time": time.time(), "last_seq": self._seq}

    def _op_events_since(self, req: Request) -> Dict[str, Any]:
        since = wire.arg(req.args, "seq", int)
        # Hold the event lock so no live event slips between the replayed ones.
        with self._event_lock:
            items, complete = self._ring.since(since)
            for _, data, blobs in items:
                try:
                    self._send(data, blobs, req.channel)
                except Exception:
                    self.counters["send_failures"] += 1
            return {"replayed": len(items), "complete": complete, "last_seq": self._seq}

    def close(self) -> None:
        """Stop background work. Jobs are separate processes and keep running."""
        self._closed = True
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:
                pass
        self._pool.shutdown(wait=False)
