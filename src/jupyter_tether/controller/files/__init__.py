"""Files on the remote: chunked resumable transfers, small-file ops, delta sync, tree download.

Every op is a supervisor op sent through a ``Caller`` (``agent_payload`` holds the remote
half and documents each op), never the contents API. Uploads, small files and manifests
travel over the comm; a download streams with ranged ``GET /files`` where the server
serves the file, and over the comm elsewhere. ``AsyncFiles`` (``service``) is the face;
each module below says one thing:

- ``tuning``        chunk, batch and window sizes, timeouts, retries;
- ``excludes``      the default sync excludes (one table) and ``exclude`` arguments;
- ``local``         local I/O (positional, sha256, atomic writes) and names from the remote;
- ``scan``          the local tree a sync sends (excludes, ``.gitignore`` scoping);
- ``ranges``        cutting the missing byte ranges into chunks (the range arithmetic is
                    the payload's ``transfer_state``, shared with the remote side);
- ``part``          a download's ``.tether-part`` file and its sidecar;
- ``progress``, ``result``  progress callbacks and ``TransferResult``;
- ``remote``        the manifest fetch and the error helpers every transfer shares;
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
