"""Local files: positional I/O, streaming sha256, atomic writes, and names from the remote.

Everything here runs in worker threads or before a transfer starts. A name that came from
the remote (a manifest, a batch reply, a job's artifact list) becomes a local path only
through ``safe_local_path``, and directories for it only through ``make_dirs_inside``.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any

from ...agent_payload import wire
from ...agent_payload.fsutil import read_at, write_at
from ...agent_payload.hashing import hash_fd, sha256_file
from ...agent_payload.paths import TEMP_MARK, check_relpath, is_inside, side_name
from ...errors import TransferError

_HAS_PREAD = hasattr(os, "pread")
# A file modified within this window of being read may change again within the same mtime
# tick (coarse file systems: FAT has 2 s) without its mtime moving. Such "racy" files get no
# mtime copied to the remote, so the next sync compares them by content, not by mtime.
RACY_WINDOW_NS = 2_000_000_000


class LocalFile:
    """A file descriptor with positional reads and writes (a lock stands in for pread on Windows)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def read_at(self, offset: int, length: int) -> bytes:
        with self._lock if not _HAS_PREAD else contextlib.nullcontext():
            return read_at(self.fd, offset, length)

    def write_at(self, offset: int, data: bytes) -> None:
        with self._lock if not _HAS_PREAD else contextlib.nullcontext():
            write_at(self.fd, offset, data)

    def hash_from(self, start: int, hasher: Any) -> Any:
        """``hasher`` fed the file from ``start`` to its end."""
        with self._lock if not _HAS_PREAD else contextlib.nullcontext():
            return hash_fd(self.fd, start, hasher)[0]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def sha256_path(path: str) -> str:
    """Streaming sha256 of a local file (memory: one block)."""
    return sha256_file(path)


def racy(st: os.stat_result, now_ns: int) -> bool:
    """Whether the file was modified too recently for its mtime to be trusted."""
    return st.st_mtime_ns >= now_ns - RACY_WINDOW_NS


def cacheable(st: os.stat_result, now_ns: int) -> bool:
    """Whether a hash of the file may be cached under its stat."""
    # A hash of a file modified moments ago may be stale by the time it is looked up again
    # with an unchanged stat (same coarse tick): only cache settled files.
    return max(st.st_mtime_ns, st.st_ctime_ns) < now_ns - RACY_WINDOW_NS


def atomic_local_write(target: Path, data: bytes, mtime_ns: int | None = None) -> None:
    """Write via a temp file beside ``target`` and a rename: a reader sees old or new, whole."""
    temp = target.with_name(side_name(target.name, TEMP_MARK + uuid.uuid4().hex[:8]))
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
        if mtime_ns is not None:
            os.utime(temp, ns=(mtime_ns, mtime_ns))
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


# --- local paths for names that came from the remote -----------------------------------------


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_local_name(relpath: Any) -> str:
    """The normal ``a/b/c`` form of a local name that came from the remote, or TransferError.

    On top of ``check_relpath`` (no absolute paths, drive letters, ``..``, NUL): no control
    characters (a newline or an escape sequence would garble, or forge, what a terminal
    shows) and no first component starting with ``~`` (nothing expands it here, but a shell,
    or a later ``expanduser``, would read ``~`` or ``~user`` as a home directory).
    """
    try:
        rel = check_relpath(relpath)
    except wire.OpError as exc:
        raise TransferError(f"refusing remote name {relpath!r}: {exc.message}") from None
    if _CONTROL_CHARS.search(rel):
        raise TransferError(f"refusing remote name {relpath!r}: it contains control characters")
    if rel.startswith("~"):
        raise TransferError(f"refusing remote name {relpath!r}: a leading '~' reads as a home "
                            "directory")
    return rel


def safe_local_path(root: str | os.PathLike[str], relpath: str) -> Path:
    """``root/relpath`` for a name that came from the remote, or TransferError.

    ``root`` is the caller's already resolved destination; nothing here expands ``~`` or
    environment variables. Refuses what ``check_local_name`` refuses and names whose existing
    local parents (symlinks included) resolve outside ``root``. The final component is never
    followed: files are written to a temp file and renamed over it, which replaces a link
    instead of writing through it.
    """
    rel = check_local_name(relpath)
    base = Path(root)
    target = base.joinpath(*rel.split("/"))
    real_root = os.path.realpath(base)
    if not is_inside(os.path.realpath(target.parent), real_root):
        raise TransferError(f"refusing remote name {relpath!r}: {target} would land outside "
                            f"{base} (through a symlink)")
    return target


def make_dirs_inside(root: Path, directory: Path) -> None:
    """Create ``directory`` under ``root`` one level at a time, never through an outside link."""
    real_root = os.path.realpath(root)
    current = root
    for part in directory.relative_to(root).parts:
        current = current / part
        if os.path.lexists(current):
            if not is_inside(os.path.realpath(current), real_root):
                raise TransferError(f"refusing to write under {current}: it leads outside {root}")
            if not current.is_dir():
                raise TransferError(f"cannot create {directory}: {current} is not a directory")
            continue
        current.mkdir()
