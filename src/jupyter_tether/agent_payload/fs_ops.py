"""Small-file ops: list, stat, read, write, mkdir and remove one path, whole in one message.

Paths resolve against the Jupyter server's root (absolute ones are taken as given: the remote
is the user's own machine). Bigger files go through uploads and downloads, in chunks.
"""

import hashlib
import os
import shutil
import stat
from typing import Any, Dict, List

from . import paths
from .args import optional_mode, optional_mtime_ns
from .fsutil import atomic_write, ensure_parent, file_type, open_regular, read_at, refuse_directory
from .hashing import HashCache, require_unchanged
from .supervisor import Request, Result, Supervisor
from .wire import ErrorCode, OpError, arg

FS_READ_MAX_BYTES = 8 * 1024 * 1024
FS_LIST_MAX_ENTRIES = 10000


class FsOps:
    """The ``fs_*`` ops. Writes keep ``hashes`` current, so a manifest need not rehash them."""

    def __init__(self, supervisor: Supervisor, hashes: HashCache):
        self.supervisor = supervisor
        self.hashes = hashes

    def resolve(self, path: Any) -> str:
        return paths.resolve(self.supervisor.root_dir, path)

    def fs_list(self, req: Request) -> Dict[str, Any]:
        path = self.resolve(arg(req.args, "path", str, ""))
        limit = arg(req.args, "max_entries", int, FS_LIST_MAX_ENTRIES)
        entries: List[Dict[str, Any]] = []
        try:
            with os.scandir(path) as iterator:
                for entry in iterator:
                    item: Dict[str, Any] = {"name": entry.name}
                    if not paths.encodable(entry.name):
                        item.update(name=paths.printable(entry.name), undecodable_name=True)
                    try:
                        st = entry.stat(follow_symlinks=False)
                        item.update(type=file_type(st.st_mode), size=st.st_size,
                                    mtime=st.st_mtime)
                        if stat.S_ISLNK(st.st_mode):
                            item["target"] = os.readlink(entry.path)
                    except OSError:  # vanished while listing
                        item.update(type="other", size=None, mtime=None)
                    entries.append(item)
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        entries.sort(key=lambda e: e["name"])
        total = len(entries)
        return {"path": path, "entries": entries[:max(0, limit)], "total": total,
                "truncated": total > limit}

    def fs_stat(self, req: Request) -> Dict[str, Any]:
        path = self.resolve(arg(req.args, "path", str))
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return {"path": path, "exists": False}
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        result = {"path": path, "exists": True, "type": file_type(st.st_mode),
                  "size": st.st_size, "mtime": st.st_mtime, "mode": stat.S_IMODE(st.st_mode)}
        if stat.S_ISLNK(st.st_mode):
            result["target"] = os.readlink(path)
            try:
                result["target_type"] = file_type(os.stat(path).st_mode)
            except OSError:
                result["target_type"] = None  # dangling
        return result

    def fs_read(self, req: Request) -> Result:
        path = self.resolve(arg(req.args, "path", str))
        offset = arg(req.args, "offset", int, 0)
        max_bytes = arg(req.args, "max_bytes", int, FS_READ_MAX_BYTES)
        if offset < 0 or max_bytes < 0:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "offset and max_bytes must be >= 0")
        max_bytes = min(max_bytes, FS_READ_MAX_BYTES)
        refuse_directory(path)
        fd, st = open_regular(path)  # a FIFO would block the open and the read forever
        try:
            size = st.st_size
            # Read past st_size: /proc and /sys files report 0 bytes yet have content.
            data = read_at(fd, offset, max_bytes)
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        finally:
            os.close(fd)
        eof = len(data) < max_bytes or offset + len(data) >= size
        return Result({"path": path, "size": max(size, offset + len(data)), "offset": offset,
                       "length": len(data), "eof": eof}, [data])

    def fs_write(self, req: Request) -> Dict[str, Any]:
        path = self.resolve(arg(req.args, "path", str))
        make_dirs = arg(req.args, "make_dirs", bool, True)
        mode = optional_mode(req.args)
        text = arg(req.args, "text", str, None, allow_none=True)
        if req.buffers:
            data = req.buffers[0]
        elif text is not None:
            data = text.encode("utf-8")
        else:
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "fs_write needs the content in buffers[1] (or a 'text' argument)")
        if_sha256 = arg(req.args, "if_sha256", str, None, allow_none=True)
        refuse_directory(path)
        ensure_parent(path, make_dirs)
        require_unchanged(path, if_sha256)
        try:
            st = atomic_write(path, data, mode, optional_mtime_ns(req.args))
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        digest = hashlib.sha256(data).hexdigest()
        self.hashes.put(path, st, digest)
        return {"path": path, "size": len(data), "sha256": digest}

    def fs_mkdir(self, req: Request) -> Dict[str, Any]:
        path = self.resolve(arg(req.args, "path", str))
        parents = arg(req.args, "parents", bool, True)
        if os.path.isdir(path):
            return {"path": path, "created": False}
        try:
            if parents:
                os.makedirs(path)
            else:
                os.mkdir(path)
        except FileExistsError:
            if os.path.isdir(path):  # a concurrent mkdir won the race
                return {"path": path, "created": False}
            raise OpError(ErrorCode.CONFLICT, "%s: exists and is not a directory" % path,
                          {"path": path}) from None
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        return {"path": path, "created": True}

    def fs_remove(self, req: Request) -> Dict[str, Any]:
        path = self.resolve(arg(req.args, "path", str))
        recursive = arg(req.args, "recursive", bool, False)
        missing_ok = arg(req.args, "missing_ok", bool, False)
        protected = {os.path.abspath(os.sep), self.supervisor.root_dir,
                     self.supervisor.state_dir, os.path.expanduser("~")}
        if os.path.abspath(path) in protected:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "%s: refusing to remove it" % path,
                          {"path": path})
        try:
            st = os.lstat(path)
            kind = file_type(st.st_mode)
            if kind != "directory":
                os.unlink(path)
            elif recursive:
                shutil.rmtree(path)
            else:
                try:
                    os.rmdir(path)
                except OSError as exc:
                    if os.path.isdir(path) and os.listdir(path):
                        raise OpError(ErrorCode.CONFLICT,
                                      "%s: directory not empty (pass recursive=true)" % path,
                                      {"path": path}) from None
                    raise exc
        except FileNotFoundError as exc:
            if missing_ok:
                return {"path": path, "removed": False, "type": None}
            raise paths.os_error(exc, path) from None
        except OSError as exc:
            raise paths.os_error(exc, path) from None
        return {"path": path, "removed": True, "type": kind}
