"""Paths on the remote: resolving, confinement to a tree, and the names of side files.

Relative paths mean the Jupyter server's root directory. Names visible on the remote disk
beside a file being written (no hidden staging folders, which a stock Jupyter server refuses
to serve):

- ``<target>.tether-part``       an upload in progress (pre-sized, possibly sparse);
- ``<target>.tether-part.json``  its sidecar (see transfer_state), so that a new supervisor
  (after a kernel restart) resumes it;
- ``<target>.tether-tmp-<hex>``  a small atomic write between its write and its rename.

Where ``<target>``'s name is too long for a suffix, ``side_name`` keeps a byte-counted
prefix plus a hash, so every valid (255-byte) name can be transferred. ``check_relpath``
and the side names are shared with the controller.
"""

import hashlib
import os
from typing import Any, List, Optional

from .wire import ErrorCode, OpError

PART_SUFFIX = ".tether-part"
SIDECAR_SUFFIX = PART_SUFFIX + ".json"
TEMP_MARK = ".tether-tmp-"
# The longest file name most file systems take (ext4, XFS, btrfs, APFS: 255 bytes).
NAME_MAX_BYTES = 255


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


# --- paths inside a tree (shared with the controller's extraction) -----------------------


def check_relpath(relpath: Any) -> str:
    """Validate a path inside a tree and return its normal ``a/b/c`` form.

    Refuses what could land outside the tree: absolute paths, drive letters, ``..``
    segments, NUL bytes, and the empty path (the root itself).
    """
    if not isinstance(relpath, str):
        raise OpError(ErrorCode.INVALID_ARGUMENT, "relative path must be a string, got %s"
                      % type(relpath).__name__)
    if "\x00" in relpath:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "path %r contains a NUL byte" % relpath)
    text = relpath.replace(os.sep, "/") if os.sep != "/" else relpath
    if text.startswith("/") or os.path.isabs(relpath) or os.path.splitdrive(relpath)[0]:
        raise OpError(ErrorCode.INVALID_ARGUMENT,
                      "path %r must be relative to the tree's root" % relpath)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "path %r must not contain '..'" % relpath)
    if not parts:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "path %r names the root itself" % relpath)
    return "/".join(parts)


def is_inside(path: str, real_root: str) -> bool:
    """Whether ``path`` is ``real_root`` or below it (compare real paths)."""
    return path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep)


def join_inside(root: str, relpath: Any, *, follow_final: bool = False,
                real_root: Optional[str] = None) -> str:
    """``root/relpath`` after checking that it cannot resolve outside ``root``.

    Directory symlinks on the way are resolved; the final component is resolved too only
    with ``follow_final`` (reads follow it, writes and deletes replace or remove the link).
    """
    rel = check_relpath(relpath)
    target = os.path.join(root, *rel.split("/"))
    real_root = real_root or os.path.realpath(root)
    probe = target if follow_final else os.path.dirname(target)
    if not is_inside(os.path.realpath(probe), real_root):
        raise OpError(ErrorCode.INVALID_ARGUMENT,
                      "%s: resolves outside %s (through a symlink)" % (target, root),
                      {"path": target, "root": root})
    return target


# --- names ---------------------------------------------------------------------------------


def encodable(name: str) -> bool:
    # Undecodable bytes in a name come back from os.scandir as surrogates, which neither
    # msgpack nor JSON can carry.
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(name: str) -> str:
    return os.fsencode(name).decode("utf-8", "replace")


def is_transfer_debris(name: str) -> bool:
    return name.endswith((PART_SUFFIX, SIDECAR_SUFFIX)) or TEMP_MARK in name


def _name_bytes(text: str) -> int:
    # surrogatepass: an undecodable byte (a lone surrogate) counts 3, never too few.
    return len(text.encode("utf-8", "surrogatepass"))


def side_name(name: str, suffix: str) -> str:
    """``name + suffix`` (a part, sidecar or temp file beside ``name``), within 255 bytes.

    A name too long for the suffix keeps the longest prefix that fits, cut at a character
    boundary and counted in bytes, followed by a hash of the whole name so that two long
    names sharing a prefix get different side files. The suffix is kept, so debris is still
    recognised by it.
    """
    full = name + suffix
    if _name_bytes(full) <= NAME_MAX_BYTES:
        return full
    digest = "." + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    room = NAME_MAX_BYTES - _name_bytes(suffix) - len(digest)
    kept: List[str] = []
    for char in name:
        room -= _name_bytes(char)
        if room < 0:
            break
        kept.append(char)
    return "".join(kept) + digest + suffix


def side_path(path: str, suffix: str) -> str:
    """``path + suffix`` with the final name shortened by ``side_name``."""
    directory, name = os.path.split(path)
    return os.path.join(directory, side_name(name, suffix))
