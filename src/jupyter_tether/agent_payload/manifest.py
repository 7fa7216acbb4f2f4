"""A tree's manifest (what a sync compares) and the rules that keep a deleting sync safe.

``build_manifest`` is shared with the controller, which builds its local manifests with it
so that the two sides compare like with like.
"""

import os
import stat
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import paths
from .excludes import ExcludeMatcher, make_matcher
from .hashing import HashCache, cache_key, sha256_file
from .wire import ErrorCode, OpError


def build_manifest(
    root: str,
    excludes: Union[str, Iterable[str], ExcludeMatcher, None] = None,
    *,
    hash_files: bool = True,
    cache: Optional[HashCache] = None,
    skip_dirs: Sequence[str] = (),
) -> Dict[str, Any]:
    """Walk a tree and describe it: files (size, mtime, sha256, mode), dirs and symlinks.

    Symlinks are reported with their target and never followed; excluded directories are
    not descended into; in-progress tether transfers and ``skip_dirs`` (absolute paths, the
    supervisor's state folder) are left out. Unreadable subdirectories are listed under
    ``errors`` instead of failing the whole walk. ``hashed`` counts files hashed this time
    (the rest came from ``cache``).
    """
    matcher = excludes if isinstance(excludes, ExcludeMatcher) else make_matcher(excludes)
    result: Dict[str, Any] = {"path": root, "exists": False, "files": [], "dirs": [],
                              "symlinks": [], "others": [], "errors": [], "hashed": 0,
                              "cached": 0}
    try:
        root_st = os.stat(root)
    except FileNotFoundError:
        return result
    except OSError as exc:
        raise paths.os_error(exc, root) from None
    if not stat.S_ISDIR(root_st.st_mode):
        raise OpError(ErrorCode.NOT_A_DIRECTORY, "%s: not a directory" % root, {"path": root})
    result["exists"] = True
    if cache is not None and hash_files:
        cache.load_root(root)
    skip = {os.path.normcase(os.path.abspath(d)) for d in skip_dirs}
    files: List[Dict[str, Any]] = []
    persisted: Dict[str, List[Any]] = {}
    stack: List[Tuple[str, str]] = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        try:
            iterator = os.scandir(abs_dir)
        except OSError as exc:
            if not rel_dir:
                raise paths.os_error(exc, abs_dir) from None
            error = paths.os_error(exc, abs_dir)
            result["errors"].append({"path": rel_dir, "code": error.code,
                                     "message": error.message})
            continue
        with iterator:
            for entry in iterator:
                rel = rel_dir + "/" + entry.name if rel_dir else entry.name
                if not paths.encodable(entry.name):
                    result["errors"].append({"path": paths.printable(rel), "code": "invalid_argument",
                                             "message": "name is not valid UTF-8: skipped"})
                    continue
                try:
                    is_link = entry.is_symlink()
                    is_dir = not is_link and entry.is_dir(follow_symlinks=False)
                    if matcher and matcher.excludes_entry(rel, is_dir):
                        continue
                    if is_link:
                        result["symlinks"].append({"path": rel,
                                                   "target": os.readlink(entry.path)})
                    elif is_dir:
                        if os.path.normcase(entry.path) in skip:
                            continue
                        result["dirs"].append(rel)
                        stack.append((rel, entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        if paths.is_transfer_debris(entry.name):
                            continue
                        st = entry.stat(follow_symlinks=False)
                        digest = None
                        if hash_files:
                            digest = cache.get(entry.path, st) if cache is not None else None
                            if digest is None:
                                digest = sha256_file(entry.path)
                                result["hashed"] += 1
                                if cache is not None:
                                    cache.put(entry.path, st, digest)
                            else:
                                result["cached"] += 1
                            persisted[rel] = [*cache_key(st), digest]
                        files.append({"path": rel, "size": st.st_size,
                                      "mtime": st.st_mtime, "mtime_ns": st.st_mtime_ns,
                                      "sha256": digest, "mode": stat.S_IMODE(st.st_mode)})
                    else:
                        result["others"].append(rel)
                except OSError as exc:  # vanished or unreadable meanwhile: say so, go on
                    error = paths.os_error(exc, entry.path)
                    result["errors"].append({"path": rel, "code": error.code,
                                             "message": error.message})
    files.sort(key=lambda f: f["path"])
    result["files"] = files
    result["dirs"].sort()
    result["symlinks"].sort(key=lambda s: s["path"])
    result["others"].sort()
    if cache is not None and hash_files:
        cache.save_root(root, persisted)
    return result


def delete_protection(root: str, server_root: str, state_dir: str) -> Optional[str]:
    """Why a sync must not delete inside ``root`` unless told so explicitly, or None.

    Protected (by real path, so links and ``..`` do not get around it): the file system
    root, the Jupyter server's root, the home directory, the supervisor's state folder,
    and every directory above one of these.
    """
    real = os.path.realpath(root)
    if os.path.dirname(real) == real:
        return "it is the root of the file system"
    named = (("the Jupyter server's root directory", server_root),
             ("the home directory", os.path.expanduser("~")),
             ("the supervisor's state folder", state_dir))
    for what, path in named:
        protected = os.path.realpath(path)
        if real == protected:
            return "it is %s" % what
        if paths.is_inside(protected, real):
            return "it holds %s (%s)" % (what, protected)
    return None


def protected_root_error(root: str, reason: str) -> OpError:
    """The refusal of a deleting sync into a protected directory (see delete_protection)."""
    return OpError(ErrorCode.PERMISSION_DENIED,
                   "%s: refusing to delete files there: %s. A sync that deletes (clean_remote, "
                   "--delete) leaves only what the local directory holds. Sync into a "
                   "subdirectory, sync without deleting, or pass allow_root_delete=true "
                   "(CLI: --allow-root-delete) if that is really meant" % (root, reason),
                   {"path": root, "reason": "protected_root", "flag": "allow_root_delete"})


def unlisted_entries(directory: str, rel_dir: str, listed: "set[str]",
                     limit: int = 5) -> List[str]:
    """Up to ``limit`` entries under ``directory`` (relative paths) missing from ``listed``."""
    found: List[str] = []
    stack = [(directory, rel_dir)]
    while stack and len(found) < limit:
        abs_dir, rel = stack.pop()
        try:
            with os.scandir(abs_dir) as iterator:
                entries = list(iterator)
        except OSError:
            found.append(paths.printable(rel) + "/ (unreadable)")
            continue
        for entry in entries:
            child = rel + "/" + entry.name
            if child not in listed:
                found.append(paths.printable(child))
            elif entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, child))
            if len(found) >= limit:
                break
    return found
