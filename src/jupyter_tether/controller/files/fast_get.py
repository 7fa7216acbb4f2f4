"""Ranged ``GET /files`` straight into a download's part file, off the event loop.

httpx2 parses a response body in Python, 64 KiB at a time: about 2 CPU seconds per GiB on
loopback, more than the server spends sending it, and all of it on the event loop that
small calls need. Here a worker thread moves the body from the socket to the part file
with ``os.splice`` (Linux: the bytes never enter Python) or ``recv_into`` and ``pwrite``
elsewhere, and a second thread reads back what landed and checks it (each piece's CRC32,
or a running sha256): both release the GIL, so a checked download costs about what a plain
GET to disk costs, and the event loop stays free for small calls.

Only the simple case is taken: plain ``http`` to a host no proxy variable applies to,
answered 206 (or 200 for a whole file) with exactly the bytes asked for and no content or
transfer encoding. Anything else raises ``NotSimple`` before a byte is written, and the
caller uses httpx2 instead (TLS, proxies, redirects).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import select
import socket
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable

from .part import DownloadPart

#: the piece whose CRC32 is checked against the remote's
PIECE_BYTES = 16 * 1024 * 1024
#: one request: the server's file handler writes all of it without giving its event loop
#: back while the socket takes the bytes (a fast reader), so pings wait behind one request.
#: 4 MiB against 16: ping max during a 256 MiB / 1 GiB download 35 / 209 ms against
#: 112 / 461 ms (bench/bench_mcp.py), but a 64 MiB download ~20% slower (per-request cost
#: in the server); 8 MiB was as fast as 16 there.
REQUEST_BYTES = 8 * 1024 * 1024
#: connections: the next request is already at the server when one answer ends (no gap)
CONNECTIONS = 2
#: one splice, or one recv_into and pwrite
MOVE_BYTES = 1024 * 1024
#: read back and hashed at a time: stays in the CPU's cache (4 MiB cost ~2x the CPU)
HASH_BYTES = 256 * 1024
#: the worker adds to the progress count, and checks whether to stop, this often
REPORT_BYTES = 4 * 1024 * 1024
TIMEOUT_S = 60
MAX_HEAD_BYTES = 64 * 1024
_F_SETPIPE_SZ = 1031
USE_SPLICE = hasattr(os, "splice") and sys.platform.startswith("linux")
# splice refused by this socket or file system: copy through a buffer instead
_NO_SPLICE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


_POLLRDHUP = getattr(select, "POLLRDHUP", None)


class NotSimple(Exception):
    """A request or an answer this client leaves to httpx2; nothing was written."""


class ReceiveError(Exception):
    """The connection failed or ended early; what was written and recorded is kept."""


def direct_http(url: str) -> tuple[str, int, str, str] | None:
    """``(host, port, Host header, path)`` of a plain-http URL no proxy variable applies
    to, else None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return None
    proxies = urllib.request.getproxies()
    if (proxies.get("http") or proxies.get("all")) and \
            not urllib.request.proxy_bypass(parts.hostname):
        return None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, parts.netloc.rpartition("@")[2], path


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-case names, joined with ", ") of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest.partition(" ")[0]
    if not version.startswith("HTTP/1.") or not (len(code) == 3 and code.isascii()
                                                 and code.isdigit()):
        raise NotSimple(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or line[0] in " \t":
            raise NotSimple(f"a header this client does not read: {line[:80]!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return int(code), headers


class _Conn:
    """One kept-alive HTTP/1.1 connection, read without buffering: the body stays in the
    socket, for ``os.splice`` to move."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.reusable = False

    def send(self, request: bytes) -> None:
        if self.sock is None or not self.reusable:
            self.close()
            sock = socket.create_connection((self.host, self.port), timeout=TIMEOUT_S)
            # Blocking (splice needs it), with the timeout left to the kernel.
            sock.settimeout(None)
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                struct.pack("ll", TIMEOUT_S, 0))
            self.sock = sock
        self.reusable = False
        self.sock.sendall(request)

    def head(self) -> tuple[int, dict[str, str]]:
        """Read exactly the response head, leaving the body in the socket."""
        assert self.sock is not None
        # A peek returns at once while any byte waits, so the socket's own timeout never
        # fires on a head that stops halfway: this deadline does.
        deadline = time.monotonic() + TIMEOUT_S
        # A peek cannot see the end of the stream behind unread bytes: where the system
        # says when the peer has hung up (Linux), a head cut off by a close ends at once.
        hangup = None
        if _POLLRDHUP is not None:
            hangup = select.poll()
            hangup.register(self.sock.fileno(), _POLLRDHUP)
        closed = False
        while True:
            if time.monotonic() > deadline:
                raise ReceiveError(f"the response head did not come whole within {TIMEOUT_S} s")
            peek = self.sock.recv(MAX_HEAD_BYTES, socket.MSG_PEEK)
            if not peek:
                raise ReceiveError("the server closed the connection")
            end = peek.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(peek) >= MAX_HEAD_BYTES:
                raise NotSimple("a response head over 64 KiB")
            if closed:  # hung up, and nothing came after the last peek: the head ends here
                raise ReceiveError("the server closed the connection in the middle of the "
                                   "response head")
            # A head in pieces: a peek returns at once, so wait a little.
            if hangup is None:
                time.sleep(0.001)
            else:
                closed = bool(hangup.poll(1))
        wanted = end + 4
        head = b""
        while len(head) < wanted:
            got = self.sock.recv(wanted - len(head))
            if not got:
                raise ReceiveError("the server closed the connection")
            head += got
        status, headers = parse_head(head[:end])
        connection = headers.get("connection", "").lower()
        self.reusable = "close" not in connection and (
            head.startswith(b"HTTP/1.1") or "keep-alive" in connection)
        return status, headers

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


class FilesGet:
    """Ranged GETs of one ``size``-byte file over ``CONNECTIONS`` kept-alive connections.

    All but ``abort`` run on one worker thread; ``abort`` (any thread) ends them.
    """

    def __init__(self, url: str, headers: dict[str, str], size: int) -> None:
        direct = direct_http(url)
        if direct is None:
            raise NotSimple("not plain http, or a proxy applies")
        host, port, host_header, path = direct
        lines = [f"GET {path} HTTP/1.1", f"Host: {host_header}", "Accept-Encoding: identity"]
        for name, value in headers.items():
            if any(c in name + value for c in "\r\n\0"):
                raise NotSimple(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}")
        self._request = "\r\n".join(lines).encode("latin-1")
        self._conns = [_Conn(host, port) for _ in range(CONNECTIONS)]
        self.size = size
        self._aborted = threading.Event()

    def send(self, slot: int, start: int, end: int) -> None:
        """Send the request for ``[start, end)`` on connection ``slot``."""
        wanted = b"" if start == 0 and end == self.size else \
            f"\r\nRange: bytes={start}-{end - 1}".encode()
        self.check_aborted()
        try:
            self._conns[slot].send(self._request + wanted + b"\r\n\r\n")
        except OSError as exc:
            raise ReceiveError(f"GET failed: {exc}") from None

    def receive(self, slot: int, start: int, end: int) -> socket.socket:
        """Take the head of the answer to ``send(slot, start, end)``; returns the socket
        its body is read from. Raises NotSimple if it is not a plain answer."""
        conn = self._conns[slot]
        try:
            status, headers = conn.head()
        except OSError as exc:
            raise ReceiveError(f"GET failed: {exc}") from None
        length = headers.get("content-length")
        encoding = headers.get("content-encoding", "identity").lower()
        if status == 206:
            ok = headers.get("content-range", "") == f"bytes {start}-{end - 1}/{self.size}"
        else:
            ok = status == 200 and start == 0 and end == self.size
        if not ok or encoding != "identity" or "transfer-encoding" in headers or \
                length != str(end - start):
            raise NotSimple(f"HTTP {status} (Content-Length {length}, "
                            f"Content-Encoding {encoding})")
        assert conn.sock is not None
        return conn.sock

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def check_aborted(self) -> None:
        if self._aborted.is_set():
            raise ReceiveError("aborted")

    def abort(self) -> None:
        self._aborted.set()
        for conn in self._conns:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for conn in self._conns:
            conn.close()


def pieces(ranges: list[list[int]]) -> list[tuple[int, int]]:
    """``ranges`` cut into requests of at most ``REQUEST_BYTES``."""
    return [(offset, min(offset + REQUEST_BYTES, end))
            for start, end in ranges for offset in range(start, end, REQUEST_BYTES)]


class _Mover:
    """Moves a body from the socket into the part file: spliced, or through a buffer."""

    def __init__(self, part: DownloadPart) -> None:
        self.part = part
        assert part.file is not None
        self.fd = part.file.fd
        self.pipe: tuple[int, int] | None = None
        self._drain: int | None = None
        self.buffer: memoryview | None = None
        if USE_SPLICE:
            self.pipe = os.pipe()
            with contextlib.suppress(OSError):
                import fcntl  # POSIX only

                fcntl.fcntl(self.pipe[1], _F_SETPIPE_SZ, MOVE_BYTES)
        else:
            self.buffer = memoryview(bytearray(MOVE_BYTES))

    def move(self, sock: socket.socket, offset: int, length: int) -> int:
        """Up to ``length`` bytes at ``offset``; returns how many (0: the socket ended).

        Raises ReceiveError for the socket, OSError for the file."""
        try:
            if self.pipe is not None:
                try:
                    got = os.splice(sock.fileno(), self.pipe[1], length)
                except OSError as exc:
                    if exc.errno not in _NO_SPLICE:
                        raise
                    self._unsplice()
                    return self.move(sock, offset, length)
            else:
                assert self.buffer is not None
                got = sock.recv_into(self.buffer[:length])
        except (BlockingIOError, TimeoutError):
            raise ReceiveError(f"GET stalled for {TIMEOUT_S} s") from None
        except OSError as exc:
            raise ReceiveError(f"GET broke off: {exc}") from None
        if self.pipe is None:
            assert self.buffer is not None
            self.part.write_raw(offset, self.buffer[:got])
            return got
        done = 0
        try:
            while done < got:
                done += os.splice(self.pipe[0], self.fd, got - done, offset_dst=offset + done)
        except OSError as exc:
            if exc.errno not in _NO_SPLICE:
                raise
            # A file system that takes no splice: what is in the pipe goes through a buffer.
            self._unsplice()
            assert self.buffer is not None and self._drain is not None
            while done < got:
                view = self.buffer[:min(len(self.buffer), got - done)]
                view = view[:os.readv(self._drain, [view])]
                self.part.write_raw(offset + done, view)
                done += len(view)
            os.close(self._drain)
            self._drain = None
        return got

    def _unsplice(self) -> None:
        """From now on through a buffer; the pipe's read end stays open to be drained."""
        assert self.pipe is not None
        os.close(self.pipe[1])
        self._drain, self.pipe = self.pipe[0], None
        self.buffer = memoryview(bytearray(MOVE_BYTES))

    def close(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None
        if self._drain is not None:
            os.close(self._drain)
            self._drain = None


class _Recorder:
    """A thread that reads back what landed in the part file, in order, and records it
    (piece CRC32s or the running sha256, and the sidecar) beside the next bytes' move."""

    def __init__(self, part: DownloadPart) -> None:
        self.part = part
        self.failure: BaseException | None = None
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tether-download-hash",
                                        daemon=True)
        self._thread.start()

    def add(self, offset: int, length: int) -> None:
        self._queue.put((offset, length))

    def _run(self) -> None:
        view = memoryview(bytearray(HASH_BYTES))
        file = self.part.file
        assert file is not None
        while (item := self._queue.get()) is not None:
            if self.failure is not None:
                continue
            offset, length = item
            try:
                while length:
                    piece = view[:min(HASH_BYTES, length)]
                    if hasattr(os, "preadv"):
                        got = os.preadv(file.fd, [piece], offset)
                    else:  # Windows: a fresh bytes object each time
                        data = file.read_at(offset, len(piece))
                        got = len(data)
                        piece[:got] = data
                    if got != len(piece):
                        raise OSError(f"{self.part.part} is shorter than what was written")
                    self.part.record(offset, piece)
                    offset += len(piece)
                    length -= len(piece)
            except BaseException as exc:  # handed to the moving thread
                self.failure = exc

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()


def fetch_ranges(get: FilesGet, part: DownloadPart, ranges: list[list[int]],
                 report: Callable[[int], bool]) -> None:
    """Stream ``ranges`` of the file into ``part`` (a worker thread).

    Requests go ``CONNECTIONS`` at a time, one per connection, so the server has the next
    one as soon as it finishes one. ``report(n)`` every ``REPORT_BYTES`` or so says
    whether to go on. Raises NotSimple for an answer this client does not read (what came
    before it is kept), ReceiveError for the connection, OSError for the local file.
    """
    todo = pieces(ranges)
    mover = _Mover(part)
    recorder = _Recorder(part)
    unreported = 0
    try:
        for index in range(min(CONNECTIONS, len(todo))):
            get.send(index, *todo[index])
        for index, (start, end) in enumerate(todo):
            slot = index % CONNECTIONS
            sock = get.receive(slot, start, end)
            offset = start
            while offset < end:
                got = mover.move(sock, offset, min(MOVE_BYTES, end - offset))
                get.check_aborted()
                if not got:
                    raise ReceiveError(f"GET ended at {offset} of {end} bytes")
                recorder.add(offset, got)
                offset += got
                unreported += got
                if recorder.failure is not None:
                    raise recorder.failure
                if unreported >= REPORT_BYTES or offset == end:
                    count, unreported = unreported, 0
                    if not report(count):
                        return
            if index + CONNECTIONS < len(todo):
                get.send(slot, *todo[index + CONNECTIONS])
    finally:
        recorder.finish()
        mover.close()
        get.close()
    if recorder.failure is not None:
        raise recorder.failure

