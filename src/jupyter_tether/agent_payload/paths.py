"""Remote path resolution: relative paths mean the Jupyter server's root directory."""

import os
from typing import Optional

from .wire import ErrorCode, OpError


def resolve(root_dir: str, path: Optional[str]) -> str:
    """Resolve a client path against ``root_dir``; absolute paths are taken as given.

    The remote is the user's own machine, so absolute paths are allowed; every error
    message names the resolved path so the user sees what we touched.
    """
    if path is None:
        path = ""
    if not isinstance(path, str):
        raise OpError(ErrorCode.INVALID_ARGUMENT, "path must be a string, got %s"
                      % type(path).__name__)
    if "\x00" in path:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "path contains a NUL byte")
    expanded = os.path.expanduser(path) if path.startswith("~") else path
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    return os.path.normpath(os.path.join(root_dir, expanded))


def os_error(exc: OSError, resolved: str) -> OpError:
    """Turn an OSError into a typed error that names the resolved path."""
    import errno

    code = {
        errno.ENOENT: ErrorCode.NOT_FOUND,
        errno.EACCES: ErrorCode.PERMISSION_DENIED,
        errno.EPERM: ErrorCode.PERMISSION_DENIED,
        errno.EISDIR: ErrorCode.IS_A_DIRECTORY,
        errno.ENOTDIR: ErrorCode.NOT_A_DIRECTORY,
        errno.EEXIST: ErrorCode.CONFLICT,
    }.get(exc.errno or 0, ErrorCode.INTERNAL)
    reason = exc.strerror or str(exc)
    return OpError(code, "%s: %s" % (resolved, reason), {"path": resolved, "errno": exc.errno})
