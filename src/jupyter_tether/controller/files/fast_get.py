"""Ranged ``GET /files`` straight into a download's part file, on a worker thread.

httpx2 parses a response body in Python, 64 KiB at a time: about 2 CPU seconds per GiB on
loopback, more than the server spends sending it, and all of it on the event loop that
small calls need. Here a worker thread reads the body with ``readinto`` into one buffer,
hashes it and writes it with ``pwrite``, all with the GIL released, so a download costs
about what a plain GET to disk costs (plus the sha256) and the event loop stays free.

Only the simple case is taken: plain ``http`` to a host no proxy variable applies to,
answered 206 (or 200 for a whole file) with exactly the bytes asked for and no content
encoding. Anything else raises ``NotSimple`` before a byte is written, and the caller uses
httpx2 instead (TLS, proxies, redirects).
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable

from .part import DownloadPart

#: one read, hash and write: small enough to stay in a core's cache between the three
#: (256-512 KiB measured best; 4 MiB cost ~2x the CPU)
BUFFER_BYTES = 512 * 1024
#: progress goes to the event loop this often (the thread waits for it to be taken)
REPORT_BYTES = 4 * 1024 * 1024
#: one request: the server's handler writes the whole of it without giving its event loop
#: back while the socket takes the bytes (a fast reader), so pings wait behind one request
PIECE_BYTES = int(os.environ.get("TETHER_PIECE_MIB", "16")) * 1024 * 1024
#: connections: the next request is already at the server when one ends (no gap)
CONNECTIONS = int(os.environ.get("TETHER_CONNS", "2"))
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


class FilesGet:
    """Ranged GETs of one ``size``-byte file over a few kept-alive connections.

    ``send``, ``receive`` and ``readinto`` run on one worker thread; ``abort`` (any
    thread) ends them.
    """

    def __init__(self, url: str, headers: dict[str, str], size: int) -> None:
        direct = direct_http(url)
        if direct is None:
            raise NotSimple("not plain http, or a proxy applies")
        host, port, self._path = direct
        self._conns = [http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
                       for _ in range(CONNECTIONS)]
        self._headers = {**headers, "Accept-Encoding": "identity"}
        self.size = size
        self._response: http.client.HTTPResponse | None = None
        self._aborted = threading.Event()

    def send(self, slot: int, start: int, end: int) -> None:
        """Send the request for ``[start, end)`` on connection ``slot``."""
        headers = dict(self._headers)
        if not (start == 0 and end == self.size):
            headers["Range"] = f"bytes={start}-{end - 1}"
        if self._aborted.is_set():
            raise ReceiveError("aborted")
        try:
            self._conns[slot].request("GET", self._path, headers=headers)
        except (OSError, http.client.HTTPException) as exc:
            raise ReceiveError(f"GET failed: {exc or type(exc).__name__}") from None

    def receive(self, slot: int, start: int, end: int) -> None:
        """Take the answer to ``send(slot, start, end)``; raises NotSimple if it is not plain."""
        try:
            response = self._conns[slot].getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise ReceiveError(f"GET failed: {exc or type(exc).__name__}") from None
        length = response.getheader("Content-Length")
        encoding = (response.getheader("Content-Encoding") or "identity").lower()
        if response.status == 206:
            ok = (response.getheader("Content-Range") or "").strip() == \
                f"bytes {start}-{end - 1}/{self.size}"
        else:
            ok = response.status == 200 and start == 0 and end == self.size
        if not ok or encoding != "identity" or length != str(end - start):
            raise NotSimple(f"HTTP {response.status} (Content-Length {length}, "
                            f"Content-Encoding {encoding})")
        self._response = response

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` from the current answer (short only at its end)."""
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
        for conn in self._conns:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for conn in self._conns:
            conn.close()


def pieces(ranges: list[list[int]]) -> list[tuple[int, int]]:
    """``ranges`` cut into requests of at most ``PIECE_BYTES``."""
    return [(offset, min(offset + PIECE_BYTES, end))
            for start, end in ranges for offset in range(start, end, PIECE_BYTES)]


def fetch_ranges(get: FilesGet, part: DownloadPart, ranges: list[list[int]],
                 report: Callable[[int], bool]) -> None:
    """Stream ``ranges`` of the file into ``part`` (a worker thread).

    Requests go ``CONNECTIONS`` at a time, one per connection, so the server has the next
    one as soon as it finishes one. Each buffer is read, hashed and written while it is
    still in the CPU's cache (a pipeline of big buffers across two threads measured
    slower: every byte crossed cores and caches). ``report(n)`` every ``REPORT_BYTES`` or
    so says whether to go on. Raises NotSimple (from the first answer only, nothing
    written), ReceiveError for the connection, OSError for the local file.
    """
    view = memoryview(bytearray(BUFFER_BYTES))
    todo = pieces(ranges)
    unreported = 0
    try:
        for index in range(min(CONNECTIONS, len(todo))):
            get.send(index, *todo[index])
        for index, (start, end) in enumerate(todo):
            slot = index % CONNECTIONS
            get.receive(slot, start, end)
            offset = start
            while offset < end:
                piece = view[:min(BUFFER_BYTES, end - offset)]
                got = get.readinto(piece)
                if got < len(piece):
                    raise ReceiveError(f"GET ended at {offset + got} of {end} bytes")
                part.write_raw(offset, piece)
                part.record(offset, piece)
                offset += got
                unreported += got
                if unreported >= REPORT_BYTES or offset == end:
                    count, unreported = unreported, 0
                    if not report(count):
                        return
            if index + CONNECTIONS < len(todo):
                get.send(slot, *todo[index + CONNECTIONS])
    finally:
        get.close()
