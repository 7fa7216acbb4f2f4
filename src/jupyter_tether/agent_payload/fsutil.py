"""Low-level file I/O of the file ops: positional reads and writes, atomic writes, safe opens;
and ``wait_ready``, an fd readiness check with no limit on the fd's number.

Standard library only. ``read_at`` and ``write_at`` are shared with the controller.
"""

import os
import select
import stat
import uuid
from typing import List, Optional, Tuple

from . import paths
from .paths import TEMP_MARK, side_path
from .wire import ErrorCode, OpError

O_BINARY = getattr(os, "O_BINARY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def wait_ready(fd: int, write: bool = False, timeout: float = 0.0) -> bool:
    """Whether ``fd`` is readable (``write``: writable) within ``timeout`` seconds.

    ``poll``, not ``select``: a long-lived supervisor can hold more than 1024 fds (forwarded
    connections, work kernels' ports), and ``select`` raises ``ValueError`` past that."""
    timeout = max(0.0, timeout)
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
        return bool(poller.poll(timeout * 1000.0))
    fds = [fd]  # pragma: no cover - Windows, where select takes any socket
    ready = select.select([], fds, [], timeout) if write else select.select(fds, [], [], timeout)
    return any(ready)


def read_at(fd: int, offset: int, length: int) -> bytes:
    """Read up to ``length`` bytes at ``offset`` (short only at end of file)."""
    parts: List[bytes] = []
    while length > 0:
        if hasattr(os, "pread"):
            data = os.pread(fd, length, offset)
        else:  # pragma: no cover - Windows: callers hold the file's lock around this
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, length)
        if not data:
            break
        parts.append(data)
        offset += len(data)
        length -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def write_at(fd: int, offset: int, data: bytes) -> None:
    """Write all of ``data`` at ``offset``."""
    view = memoryview(data)
    while len(view):
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, view, offset)
        else:  # pragma: no cover - Windows: callers hold the file's lock around this
            os.lseek(fd, offset, os.SEEK_SET)
            written = os.write(fd, view)
        view = view[written:]
        offset += written


def atomic_write(target: str, data: bytes, mode: Optional[int] = None,
                 mtime_ns: Optional[int] = None) -> os.stat_result:
    """Write ``target`` via a temp file beside it and a rename: readers see old or new, whole.

    Raises OSError; the temp file never outlives a failure. Returns the new file's stat.
    """
    temp = side_path(target, TEMP_MARK + uuid.uuid4().hex[:8])
    if mode is None:
        try:
            existing = os.stat(target)
            if stat.S_ISREG(existing.st_mode):
                mode = stat.S_IMODE(existing.st_mode)  # keep an overwritten file's mode
        except OSError:
            pass
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY, 0o666)
        try:
            write_at(fd, 0, data)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(temp, mode & 0o7777)
        if mtime_ns is not None:
            os.utime(temp, ns=(mtime_ns, mtime_ns))
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    return os.stat(target)


def ensure_parent(target: str, make_dirs: bool) -> None:
    """Make sure ``target``'s directory exists, with errors that name what is in the way."""
    parent = os.path.dirname(target)
    if os.path.isdir(parent):
        return
    probe = parent
    while not os.path.lexists(probe):
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    if os.path.lexists(probe) and not os.path.isdir(probe):
        raise OpError(ErrorCode.NOT_A_DIRECTORY,
                      "%s: cannot create it: %s is not a directory" % (target, probe),
                      {"path": target, "blocking_path": probe})
    if not make_dirs:
        raise OpError(ErrorCode.NOT_FOUND,
                      "%s: parent directory %s does not exist" % (target, parent),
                      {"path": target})
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise paths.os_error(exc, parent) from None


def refuse_directory(target: str) -> None:
    if os.path.isdir(target):
        raise OpError(ErrorCode.IS_A_DIRECTORY, "%s: is a directory" % target, {"path": target})


def _not_regular(path: str, mode: int) -> OpError:
    if stat.S_ISDIR(mode):
        return OpError(ErrorCode.IS_A_DIRECTORY, "%s: is a directory" % path, {"path": path})
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
    return OpError(ErrorCode.INVALID_ARGUMENT, "%s: not a regular file (%s)" % (path, kind),
                   {"path": path})


def open_regular(path: str) -> Tuple[int, os.stat_result]:
    """Open ``path`` (symlinks followed) for reading, refusing anything but a regular file.

    The open itself must not block: O_NONBLOCK makes opening a FIFO return at once (plain
    O_RDONLY waits forever for a writer), fstat then checks what was opened (no race with a
    swap after a stat), and blocking mode is restored for the reads. Raises OpError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | O_BINARY | _O_NONBLOCK)
    except OSError as exc:
        try:  # a socket (ENXIO) and the like cannot be opened: say what it is instead
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode) from None
        raise paths.os_error(exc, path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise paths.os_error(exc, path) from None
        raise
    return fd, st


def file_type(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    return "other"
