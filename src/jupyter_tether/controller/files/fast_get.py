"""Ranged ``GET /files`` straight into a download's part file, on worker threads.

httpx2 parses a response body in Python, 64 KiB at a time: about 2 CPU seconds per GiB on
loopback, more than the server spends sending it, and all of it on the event loop that
small calls need. Here one thread reads the body with ``readinto`` into a few large buffers
and writes them with ``pwrite``, and a second hashes them in order; both release the GIL,
so a download costs about what a plain GET to disk costs and the event loop stays free.

Only the simple case is taken: plain ``http`` to a host no proxy variable applies to,
answered 206 (or 200 for a whole file) with exactly the bytes asked for and no content
encoding. Anything else raises ``NotSimple`` before a byte is written, and the caller uses
httpx2 instead (TLS, proxies, redirects).
"""

from __future__ import annotations

import http.client
import queue
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable

from .part import DownloadPart

#: the read buffers of one download (each at most this big; memory: BUFFERS of them)
BUFFER_BYTES = 4 * 1024 * 1024
BUFFERS = 4
TIMEOUT_S = 60.0


class NotSimple(Exception):
    """A request or an answer this client leaves to httpx2; nothing was written."""


class ReceiveError(Exception):
    """The connection failed or ended early; what was written and recorded is kept."""


def direct_http(url: str) -> tuple[str, int, str] | None:
    """``(host, port, path)`` of a plain-http URL no proxy variable applies to, else None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return None
    proxies = urllib.request.getproxies()
    if (proxies.get("http") or proxies.get("all")) and \
            not urllib.request.proxy_bypass(parts.hostname):
        return None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, path


class RangeGet:
    """One blocking GET of the bytes ``[start, end)`` of a ``size``-byte file.

    ``open`` and ``readinto`` run on one worker thread; ``abort`` (any thread) ends them.
    """

    def __init__(self, url: str, headers: dict[str, str], start: int, end: int,
                 size: int) -> None:
        direct = direct_http(url)
        if direct is None:
            raise NotSimple("not plain http, or a proxy applies")
        host, port, self._path = direct
        self._conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
        self._headers = headers
        self.start, self.end, self.size = start, end, size
        self._response: http.client.HTTPResponse | None = None
        self._aborted = threading.Event()

    def open(self) -> None:
        headers = {**self._headers, "Accept-Encoding": "identity"}
        whole = self.start == 0 and self.end == self.size
        if not whole:
            headers["Range"] = f"bytes={self.start}-{self.end - 1}"
        try:
            self._conn.request("GET", self._path, headers=headers)
            if self._aborted.is_set():
                raise ReceiveError("aborted")
            response = self._conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise ReceiveError(f"GET failed: {exc or type(exc).__name__}") from None
        length = response.getheader("Content-Length")
        encoding = (response.getheader("Content-Encoding") or "identity").lower()
        expected_range = f"bytes {self.start}-{self.end - 1}/{self.size}"
        if response.status == 206:
            ok = (response.getheader("Content-Range") or "").strip() == expected_range
        else:
            ok = response.status == 200 and whole
        if not ok or encoding != "identity" or length != str(self.end - self.start):
            raise NotSimple(f"HTTP {response.status} (Content-Length {length}, "
                            f"Content-Encoding {encoding})")
        self._response = response

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` (short only at the end of the range); raises ReceiveError."""
        assert self._response is not None
        filled = 0
        try:
            while filled < len(view):
                got = self._response.readinto(view[filled:])
                if not got:
                    break
                filled += got
        except (OSError, http.client.HTTPException) as exc:
            raise ReceiveError(f"GET broke off: {exc or type(exc).__name__}") from None
        if self._aborted.is_set():
            raise ReceiveError("aborted")
        return filled

    def abort(self) -> None:
        self._aborted.set()
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._conn.close()


def fetch_range(get: RangeGet, part: DownloadPart, buffer_bytes: int,
                report: Callable[[int], bool]) -> int:
    """Stream ``get``'s range into ``part`` (a worker thread); returns the bytes recorded.

    This thread reads and writes; a second records (hashes) the buffers in order, and
    hands them back. ``report(n)`` after each write says whether to go on. Raises
    ReceiveError for the connection, OSError for the local file.
    """
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    written: queue.SimpleQueue[tuple[int, bytearray, memoryview] | None] = queue.SimpleQueue()
    for _ in range(BUFFERS):
        free.put(bytearray(buffer_bytes))
    failures: list[BaseException] = []
    recorded = 0

    def recorder() -> None:
        nonlocal recorded
        while (item := written.get()) is not None:
            offset, buffer, view = item
            if not failures:
                try:
                    part.record(offset, view)
                    recorded += len(view)
                except BaseException as exc:  # handed to the reading thread
                    failures.append(exc)
            view.release()
            free.put(buffer)

    thread = threading.Thread(target=recorder, name="tether-download-hash", daemon=True)
    thread.start()
    try:
        get.open()
        offset = get.start
        while offset < get.end and not failures:
            buffer = free.get()
            view = memoryview(buffer)[:min(len(buffer), get.end - offset)]
            got = get.readinto(view)
            if got < len(view):
                raise ReceiveError(f"GET ended at {offset + got} of {get.end} bytes")
            part.write_raw(offset, view)
            written.put((offset, buffer, view))
            offset += got
            if not report(got):
                break
    finally:
        written.put(None)
        thread.join()
        get.close()
    if failures:
        raise failures[0]
    return recorded
