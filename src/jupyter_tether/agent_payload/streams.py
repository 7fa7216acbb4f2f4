"""Stream service of the payload: TCP connections on the remote, carried over the comm.

A controller forwarding a local port opens one stream per accepted connection
(``stream_open`` connects to ``host:port`` on the remote, the loopback unless asked
otherwise). Bytes go up as one-way ``stream_write`` messages and come down in batched
``stream`` messages on the channel that opened the stream (``Supervisor.push``); each
direction has a credit window (``stream_state``), so neither side buffers more than one
window per stream. Half-close (``eof``) and reset travel both ways.

One I/O thread serves every stream with non-blocking sockets and a selector; op handlers
only queue bytes and wake it. Pushes are paced (a token bucket, ``PUSH_RATE``): iopub
carries about 1000 messages a second, so a saturated tunnel sends few large messages, while
the first bytes after a quiet spell go out at once. One stream and its socket steps are in
``stream_conn``.

Streams belong to an ``owner`` (one per controller). The owner's ``stream_sync`` renews its
lease and, after a reconnect, resets the streams of the connections the drop reset; an
owner silent for ``OWNER_LEASE_S`` has gone away and its streams are reset. Standard
library only.
"""

import collections
import errno
import os
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from . import stream_state as st
from .stream_conn import (
    CONNECT_TIMEOUT_S,
    Batch,
    Stream,
    channel_key,
    close_quietly,
    connect_by_name,
    connect_done,
    connect_error,
    literal_family,
    reset_socket,
    start_connect,
)
from .supervisor import NO_REPLY, Deferred, Request, Supervisor
from .wire import ErrorCode, Op, OpError, arg

READ_BYTES = 1024 * st.KIB  # one recv
READS_PER_TURN = 4
PUSH_BYTES = 4 * st.MIB  # blobs of one pushed message
PUSH_RATE = 500.0  # pushed messages a second (st.PushPacer)
PUSH_BURST = 50.0
#: bytes read from the remote sockets and not yet consumed by the controller, per channel
CHANNEL_BUDGET = 4 * st.MIB
CONNECTORS = 8  # threads that connect new streams (a loopback connect is instant)
OWNER_LEASE_S = 60.0
#: a stream its controller's sync has not listed for this long is one it no longer has (an
#: open cancelled on the way, a probe that timed out): dropped. Longer than a connect may
#: take, and than an open in flight while a sync goes out.
UNLISTED_S = 30.0
LEASE_CHECK_S = 1.0


