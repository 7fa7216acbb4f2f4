"""Chunked downloads: the client pulls one chunk per request, keeping its own window in flight.

``download_begin`` fixes the file's identity (inode, size, mtime) and its sha256; each
``download_chunk`` reads at an offset from a descriptor kept open between requests (the
oldest are closed beyond a cap and reopened lazily, refusing a file changed meanwhile).

A client that asks ``defer_hash`` gets the reply at once for a big file the hash cache does
not know: the file is hashed on a thread of its own while the bytes travel, and
``download_hash`` answers with the sha256 when it is ready. A client that asks ``checks``
(a piece size) gets the CRC32 of each piece too where that costs no read of its own (they
are cached, or the file is being hashed anyway: one read gives both), so it can check the
bytes it gets over ``GET /files`` piece by piece for a fraction of what hashing them costs;
otherwise the reply has no ``crc32`` and the client hashes what it gets.
"""

import os
import stat
import threading
import uuid
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import paths, wire
from .args import check_chunk_length
from .fsutil import open_regular, read_at, refuse_directory
from .hashing import HashCache, cache_key, digest_pass
from .supervisor import Request, Result, Supervisor
from .wire import ErrorCode, OpError, arg

# Open download file descriptors kept between chunk requests; older ones are reopened lazily.
MAX_OPEN_DOWNLOADS = 32
MAX_KNOWN_DOWNLOADS = 1024
# Smaller files are hashed before download_begin answers even when asked to defer: it takes
# milliseconds, and spares the client a download_hash round trip.
DEFER_HASH_MIN_BYTES = 8 * 1024 * 1024
# Piece CRC32s kept for this many files (by path, piece size and stat), and this many
# pieces in all (a Python int each: ~40 MiB at most).
MAX_CACHED_CHECKS = 256
MAX_CACHED_PIECES = 1 << 20
MIN_PIECE_BYTES = 64 * 1024
# Beyond this many pieces no CRC32s are offered (the client hashes what it gets): the list
# travels in one reply and is cached.
MAX_CHECK_PIECES = 65536
# Background hashes (a thread and a descriptor each) at once; later begins hash inline, on
# the op's worker thread.
MAX_BACKGROUND_HASHES = 4

Identity = Tuple[int, int, int]


Outcome = Tuple[Optional[str], Optional[List[int]], Optional[OpError]]


class _Hashing:
    """A download's sha256 and piece CRC32s, computed on a thread of its own.

    It reads its own descriptor (a dup of the download's) and fails with CONFLICT if the
    file's identity changed by the time it is done; ``store`` keeps the results of an
    unchanged file (the hash caches). ``then`` callbacks get ``(sha256, crc32s, error)``
    once, on whichever thread.
    """

    def __init__(self, path: str, fd: int, st: os.stat_result, piece_bytes: int,
                 store: Callable[[Optional[str], Optional[List[int]]], None]):
        self.path = path
        self._lock = threading.Lock()
        self._callbacks: List[Callable[..., None]] = []
        self._outcome: Optional[Outcome] = None
        self._stopped = False
        self._identity: Identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        self._piece_bytes, self._store = piece_bytes, store
        threading.Thread(target=self._run, args=(fd,), name="tether-download-hash",
                         daemon=True).start()

    def _run(self, fd: int) -> None:
        digest: Optional[str] = None
        crcs: Optional[List[int]] = None
        error: Optional[OpError] = None
        try:
            digest, crcs, end = digest_pass(fd, self._piece_bytes, lambda: self._stopped)
            st = os.fstat(fd)
            if self._stopped:
                error = OpError(ErrorCode.CONFLICT, "%s: the download ended before its hash "
                                "was done" % self.path, {"path": self.path})
            elif (st.st_ino, st.st_size, st.st_mtime_ns) != self._identity or end != st.st_size:
                error = OpError(ErrorCode.CONFLICT, "%s: changed while it was being hashed; "
                                "download it again" % self.path, {"path": self.path})
            else:
                self._store(digest, crcs)
        except OSError as exc:
            error = paths.os_error(exc, self.path)
        except Exception as exc:  # whatever it is, download_hash must get an answer
            error = OpError(ErrorCode.INTERNAL, "%s: hashing failed: %s: %s"
                            % (self.path, type(exc).__name__, exc), {"path": self.path})
        finally:
            os.close(fd)
        with self._lock:
            self._outcome = (digest, crcs, error)
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(digest, crcs, error)

    @property
    def running(self) -> bool:
        return self._outcome is None

    def then(self, callback: Callable[[Optional[str], Optional[List[int]], Optional[OpError]],
                                      None]) -> None:
        with self._lock:
            outcome = self._outcome
            if outcome is None:
                self._callbacks.append(callback)
                return
        callback(*outcome)

    def stop(self) -> None:
        self._stopped = True


