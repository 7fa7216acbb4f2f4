"""Chunked downloads: the client pulls one chunk per request, keeping its own window in flight.

``download_begin`` fixes the file's identity (inode, size, mtime) and its sha256; each
``download_chunk`` reads at an offset from a descriptor kept open between requests (the
oldest are closed beyond a cap and reopened lazily, refusing a file changed meanwhile).

A client that asks ``defer_hash`` gets the reply at once for a big file the hash cache does
not know: the file is hashed on a thread of its own while the bytes travel, and
``download_hash`` answers with the sha256 when it is ready.
"""

import hashlib
import os
import stat
import threading
import uuid
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import paths, wire
from .args import check_chunk_length
from .fsutil import open_regular, read_at, refuse_directory
from .hashing import HASH_BLOCK_BYTES, HashCache, hash_fd
from .supervisor import Request, Result, Supervisor
from .wire import ErrorCode, OpError, arg

# Open download file descriptors kept between chunk requests; older ones are reopened lazily.
MAX_OPEN_DOWNLOADS = 32
MAX_KNOWN_DOWNLOADS = 1024
# Smaller files are hashed before download_begin answers even when asked to defer: it takes
# milliseconds, and spares the client a download_hash round trip.
DEFER_HASH_MIN_BYTES = 8 * 1024 * 1024

Identity = Tuple[int, int, int]


class _Hashing:
    """The sha256 of a download's file, computed on a thread of its own.

    It reads its own descriptor (a dup of the download's), and fails with CONFLICT if the
    file's identity changed by the time it is done; a hash of an unchanged file goes into
    the hash cache. ``then`` callbacks get ``(sha256, error)`` once, on whichever thread.
    """

    def __init__(self, path: str, fd: int, st: os.stat_result, hashes: HashCache):
        self.path = path
        self._lock = threading.Lock()
        self._callbacks: List[Callable[[Optional[str], Optional[OpError]], None]] = []
        self._outcome: Optional[Tuple[Optional[str], Optional[OpError]]] = None
        self._stopped = False
        self._identity: Identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        self._st = st
        self._hashes = hashes
        threading.Thread(target=self._run, args=(fd,), name="tether-download-hash",
                         daemon=True).start()

    def _run(self, fd: int) -> None:
        digest: Optional[str] = None
        error: Optional[OpError] = None
        try:
            hasher = hashlib.sha256()
            offset = 0
            while not self._stopped:
                block = read_at(fd, offset, HASH_BLOCK_BYTES)
                if not block:
                    break
                hasher.update(block)
                offset += len(block)
            st = os.fstat(fd)
            if self._stopped:
                error = OpError(ErrorCode.CONFLICT, "%s: the download ended before its hash "
                                "was done" % self.path, {"path": self.path})
            elif (st.st_ino, st.st_size, st.st_mtime_ns) != self._identity or \
                    offset != st.st_size:
                error = OpError(ErrorCode.CONFLICT, "%s: changed while it was being hashed; "
                                "download it again" % self.path, {"path": self.path})
            else:
                digest = hasher.hexdigest()
                self._hashes.put(self.path, self._st, digest)
        except OSError as exc:
            error = paths.os_error(exc, self.path)
        finally:
            os.close(fd)
        with self._lock:
            self._outcome = (digest, error)
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(digest, error)

    def then(self, callback: Callable[[Optional[str], Optional[OpError]], None]) -> None:
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
        refuse_directory(path)
        fd, st = open_regular(path)
        hashing: Optional[_Hashing] = None
        try:
            digest = None
            if want_hash:
                digest = self.hashes.get(path, st)
                if digest is None and defer_hash and st.st_size >= DEFER_HASH_MIN_BYTES:
                    hashing = _Hashing(path, os.dup(fd), st, self.hashes)
                elif digest is None:
                    digest = hash_fd(fd)[0].hexdigest()
                    self.hashes.put(path, st, digest)
        except OSError as exc:
            os.close(fd)
            raise paths.os_error(exc, path) from None
        download = _Download(uuid.uuid4().hex, path, st, fd)
        download.sha256, download.hashing = digest, hashing
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
        return {"transfer_id": download.transfer_id, "path": path, "size": st.st_size,
                "sha256": digest, "hash_pending": hashing is not None, "mtime": st.st_mtime,
                "mtime_ns": st.st_mtime_ns, "mode": stat.S_IMODE(st.st_mode)}

    def download_hash(self, req: Request) -> Any:
        """The sha256 of a begun download: now, or once its background hash is done."""
        transfer_id = arg(req.args, "transfer_id", str)
        with self._lock:
            download = self._downloads.get(transfer_id)
        if download is None:
            raise OpError(ErrorCode.NOT_FOUND, "unknown download %r: call download_begin"
                          % transfer_id, {"transfer_id": transfer_id})
        if download.hashing is None:
            return {"sha256": download.sha256}
        reply = self.supervisor.defer(req)

        def settle(digest: Optional[str], error: Optional[OpError]) -> None:
            if error is not None:
                reply.reject(error)
            else:
                reply.resolve({"sha256": digest})

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
