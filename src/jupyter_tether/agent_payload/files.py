"""File service of the payload: assembles the file ops and registers them on a supervisor.

Runs in the remote kernel (standard library only, Python >= 3.9). Every op works on real
paths through the comm, never through the contents API, and keeps memory bounded by one
chunk. The ops live by kind:

- ``fs_ops``      small files whole: ``fs_list``, ``fs_stat``, ``fs_read``, ``fs_write``...
- ``uploads``     resumable chunked uploads into ``<target>.tether-part`` (``upload_*``);
- ``downloads``   chunked downloads, one chunk per request (``download_*``);
- ``tree_sync``   directory sync: ``manifest``, ``batch_write``, ``sync_delete``, ``batch_read``.

They share one ``HashCache`` (``hashing``), so files the ops wrote need no rehash in the next
manifest. The pure helpers are in ``excludes``, ``paths``, ``fsutil``, ``hashing``,
``manifest`` and ``transfer_state``.
"""

import os
from typing import Any, Callable, Dict

from .downloads import Downloads
from .fs_ops import FsOps
from .hashing import HashCache
from .supervisor import Request, Supervisor
from .tree_sync import TreeSync
from .uploads import Uploads
from .wire import Op


class FilesService:
    """The file ops of one supervisor, by kind, over one hash cache."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.hashes = HashCache(os.path.join(supervisor.state_dir, "hash-cache"))
        self.fs = FsOps(supervisor, self.hashes)
        self.uploads = Uploads(supervisor, self.hashes)
        self.downloads = Downloads(supervisor, self.hashes)
        self.sync = TreeSync(supervisor, self.hashes)

    def close(self) -> None:
        self.uploads.close()  # part files and sidecars stay: a new supervisor resumes them
        self.downloads.close()

    def ops(self) -> Dict[str, Any]:
        """Op name -> (handler, blocking). Quick ops run inline on the kernel's thread; the
        rest, which may touch a lot of disk, on the supervisor's worker pool."""
        quick: Dict[str, Callable[[Request], Any]] = {
            Op.FS_LIST: self.fs.fs_list,
            Op.FS_STAT: self.fs.fs_stat,
            Op.FS_MKDIR: self.fs.fs_mkdir,
            Op.UPLOAD_BEGIN: self.uploads.upload_begin,
            # Inline on purpose: chunks are written in arrival order, so they hash as they come.
            Op.UPLOAD_CHUNK: self.uploads.upload_chunk,
            Op.DOWNLOAD_END: self.downloads.download_end,
            # Returns at once: the reply is sent when the background hash is done.
            Op.DOWNLOAD_HASH: self.downloads.download_hash,
        }
        slow: Dict[str, Callable[[Request], Any]] = {
            Op.FS_READ: self.fs.fs_read,
            Op.FS_WRITE: self.fs.fs_write,
            Op.FS_REMOVE: self.fs.fs_remove,
            Op.UPLOAD_COMMIT: self.uploads.upload_commit,
            Op.DOWNLOAD_BEGIN: self.downloads.download_begin,
            Op.DOWNLOAD_CHUNK: self.downloads.download_chunk,
            Op.MANIFEST: self.sync.manifest,
            Op.BATCH_WRITE: self.sync.batch_write,
            Op.SYNC_DELETE: self.sync.sync_delete,
            Op.BATCH_READ: self.sync.batch_read,
        }
        table: Dict[str, Any] = {op: (handler, False) for op, handler in quick.items()}
        table.update((op, (handler, True)) for op, handler in slow.items())
        return table


def register(supervisor: Supervisor) -> None:
    """Register the file ops on ``supervisor``."""
    service = FilesService(supervisor)
    for op, (handler, blocking) in service.ops().items():
        supervisor.register(op, handler, blocking=blocking)
    supervisor.add_closer(service.close)