class _Download:
    """A file being downloaded: identity fixed at ``download_begin``, fd opened lazily."""

    def __init__(self, transfer_id: str, path: str, st: os.stat_result, fd: int):
        self.transfer_id = transfer_id
        self.path = path
        self.size = st.st_size
        self.identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.fd: Optional[int] = fd
        self.lock = threading.Lock()
        self.sha256: Optional[str] = None
        self.crc32s: Optional[List[int]] = None
        self.hashing: Optional[_Hashing] = None

    def ensure_open(self) -> int:
        if self.fd is None:
            changed = OpError(ErrorCode.CONFLICT,
                              "%s: changed since download_begin; begin again" % self.path,
                              {"path": self.path})
            try:
                fd, st = open_regular(self.path)
            except OpError as exc:
                if exc.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.IS_A_DIRECTORY):
                    raise changed from None  # replaced by a FIFO, a directory...
                raise
            if (st.st_ino, st.st_size, st.st_mtime_ns) != self.identity:
                os.close(fd)
                raise changed
            self.fd = fd
        return self.fd

    def close(self) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def forget(self) -> None:
        """Close, and stop a background hash nobody will ask for."""
        self.close()
        if self.hashing is not None:
            self.hashing.stop()


class Downloads:
    """The ``download_*`` ops and the downloads begun, least recently used first."""

    def __init__(self, supervisor: Supervisor, hashes: HashCache):
        self.supervisor = supervisor
        self.hashes = hashes
        self._lock = threading.Lock()
        self._downloads: "OrderedDict[str, _Download]" = OrderedDict()
        self._checks: "OrderedDict[Tuple[str, int], Tuple[Any, List[int]]]" = OrderedDict()

    def _cached_checks(self, path: str, st: os.stat_result, piece_bytes: int
                       ) -> Optional[List[int]]:
        with self._lock:
            entry = self._checks.get((path, piece_bytes))
            if entry is None or entry[0] != cache_key(st):
                return None
            self._checks.move_to_end((path, piece_bytes))
            return entry[1]

    def _store(self, path: str, st: os.stat_result, piece_bytes: int, digest: Optional[str],
               crcs: Optional[List[int]]) -> None:
        if digest is not None:
            self.hashes.put(path, st, digest)
        if crcs is not None:
            with self._lock:
                self._checks[(path, piece_bytes)] = (cache_key(st), crcs)
                self._checks.move_to_end((path, piece_bytes))
                pieces = sum(len(entry[1]) for entry in self._checks.values())
                while len(self._checks) > MAX_CACHED_CHECKS or pieces > MAX_CACHED_PIECES:
                    pieces -= len(self._checks.popitem(last=False)[1][1])

    def resolve(self, path: Any) -> str:
        return paths.resolve(self.supervisor.root_dir, path)

    def close(self) -> None:
        with self._lock:
            downloads = list(self._downloads.values())
            self._downloads.clear()
        for download in downloads:
            download.forget()

    def download_begin(self, req: Request) -> Dict[str, Any]:
        path = self.resolve(arg(req.args, "path", str))
        want_hash = arg(req.args, "hash", bool, True)
        defer_hash = arg(req.args, "defer_hash", bool, False)
        piece_bytes = arg(req.args, "checks", int, 0)
        if piece_bytes and piece_bytes < MIN_PIECE_BYTES:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "checks (a piece size) must be 0 or at "
                          "least %d bytes" % MIN_PIECE_BYTES)
        refuse_directory(path)
        fd, st = open_regular(path)
        hashing: Optional[_Hashing] = None
        digest = self.hashes.get(path, st) if want_hash else None
        crcs = self._cached_checks(path, st, piece_bytes) if piece_bytes else None
        need_sha256 = want_hash and digest is None
        # Piece checks only where they cost no read of their own: new ones come with a sha256.
        offer_checks = bool(piece_bytes) and (crcs is not None or need_sha256) and \
            -(-st.st_size // piece_bytes) <= MAX_CHECK_PIECES
        need_pieces = piece_bytes if offer_checks and crcs is None else 0
        with self._lock:
            hashing_now = sum(1 for d in self._downloads.values()
                              if d.hashing is not None and d.hashing.running)
        try:
            if need_sha256 and defer_hash and st.st_size >= DEFER_HASH_MIN_BYTES and \
                    hashing_now < MAX_BACKGROUND_HASHES:
                hashing = _Hashing(path, os.dup(fd), st, need_pieces,
                                   lambda sha, pieces: self._store(path, st, piece_bytes, sha,
                                                                   pieces))
            elif need_sha256:
                digest, pieces, _ = digest_pass(fd, need_pieces, lambda: False)
                self._store(path, st, piece_bytes, digest, pieces)
                crcs = pieces if pieces is not None else crcs
        except OSError as exc:
            os.close(fd)
            raise paths.os_error(exc, path) from None
        download = _Download(uuid.uuid4().hex, path, st, fd)
        download.sha256, download.crc32s, download.hashing = digest, crcs, hashing
        evicted: List[_Download] = []
        forgotten: List[_Download] = []
        with self._lock:
            self._downloads[download.transfer_id] = download
            open_ones = [d for d in self._downloads.values() if d.fd is not None]
            evicted.extend(open_ones[:max(0, len(open_ones) - MAX_OPEN_DOWNLOADS)])
            while len(self._downloads) > MAX_KNOWN_DOWNLOADS:
                forgotten.append(self._downloads.popitem(last=False)[1])
        for old in evicted:
            old.close()  # an evicted one still in the table is reopened by its next chunk
        for old in forgotten:
            old.forget()
        result = {"transfer_id": download.transfer_id, "path": path, "size": st.st_size,
                  "sha256": digest, "hash_pending": hashing is not None, "mtime": st.st_mtime,
                  "mtime_ns": st.st_mtime_ns, "mode": stat.S_IMODE(st.st_mode)}
        if offer_checks:
            result["crc32"] = crcs
        return result

    def download_hash(self, req: Request) -> Any:
        """The sha256 of a begun download: now, or once its background hash is done."""
        transfer_id = arg(req.args, "transfer_id", str)
        with self._lock:
            download = self._downloads.get(transfer_id)
        if download is None:
            raise OpError(ErrorCode.NOT_FOUND, "unknown download %r: call download_begin"
                          % transfer_id, {"transfer_id": transfer_id})
        if download.hashing is None:
            return {"sha256": download.sha256, "crc32": download.crc32s}
        reply = self.supervisor.defer(req)
        known_crcs = download.crc32s

        def settle(digest: Optional[str], crcs: Optional[List[int]],
                   error: Optional[OpError]) -> None:
            if error is not None:
                reply.reject(error)
            else:
                reply.resolve({"sha256": digest,
                               "crc32": crcs if crcs is not None else known_crcs})

        download.hashing.then(settle)
        return reply

    def download_chunk(self, req: Request) -> Result:
        transfer_id = arg(req.args, "transfer_id", str, None, allow_none=True)
        offset = arg(req.args, "offset", int)
        length = arg(req.args, "length", int, wire.DEFAULT_CHUNK_BYTES)
        if offset < 0:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "offset must be >= 0")
        if length <= 0:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "length must be > 0")
        check_chunk_length(length)
        if transfer_id is not None:
            with self._lock:
                download = self._downloads.get(transfer_id)
                if download is not None:
                    self._downloads.move_to_end(transfer_id)
            if download is None:
                raise OpError(ErrorCode.NOT_FOUND, "unknown download %r: call download_begin"
                              % transfer_id, {"transfer_id": transfer_id})
            if offset > download.size:
                raise OpError(ErrorCode.INVALID_ARGUMENT, "offset %d is past the end (%d bytes)"
                              % (offset, download.size), {"size": download.size})
            # The lock keeps a concurrent eviction from closing (and the OS from reusing) the
            # descriptor mid-read.
            with download.lock:
                try:
                    data = read_at(download.ensure_open(), offset,
                                    min(length, download.size - offset))
                except OSError as exc:
                    raise paths.os_error(exc, download.path) from None
            size = download.size
        else:
            path = self.resolve(arg(req.args, "path", str))
            refuse_directory(path)
            fd, st = open_regular(path)
            try:
                size = st.st_size
                if offset > size:
                    raise OpError(ErrorCode.INVALID_ARGUMENT,
                                  "offset %d is past the end of %s (%d bytes)"
                                  % (offset, path, size), {"size": size})
                data = read_at(fd, offset, length)
            except OSError as exc:
                raise paths.os_error(exc, path) from None
            finally:
                os.close(fd)
        return Result({"offset": offset, "length": len(data),
                       "eof": offset + len(data) >= size, "size": size}, [data])

    def download_end(self, req: Request) -> Dict[str, Any]:
        transfer_id = arg(req.args, "transfer_id", str)
        with self._lock:
            download = self._downloads.pop(transfer_id, None)
        if download is not None:
            download.forget()
        return {"closed": download is not None}
