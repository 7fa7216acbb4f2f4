"""Files on the remote: chunked resumable transfers, small-file ops, delta sync, tree download.

Bytes travel over the supervisor's comm (``agent_payload`` holds the remote half and
documents each op), never through the contents API; downloads may use ranged
``GET /files`` instead where the server serves the file. ``AsyncFiles`` (``service``) is
the face; each module below says one thing:

- ``tuning``        chunk, batch and window sizes, timeouts, retries;
- ``excludes``      the default sync excludes (one table) and ``exclude`` arguments;
- ``local``         local I/O (positional, sha256, atomic writes) and names from the remote;
- ``scan``          the local tree a sync sends (excludes, ``.gitignore`` scoping);
- ``ranges``        byte-range arithmetic of resumable transfers (pure);
- ``part``          a download's ``.tether-part`` file and its sidecar;
- ``progress``, ``result``  progress callbacks and ``TransferResult``;
- ``channel``       the few things of a tether the services use, and shared error helpers;
- ``upload``, ``download``  one file each way, resumable;
- ``plan``          ``plan_sync``: what a sync uploads and deletes, or why it refuses (pure);
- ``sync``          executing that plan; ``download_dir``: a remote tree into a local one.

Memory on each side stays bounded by ``window * chunk_size`` whatever the file size.
"""

from .excludes import DEFAULT_SYNC_EXCLUDES, REFERENCE_EXCLUDE_GLOBS_CSV
from .local import check_local_name, make_dirs_inside, safe_local_path, sha256_path
from .plan import SyncOptions, SyncPlan, plan_sync
from .progress import ProgressCallback
from .result import TransferResult
from .scan import LocalEntry, LocalTree, scan_local, scoped_gitignore_pattern
from .service import AsyncFiles
from .tuning import DEFAULT_CHUNK_BYTES, DEFAULT_SYNC_MAX_BYTES, DEFAULT_WINDOW

__all__ = [
    "DEFAULT_CHUNK_BYTES", "DEFAULT_SYNC_EXCLUDES", "DEFAULT_SYNC_MAX_BYTES", "DEFAULT_WINDOW",
    "REFERENCE_EXCLUDE_GLOBS_CSV", "AsyncFiles", "LocalEntry", "LocalTree", "ProgressCallback",
    "SyncOptions", "SyncPlan", "TransferResult", "check_local_name", "make_dirs_inside",
    "plan_sync", "safe_local_path", "scan_local", "scoped_gitignore_pattern", "sha256_path",
]