class StreamService:
    """The ``stream_*`` ops and the I/O thread of one supervisor."""

    def __init__(self, supervisor: Supervisor):
        self.sup = supervisor
        self._lock = threading.Lock()
        self._streams: Dict[Tuple[str, int], Stream] = {}
        self._leases = st.Leases()
        self._batches: Dict[Tuple[Any, str], Batch] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._woken = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pacer = st.PushPacer(PUSH_RATE, PUSH_BURST, time.monotonic())
        self._connector: Optional[ThreadPoolExecutor] = None
        self._resolving = 0  # connects by name queued or running (a reset does not end one)
        self._settle: List[Tuple[Deferred, Any]] = []  # open replies due, sent unlocked
        self._last_lease_check = 0.0
        self.counters = supervisor.counters

    # --- ops (the kernel's shell thread, or a worker for open) ------------------------------

    def op_open(self, req: Request) -> Any:
        """Register the stream at once (bytes may ride along or follow right behind) and
        start connecting; the reply, and a ``reset`` item on failure, say how it went."""
        owner = st.check_owner(req.args)
        sid = st.check_sid(arg(req.args, "sid", int))
        if not arg(req.args, "quiet", bool, False):
            return self._open(req, owner, sid)
        try:
            return self._open(req, owner, sid)
        except OpError as exc:  # nobody reads a reply to a quiet open: say it in the stream
            with self._lock:
                self._queue(req.channel, owner, [sid, st.RESET, exc.message[:st.MAX_REASON_CHARS]])
            self._ensure_thread()
            self._wake()
            return NO_REPLY

    def _open(self, req: Request, owner: str, sid: int) -> Any:
        port = st.check_port(arg(req.args, "port", int))
        allow = arg(req.args, "allow_remote_host", bool, False)
        host = st.check_host(arg(req.args, "host", str, "127.0.0.1"), allow)
        window = st.window_arg(req.args)
        # quiet: no reply (a connection's open, with its bytes); a failure still comes back
        # as a ``reset`` item
        quiet = arg(req.args, "quiet", bool, False)
        first = self._payload(req)  # the connection's first bytes may ride along
        if len(first) > window:  # refused before it connects anywhere
            raise OpError(ErrorCode.TOO_LARGE, "the open carries %d bytes, more than its "
                          "window of %d: send at most a window first" % (len(first), window))
        key = (owner, sid)
        stream = Stream(key, None, req.channel, host, port, window)
        stream.deferred = None if quiet else self.sup.defer(req)
        family = literal_family(host)
        with self._lock:
            if self._stop.is_set():
                raise OpError(ErrorCode.INTERNAL, "the supervisor is shutting down")
            st.check_room(self._streams, owner, key)
            if family is None and self._resolving >= st.MAX_STREAMS:
                raise OpError(ErrorCode.BUSY, "the remote is resolving %d host names for "
                              "forwarded connections: retry shortly, or forward to an IP "
                              "address" % self._resolving)
            self._leases.opened(owner, time.monotonic(), lambda: {k[0] for k in self._streams})
            self._streams[key] = stream
            if first:
                self._take(req.channel, owner, sid, first)
            if family is not None:
                # An address: a non-blocking connect that the I/O thread completes.
                self._start_connect(stream, family)
            else:
                # A name to resolve (getaddrinfo blocks): on a connector thread.
                if self._connector is None:
                    self._connector = ThreadPoolExecutor(max_workers=CONNECTORS,
                                                         thread_name_prefix="tether-connect")
                self._connector.submit(self._connect_by_name, stream)
                self._resolving += 1
        self._ensure_thread()
        self._wake()
        return NO_REPLY if stream.deferred is None else stream.deferred

    def _start_connect(self, stream: Stream, family: int) -> None:
        """Lock held."""
        try:
            stream.sock, code = start_connect(stream.host, stream.port, family)
        except OSError as exc:  # no socket of that family here (IPv6 disabled, say)
            self._connected(stream, exc.errno or errno.EINVAL)
            return
        if code is None and connect_done(stream.sock):
            # A loopback connect is usually done by now: finish it and send the bytes that
            # rode with the open here, a turn of the I/O thread sooner.
            code = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code is None:
            stream.connecting = True
            stream.connect_deadline = time.monotonic() + CONNECT_TIMEOUT_S
        else:
            self._connected(stream, code)
            if self._streams.get(stream.key) is stream and stream.outq:
                self._write(stream)

    def _connected(self, stream: Stream, code: int) -> None:
        """The connect ended (``code`` 0: it worked); lock held."""
        stream.connecting = False
        deferred, stream.deferred = stream.deferred, None
        if code:
            error = connect_error(OSError(code, os.strerror(code)), stream.host, stream.port)
            self._fail(stream, error.message)
            outcome: Any = error
        else:
            outcome = {"sid": stream.key[1], "window": stream.up.window, "host": stream.host,
                       "port": stream.port}
        if deferred is not None:
            self._settle.append((deferred, outcome))

    def _connect_by_name(self, stream: Stream) -> None:
        sock: Optional[socket.socket] = None
        error: Optional[OpError] = None
        with self._lock:
            wanted = self._streams.get(stream.key) is stream
        try:
            if wanted:  # not for a stream reset while it waited for a thread
                sock = connect_by_name(stream.host, stream.port)
        except OSError as exc:
            error = connect_error(exc, stream.host, stream.port)
        except Exception as exc:  # the resolver's own errors: the stream must still end
            error = OpError(ErrorCode.INVALID_ARGUMENT, "cannot connect to %s:%d on the remote: "
                            "%s: %s" % (stream.host, stream.port, type(exc).__name__, exc))
        with self._lock:
            self._resolving -= 1
            if self._streams.get(stream.key) is not stream:  # reset while it connected
                if sock is not None:
                    reset_socket(sock)
                deferred, stream.deferred = stream.deferred, None
                if deferred is not None:
                    self._settle.append((deferred, error or OpError(
                        ErrorCode.CONFLICT, "stream %d was closed while it connected"
                        % stream.key[1])))
            elif error is not None:
                stream.deferred, deferred = None, stream.deferred
                self._fail(stream, error.message)
                if deferred is not None:
                    self._settle.append((deferred, error))
            else:
                stream.sock = sock
                self._connected(stream, 0)
        self._wake()
        self._settle_replies()

    def _settle_replies(self) -> None:
        """Send the open replies that are due (outside the lock: they go to the comm)."""
        with self._lock:
            due, self._settle = self._settle, []
        for deferred, outcome in due:
            if isinstance(outcome, OpError):
                deferred.reject(outcome)
            else:
                deferred.resolve(outcome)

    def op_write(self, req: Request) -> Any:
        owner = st.check_owner(req.args)
        sid = st.check_sid(arg(req.args, "sid", int))
        data = self._payload(req)
        with self._lock:
            self._leases.renew(owner, time.monotonic())
            self._take(req.channel, owner, sid, data)
        self._wake()
        return NO_REPLY

    @staticmethod
    def _payload(req: Request) -> bytes:
        data = b"".join(req.buffers)
        if len(data) > st.MAX_WRITE_BYTES:
            raise OpError(ErrorCode.TOO_LARGE, "a stream write carries at most %d bytes"
                          % st.MAX_WRITE_BYTES)
        return data

    def _take(self, channel: Any, owner: str, sid: int, data: bytes) -> None:
        """Queue bytes from the controller for the remote socket; lock held."""
        stream = self._streams.get((owner, sid))
        if stream is None:
            # Gone (reset, or the remote closed): tell the writer so it stops.
            self._queue(channel, owner, [sid, st.RESET, "no such stream"])
        elif stream.out_eof:
            self._fail(stream, "bytes after end of stream")
        elif not stream.up.on_data(len(data)):
            self._fail(stream, "the controller overran its credit window")
        elif data:
            stream.outq.append(data)

    def op_ack(self, req: Request) -> Any:
        owner = st.check_owner(req.args)
        acks = arg(req.args, "acks", list)
        if len(acks) > st.MAX_STREAMS:
            raise OpError(ErrorCode.TOO_LARGE, "acks lists more than %d streams" % st.MAX_STREAMS)
        with self._lock:
            self._leases.renew(owner, time.monotonic())
            for pair in acks:
                if not isinstance(pair, list) or len(pair) != 2:
                    continue
                stream = self._streams.get((owner, pair[0])) if isinstance(pair[0], int) else None
                if stream is not None and not stream.down.on_ack(pair[1]):
                    self._fail(stream, "impossible ack")
        self._wake()
        return NO_REPLY

    def op_close(self, req: Request) -> Any:
        owner = st.check_owner(req.args)
        sid = st.check_sid(arg(req.args, "sid", int))
        how = arg(req.args, "how", str, "eof")
        if how not in ("eof", "reset"):
            raise OpError(ErrorCode.INVALID_ARGUMENT, "how must be 'eof' or 'reset'")
        with self._lock:
            self._leases.renew(owner, time.monotonic())
            stream = self._streams.get((owner, sid))
            if stream is not None:
                if how == "reset":
                    self._drop(stream)
                else:
                    stream.out_eof = True
        self._wake()
        return NO_REPLY

    def op_sync(self, req: Request) -> Dict[str, Any]:
        """Renew ``owner``'s lease, reset its streams below ``reset_below`` (those of
        connections a drop reset) and those ``live`` has long left out, and say which
        ``live`` streams are unknown here."""
        owner = st.check_owner(req.args)
        live = set(st.sid_list(req.args, "live"))
        reset_below = arg(req.args, "reset_below", int, 0)
        now = time.time()
        with self._lock:
            self._leases.renew(owner, time.monotonic())
            for stream in [s for k, s in self._streams.items() if k[0] == owner]:
                if stream.key[1] < reset_below or (
                        stream.key[1] not in live and now - stream.opened_at > UNLISTED_S):
                    self._drop(stream)
            known = {k[1] for k in self._streams if k[0] == owner}
            open_count = len(self._streams)
        self._wake()
        return {"unknown": sorted(live - known), "open": open_count,
                "limit": st.MAX_STREAMS}

    def hello(self) -> Dict[str, Any]:
        return {"streams": {"open": len(self._streams), "limit": st.MAX_STREAMS,
                            "window": st.DEFAULT_WINDOW}}

    # --- stream state (lock held) -------------------------------------------------------------

    def _queue(self, channel: Any, owner: str, item: List[Any], blob: Optional[bytes] = None
               ) -> None:
        key = (channel_key(channel), owner)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = Batch(channel, owner)
        batch.items.append(item)
        if blob is not None:
            batch.blobs.append(blob)
            batch.bytes += len(blob)

    def _fail(self, stream: Stream, reason: str) -> None:
        """Reset the stream and tell its controller why."""
        self.counters["streams_failed"] += 1
        self._queue(stream.channel, stream.key[0], [stream.key[1], st.RESET,
                                                    reason[:st.MAX_REASON_CHARS]])
        self._drop(stream)

    def _drop(self, stream: Stream) -> None:
        """Forget the stream and reset its remote connection."""
        self._forget(stream, reset=True)

    def _finish(self, stream: Stream) -> None:
        """Both directions ended normally: forget it and close quietly."""
        self._forget(stream, reset=False)

    def _forget(self, stream: Stream, reset: bool) -> None:
        if self._streams.pop(stream.key, None) is None:
            return
        deferred, stream.deferred = stream.deferred, None
        if deferred is not None:  # closed before it connected
            self._settle.append((deferred, OpError(
                ErrorCode.CONFLICT, "stream %d was closed while it connected" % stream.key[1])))
        sock = stream.sock
        if sock is None:
            return  # still connecting: _connect closes what it gets
        if stream.mask:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass
            stream.mask = 0
        if reset:
            reset_socket(sock)
        else:
            close_quietly(sock)

    # --- the I/O thread -----------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._loop, name="tether-streams",
                                            daemon=True)
            self._thread.start()

    def _wake(self) -> None:
        if self._woken:
            return
        self._woken = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # one bad turn must not end every stream
                self.counters["streams_loop_errors"] += 1
                time.sleep(0.01)
        with self._lock:
            for stream in list(self._streams.values()):
                self._drop(stream)

    def _step(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._update_interest()
            pending = any(b.items for b in self._batches.values())
        timeout = LEASE_CHECK_S
        if pending:
            self._pacer.refill(now)
            timeout = self._pacer.wait_s()
        events = self._selector.select(timeout)
        with self._lock:
            for key, mask in events:
                if key.data is None:
                    self._woken = False
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except OSError:
                        pass
                    continue
                stream: Stream = key.data
                if self._streams.get(stream.key) is not stream:
                    continue
                if stream.connecting:
                    assert stream.sock is not None
                    self._connected(stream, stream.sock.getsockopt(socket.SOL_SOCKET,
                                                                   socket.SO_ERROR))
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._write(stream)
                if mask & selectors.EVENT_READ and self._streams.get(stream.key) is stream:
                    self._read(stream)
            now = time.monotonic()
            if now - self._last_lease_check >= LEASE_CHECK_S:
                self._last_lease_check = now
                self._expire(now)
            ready = []
            self._pacer.refill(now)
            if self._pacer.wait_s() == 0.0:
                ready = [b for b in self._batches.values() if b.items]
                self._batches = {}
                self._pacer.take(len(ready))
        for batch in ready:
            self._push(batch)
        if self._settle:
            self._settle_replies()

    def _update_interest(self) -> None:
        """Read where credit allows, write where bytes wait; lock held."""
        in_flight: Dict[Any, int] = collections.Counter()
        for stream in self._streams.values():
            in_flight[channel_key(stream.channel)] += stream.down.sent - stream.down.acked
        for stream in list(self._streams.values()):
            if stream.sock is None:
                continue  # a connector thread resolves its name: writes wait in its queue
            channel = channel_key(stream.channel)
            batch = self._batches.get((channel, stream.key[0]))
            mask = 0
            if stream.connecting:
                mask = selectors.EVENT_WRITE  # writable: the connect ended, one way or another
            elif not stream.read_done and stream.down.available > 0 \
                    and in_flight[channel] < CHANNEL_BUDGET \
                    and (batch is None or batch.bytes < PUSH_BYTES):
                mask |= selectors.EVENT_READ
            if stream.connecting:
                pass  # the write interest above is the connect's
            elif stream.outq:
                mask |= selectors.EVENT_WRITE
            elif stream.out_eof and not stream.wr_shut:
                self._shut_write(stream)
                if self._streams.get(stream.key) is not stream:
                    continue
            if stream.read_done and stream.wr_shut:
                self._finish(stream)
                continue
            if mask != stream.mask:
                if stream.mask == 0:
                    self._selector.register(stream.sock, mask, stream)
                elif mask == 0:
                    self._selector.unregister(stream.sock)
                else:
                    self._selector.modify(stream.sock, mask, stream)
                stream.mask = mask

    def _read(self, stream: Stream) -> None:
        """Read what is there (a few reads at most: fairness), so that a response and the
        end that follows right behind it often travel in one push."""
        owner, sid = stream.key
        for _ in range(READS_PER_TURN):
            count = min(READ_BYTES, stream.down.available)
            if count <= 0 or stream.sock is None:
                return
            try:
                data = stream.sock.recv(count)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(stream, "the remote connection failed: %s" % (exc.strerror or exc))
                return
            if not data:
                stream.read_done = True
                self._queue(stream.channel, owner, [sid, st.EOF, None])
                return
            # The offset lets the controller notice a lost push (iopub drops past its rate
            # limit) and reset the stream instead of passing on corrupt bytes.
            self._queue(stream.channel, owner, [sid, st.DATA, stream.down.sent], data)
            stream.down.on_sent(len(data))
            if len(data) < count:
                return  # drained for now

    def _write(self, stream: Stream) -> None:
        written = 0
        sock = stream.sock
        assert sock is not None  # only connected streams are registered
        while stream.outq:
            head = stream.outq[0]
            try:
                sent = sock.send(head)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail(stream, "writing to the remote connection failed: %s"
                           % (exc.strerror or exc))
                return
            written += sent
            if sent < len(head):
                stream.outq[0] = head[sent:]
                break
            stream.outq.popleft()
        if written:
            total = stream.up.on_consumed(written)
            if total is not None:
                self._queue(stream.channel, stream.key[0], [stream.key[1], st.ACK, total])

    def _shut_write(self, stream: Stream) -> None:
        stream.wr_shut = True
        try:
            assert stream.sock is not None
            stream.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                self._fail(stream, "closing the remote connection failed: %s"
                           % (exc.strerror or exc))

    def _expire(self, now: float) -> None:
        """Reset the streams of owners not heard from within the lease; lock held."""
        self._leases.forget_expired(now, OWNER_LEASE_S, {k[0] for k in self._streams})
        for stream in list(self._streams.values()):
            if self._leases.expired(stream.key[0], now, OWNER_LEASE_S):
                self.counters["streams_expired"] += 1
                self._drop(stream)
            elif stream.connecting and now > stream.connect_deadline:
                self._connected(stream, errno.ETIMEDOUT)

    def _push(self, batch: Batch) -> None:
        envelope = {"type": st.ENVELOPE_TYPE, "owner": batch.owner, "items": batch.items}
        if not self.sup.push(batch.channel, envelope, batch.blobs):
            self.counters["streams_push_failures"] += 1

    # --- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Reset every stream and stop the I/O thread (supervisor upgrade or shutdown)."""
        self._stop.set()
        self._woken = False
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self._lock:
            for stream in list(self._streams.values()):
                self._drop(stream)
            connector, self._connector = self._connector, None
        self._settle_replies()
        if connector is not None:
            connector.shutdown(wait=False)
        for sock in (self._wake_r, self._wake_w):
            close_quietly(sock)
        try:
            self._selector.close()
        except Exception:
            pass


def register(supervisor: Supervisor) -> StreamService:
    """Register the stream ops on ``supervisor``."""
    service = StreamService(supervisor)
    # Quick, and in order with the writes behind it (it connects on its own threads).
    supervisor.register(Op.STREAM_OPEN, service.op_open)
    # One-way and quick: they only queue bytes or credit for the I/O thread.
    supervisor.register(Op.STREAM_WRITE, service.op_write)
    supervisor.register(Op.STREAM_ACK, service.op_ack)
    supervisor.register(Op.STREAM_CLOSE, service.op_close)
    supervisor.register(Op.STREAM_SYNC, service.op_sync)
    supervisor.add_hello_extra(service.hello)
    supervisor.add_closer(service.close)
    return service
