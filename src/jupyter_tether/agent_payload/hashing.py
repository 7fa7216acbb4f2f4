"""sha256 of files, streamed, and the hash cache that lets an unchanged tree skip rehashing.

``HashCache`` is shared with the controller, which keeps its own for local trees.
"""

import hashlib
import json
import os
import threading
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

from .fsutil import O_BINARY, atomic_write, read_at
from .wire import ErrorCode, OpError

HASH_BLOCK_BYTES = 1024 * 1024


def hash_fd(fd: int, start: int = 0, hasher: Any = None) -> Tuple[Any, int]:
    """Feed the file from ``start`` to its end into ``hasher``; returns it and the end offset."""
    hasher = hasher if hasher is not None else hashlib.sha256()
    offset = start
    while True:
        block = read_at(fd, offset, HASH_BLOCK_BYTES)
        if not block:
            return hasher, offset
        hasher.update(block)
        offset += len(block)


def digest_pass(fd: int, piece_bytes: int,
                stopped: Callable[[], bool]) -> Tuple[str, Optional[List[int]], int]:
    """One read of the file from its start: its sha256, the CRC32 of each ``piece_bytes``
    piece (if ``piece_bytes``; the last may be shorter), and the offset the read ended at
    (early if ``stopped()``)."""
    hasher = hashlib.sha256()
    crcs: Optional[List[int]] = [] if piece_bytes else None
    crc = filled = offset = 0
    while not stopped():
        block = read_at(fd, offset, HASH_BLOCK_BYTES)
        if not block:
            break
        hasher.update(block)
        if crcs is not None:
            view, pos = memoryview(block), 0
            while pos < len(view):
                take = min(len(view) - pos, piece_bytes - filled)
                crc = zlib.crc32(view[pos:pos + take], crc)
                pos, filled = pos + take, filled + take
                if filled == piece_bytes:
                    crcs.append(crc)
                    crc = filled = 0
        offset += len(block)
    if crcs is not None and filled:
        crcs.append(crc)
    return hasher.hexdigest(), crcs, offset


def sha256_file(path: str) -> str:
    """Streaming sha256 of a file: memory stays at one block whatever its size."""
    fd = os.open(path, os.O_RDONLY | O_BINARY)
    try:
        return hash_fd(fd)[0].hexdigest()
    finally:
        os.close(fd)


def require_unchanged(path: str, if_sha256: Optional[str]) -> None:
    """A conditional write's check, made right before the rename: ``path`` must still hold
    the content hashing to ``if_sha256`` ("": must not exist), or nothing is written. A save
    by someone else since the writer read the file is then refused, not overwritten."""
    if if_sha256 is None:
        return
    try:
        current = sha256_file(path)
    except FileNotFoundError:
        current = ""
    except OSError as exc:
        raise OpError(ErrorCode.CONFLICT, "%s: cannot check its content before writing: %s"
                      % (path, exc.strerror or exc), {"path": path}) from None
    if current != if_sha256.lower():
        raise OpError(ErrorCode.CONFLICT, "%s changed since it was read (%s): nothing was "
                      "written" % (path, "now it exists" if not if_sha256 else
                                   "now it is gone" if not current else "saved in between"),
                      {"path": path, "reason": "changed", "sha256": current})


CacheKey = Tuple[int, int, int, int]


def cache_key(st: os.stat_result) -> CacheKey:
    # ctime and inode too: a rewrite that restores the mtime (as sync does) still changes them.
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class HashCache:
    """sha256 by (path, size, mtime_ns, ctime_ns, inode), in memory and persisted per tree root.

    A persisted cache lets an unchanged tree's manifest skip hashing after a kernel restart.
    ``directory`` None keeps it in memory only.
    """

    MAX_ENTRIES = 500000

    def __init__(self, directory: Optional[str]):
        self.directory = directory
        self._lock = threading.Lock()
        self._entries: Dict[str, Tuple[CacheKey, str]] = {}
        self._saved: Dict[str, Dict[str, List[Any]]] = {}

    def get(self, path: str, st: os.stat_result) -> Optional[str]:
        entry = self._entries.get(path)
        if entry is not None and entry[0] == cache_key(st):
            return entry[1]
        return None

    def put(self, path: str, st: os.stat_result, sha256: str) -> None:
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()  # crude but bounded: the next manifests rebuild it
            self._entries[path] = (cache_key(st), sha256)

    def _file_for(self, root: str) -> Optional[str]:
        if self.directory is None:
            return None
        name = hashlib.sha256(root.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        return os.path.join(self.directory, name + ".json")

    def load_root(self, root: str) -> None:
        """Load the persisted entries of a tree once per process."""
        if root in self._saved:
            return
        saved: Dict[str, List[Any]] = {}
        cache_file = self._file_for(root)
        if cache_file is not None:
            try:
                with open(cache_file, encoding="utf-8") as handle:
                    data = json.load(handle)
                if isinstance(data, dict) and data.get("root") == root:
                    saved = data.get("files") or {}
            except (OSError, ValueError):
                saved = {}  # missing or damaged: hash again
        with self._lock:
            self._saved[root] = saved
            for rel, row in saved.items():
                try:
                    key = (int(row[0]), int(row[1]), int(row[2]), int(row[3]))
                    self._entries.setdefault(os.path.join(root, *rel.split("/")),
                                             (key, str(row[4])))
                except (TypeError, ValueError, IndexError):
                    continue

    def save_root(self, root: str, files: Dict[str, List[Any]]) -> None:
        """Persist a tree's entries if they changed; failures only cost a rehash later."""
        if self._saved.get(root) == files:
            return
        self._saved[root] = files
        cache_file = self._file_for(root)
        if cache_file is None:
            return
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            data = json.dumps({"root": root, "files": files}, separators=(",", ":"))
            atomic_write(cache_file, data.encode("utf-8"))
        except OSError:
            pass
