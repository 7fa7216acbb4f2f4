"""File service of the payload: small-file ops, resumable chunked transfers and sync manifests.

Runs in the remote kernel (standard library only, Python >= 3.9). Every op works on real
paths through the comm, never through the contents API, and keeps memory bounded by one
chunk: uploads are written with seek+write into ``<target>.tether-part`` beside the target
and renamed into place only once the sha256 matches; downloads answer one chunk request at
a time while the client keeps its own credit window of requests in flight.

Names visible on the remote disk (no hidden staging folders, which a stock Jupyter server
refuses to serve):

- ``<target>.tether-part``       an upload in progress (pre-sized, possibly sparse);
- ``<target>.tether-part.json``  its sidecar: size, sha256, received ranges, so that a new
  supervisor (after a kernel restart) resumes it;
- ``<target>.tether-tmp-<hex>``  a small atomic write between its write and its rename.

Where ``<target>``'s name is too long for a suffix, ``side_name`` keeps a byte-counted
prefix plus a hash, so every valid (255-byte) name can be transferred.

The pure helpers at the top (``make_matcher``, ``check_relpath``, ``build_manifest``,
``HashCache``) are shared with the controller, which builds its local manifests with them so
the two sides compare like with like.
"""

import hashlib
import json
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import paths, wire
from .supervisor import Request, Result, Supervisor
from .wire import ErrorCode, OpError, arg

PART_SUFFIX = ".tether-part"
SIDECAR_SUFFIX = PART_SUFFIX + ".json"
TEMP_MARK = ".tether-tmp-"
SIDECAR_VERSION = 1
# The longest file name most file systems take (ext4, XFS, btrfs, APFS: 255 bytes).
NAME_MAX_BYTES = 255

FS_READ_MAX_BYTES = 8 * 1024 * 1024
FS_LIST_MAX_ENTRIES = 10000
BATCH_READ_DEFAULT_BYTES = wire.MAX_CHUNK_BYTES
BATCH_READ_MAX_BYTES = 4 * wire.MAX_CHUNK_BYTES
# Above this a manifest no longer fits an envelope (wire.MAX_ENVELOPE_BYTES): ask for a blob.
MANIFEST_INLINE_MAX_BYTES = wire.MAX_ENVELOPE_BYTES - 64 * 1024
HASH_BLOCK_BYTES = 1024 * 1024
# Open download file descriptors kept between chunk requests; older ones are reopened lazily.
MAX_OPEN_DOWNLOADS = 32
MAX_KNOWN_DOWNLOADS = 1024
# Open upload part files kept between chunks; the least recently used are closed and
# reopened lazily by their next chunk, so abandoned uploads cannot use up descriptors.
MAX_OPEN_UPLOADS = 32

_TRANSFER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_O_BINARY = getattr(os, "O_BINARY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

Ranges = List[List[int]]
Matcher = Callable[[str, bool], bool]


# --- exclude matching (shared with the controller) ----------------------------------------


def _translate_glob(pattern: str) -> str:
    """Regex source for a gitignore-style glob: ``*`` and ``?`` stop at ``/``, ``**`` does not."""
    out: List[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**/", i):
                out.append("(?:.*/)?")  # zero or more whole directories
                i += 3
                continue
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")
            else:
                body = pattern[i + 1:j]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
                continue
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


class _Rule:
    __slots__ = ("anchored", "dir_only", "negate", "regex")

    def __init__(self, regex: "re.Pattern[str]", negate: bool, dir_only: bool, anchored: bool):
        self.regex = regex
        self.negate = negate
        self.dir_only = dir_only
        self.anchored = anchored


def _compile_rule(line: str) -> Optional[_Rule]:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    negate = text.startswith("!")
    if negate or text.startswith(("\\!", "\\#")):  # "\!" and "\#" escape a literal
        text = text[1:]
    dir_only = text.endswith("/")
    text = text.rstrip("/")
    if text.startswith("./"):
        text = text[2:]
    # As in .gitignore: a pattern with a slash (other than a trailing one) is anchored to the
    # root; one without matches a name at any depth.
    anchored = "/" in text
    text = text.lstrip("/")
    if not text:
        return None
    try:
        regex = re.compile("(?:%s)\\Z" % _translate_glob(text), re.DOTALL)
    except re.error:  # an unbalanced class: match the pattern literally rather than fail
        regex = re.compile(re.escape(text) + "\\Z")
    return _Rule(regex, negate, dir_only, anchored)


class ExcludeMatcher:
    """Gitignore-like exclude patterns; ``matcher(relpath, is_dir)`` says whether to skip it.

    ``relpath`` is relative to the tree's root, with ``/`` separators. A pattern without
    ``/`` matches a name at any depth (``.git``, ``*.pyc``, ``node_modules``); one with a
    ``/`` matches the whole relative path (``build/out``, ``**/cache/*.bin``); a trailing
    ``/`` matches directories only; ``!pattern`` re-includes; ``#`` lines are comments, so
    the lines of a ``.gitignore`` can be passed as they are. The last matching pattern wins,
    and anything under an excluded directory is excluded.
    """

    def __init__(self, patterns: Iterable[str] = ()):
        self.patterns = [p for p in patterns if isinstance(p, str)]
        self._rules = [r for r in (_compile_rule(p) for p in self.patterns) if r is not None]

    def __bool__(self) -> bool:
        return bool(self._rules)

    def excludes_entry(self, relpath: str, is_dir: bool) -> bool:
        """Whether this entry itself is excluded, assuming its parents were not (for walks)."""
        excluded = False
        name = relpath.rsplit("/", 1)[-1]
        for rule in self._rules:
            # Only a rule that would flip the current verdict needs testing.
            if rule.negate != excluded or (rule.dir_only and not is_dir):
                continue
            if rule.regex.match(relpath if rule.anchored else name):
                excluded = not excluded
        return excluded

    def __call__(self, relpath: str, is_dir: bool = False) -> bool:
        parts = [p for p in relpath.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts or not self._rules:
            return False
        for depth in range(1, len(parts)):
            if self.excludes_entry("/".join(parts[:depth]), True):
                return True
        return self.excludes_entry("/".join(parts), is_dir)


def make_matcher(patterns: Union[str, Iterable[str], None]) -> ExcludeMatcher:
    """Build an exclude matcher from a list of patterns, or from a comma/newline separated str."""
    if patterns is None:
        return ExcludeMatcher(())
    if isinstance(patterns, str):
        patterns = re.split(r"[,\n]", patterns)
    return ExcludeMatcher(patterns)


# --- paths inside a sync root (shared with the controller's extraction) -------------------


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


def _is_inside(path: str, real_root: str) -> bool:
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
    if not _is_inside(os.path.realpath(probe), real_root):
        raise OpError(ErrorCode.INVALID_ARGUMENT,
                      "%s: resolves outside %s (through a symlink)" % (target, root),
                      {"path": target, "root": root})
    return target


# --- hashing and the hash cache ------------------------------------------------------------


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
    view = memoryview(data)
    while len(view):
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, view, offset)
        else:  # pragma: no cover - Windows: callers hold the file's lock around this
            os.lseek(fd, offset, os.SEEK_SET)
            written = os.write(fd, view)
        view = view[written:]
        offset += written


def _hash_fd(fd: int, start: int = 0, hasher: Any = None) -> Tuple[Any, int]:
    """Feed the file from ``start`` to its end into ``hasher``; returns it and the end offset."""
    hasher = hasher if hasher is not None else hashlib.sha256()
    offset = start
    while True:
        block = read_at(fd, offset, HASH_BLOCK_BYTES)
        if not block:
            return hasher, offset
        hasher.update(block)
        offset += len(block)


def sha256_file(path: str) -> str:
    """Streaming sha256 of a file: memory stays at one block whatever its size."""
    fd = os.open(path, os.O_RDONLY | _O_BINARY)
    try:
        return _hash_fd(fd)[0].hexdigest()
    finally:
        os.close(fd)


CacheKey = Tuple[int, int, int, int]


def _cache_key(st: os.stat_result) -> CacheKey:
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
        if entry is not None and entry[0] == _cache_key(st):
            return entry[1]
        return None

    def put(self, path: str, st: os.stat_result, sha256: str) -> None:
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()  # crude but bounded: the next manifests rebuild it
            self._entries[path] = (_cache_key(st), sha256)

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
            _atomic_write(cache_file, data.encode("utf-8"))
        except OSError:
            pass


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
                if not _encodable(entry.name):
                    result["errors"].append({"path": _printable(rel), "code": "invalid_argument",
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
                        if _is_transfer_debris(entry.name):
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
                            persisted[rel] = [*_cache_key(st), digest]
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


def _encodable(name: str) -> bool:
    # Undecodable bytes in a name come back from os.scandir as surrogates, which neither
    # msgpack nor JSON can carry.
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(name: str) -> str:
    return os.fsencode(name).decode("utf-8", "replace")


def _is_transfer_debris(name: str) -> bool:
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


def protected_root_error(root: str, reason: str) -> OpError:
    """The refusal of a deleting sync into a protected directory (see delete_protection)."""
    return OpError(ErrorCode.PERMISSION_DENIED,
                   "%s: refusing to delete files there: %s. A sync that deletes (clean_remote, "
                   "--delete) leaves only what the local directory holds. Sync into a "
                   "subdirectory, sync without deleting, or pass allow_root_delete=true "
                   "(CLI: --allow-root-delete) if that is really meant" % (root, reason),
                   {"path": root, "reason": "protected_root", "flag": "allow_root_delete"})


def _unlisted_entries(directory: str, rel_dir: str, listed: "set[str]",
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
            found.append(_printable(rel) + "/ (unreadable)")
            continue
        for entry in entries:
            child = rel + "/" + entry.name
            if child not in listed:
                found.append(_printable(child))
            elif entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, child))
            if len(found) >= limit:
                break
    return found


def side_path(path: str, suffix: str) -> str:
    """``path + suffix`` with the final name shortened by ``side_name``."""
    directory, name = os.path.split(path)
    return os.path.join(directory, side_name(name, suffix))


# --- small helpers --------------------------------------------------------------------------


def _atomic_write(target: str, data: bytes, mode: Optional[int] = None,
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
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
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


def _ensure_parent(target: str, make_dirs: bool) -> None:
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


def _refuse_directory(target: str) -> None:
    if os.path.isdir(target):
        raise OpError(ErrorCode.IS_A_DIRECTORY, "%s: is a directory" % target, {"path": target})


def _not_regular(path: str, mode: int) -> OpError:
    if stat.S_ISDIR(mode):
        return OpError(ErrorCode.IS_A_DIRECTORY, "%s: is a directory" % path, {"path": path})
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
    return OpError(ErrorCode.INVALID_ARGUMENT, "%s: not a regular file (%s)" % (path, kind),
                   {"path": path})


def _open_regular(path: str) -> Tuple[int, os.stat_result]:
    """Open ``path`` (symlinks followed) for reading, refusing anything but a regular file.

    The open itself must not block: O_NONBLOCK makes opening a FIFO return at once (plain
    O_RDONLY waits forever for a writer), fstat then checks what was opened (no race with a
    swap after a stat), and blocking mode is restored for the reads. Raises OpError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_BINARY | _O_NONBLOCK)
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


def _file_type(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _optional_mtime_ns(args: Dict[str, Any]) -> Optional[int]:
    """``mtime_ns`` (exact, preferred) or ``mtime`` (float seconds), or None."""
    mtime_ns = arg(args, "mtime_ns", int, None, allow_none=True)
    if mtime_ns is not None:
        return int(mtime_ns)
    mtime = arg(args, "mtime", float, None, allow_none=True)
    return None if mtime is None else round(mtime * 1e9)


def _optional_mode(args: Dict[str, Any]) -> Optional[int]:
    mode = arg(args, "mode", int, None, allow_none=True)
    if mode is not None and not 0 <= mode <= 0o7777:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "mode must be a permission value 0..0o7777")
    return mode


def _string_list(args: Dict[str, Any], name: str, default: Any = None) -> List[str]:
    values = arg(args, name, list, default if default is not None else [])
    for value in values:
        if not isinstance(value, str):
            raise OpError(ErrorCode.INVALID_ARGUMENT, "%r must be a list of strings" % name)
    return list(values)


def _merge_range(ranges: Ranges, start: int, end: int) -> Ranges:
    merged: Ranges = []
    for s, e in sorted([*ranges, [start, end]]):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def _missing_ranges(ranges: Ranges, size: int) -> Ranges:
    missing: Ranges = []
    cursor = 0
    for s, e in ranges:
        if s > cursor:
            missing.append([cursor, s])
        cursor = max(cursor, e)
    if cursor < size:
        missing.append([cursor, size])
    return missing


def _check_chunk_length(length: int, name: str = "length") -> None:
    if length > wire.MAX_CHUNK_BYTES:
        raise OpError(ErrorCode.TOO_LARGE, "%s of %d bytes exceeds the %d-byte chunk limit"
                      % (name, length, wire.MAX_CHUNK_BYTES),
                      {"limit": wire.MAX_CHUNK_BYTES})


# --- transfer state -------------------------------------------------------------------------


class _Upload:
    """One upload in progress: its part file, sidecar and the ranges that have arrived."""

    def __init__(self, transfer_id: str, target: str, size: int, sha256: str, chunk_size: int):
        self.transfer_id = transfer_id
        self.target = target
        self.part = side_path(target, PART_SUFFIX)
        self.sidecar = side_path(target, SIDECAR_SUFFIX)
        self.size = size
        self.sha256 = sha256
        self.chunk_size = chunk_size
        self.mode: Optional[int] = None
        self.mtime_ns: Optional[int] = None
        self.received: Ranges = []
        self.lock = threading.Lock()
        self.fd: Optional[int] = None
        self.committing = False
        self.done = False
        # Chunks usually arrive in order: hash them as they come so commit need not re-read
        # the file. Anything else (a resumed upload, a rewrite of hashed bytes) drops to a
        # re-read from ``hashed_upto`` at commit.
        self.hasher: Any = hashlib.sha256()
        self.hashed_upto = 0

    @property
    def received_bytes(self) -> int:
        return sum(e - s for s, e in self.received)

    def open(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.part, os.O_RDWR | _O_BINARY)
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            finally:
                self.fd = None

    def save_sidecar(self) -> None:
        # Written after the data it describes: a sidecar never claims bytes not on disk.
        data = {"version": SIDECAR_VERSION, "transfer_id": self.transfer_id,
                "target": self.target, "size": self.size, "sha256": self.sha256,
                "chunk_size": self.chunk_size, "received": self.received,
                "updated": time.time()}
        with open(self.sidecar, "w", encoding="utf-8") as handle:
            json.dump(data, handle, separators=(",", ":"))

    def describe(self) -> Dict[str, Any]:
        return {"transfer_id": self.transfer_id, "path": self.target, "size": self.size,
                "sha256": self.sha256, "chunk_size": self.chunk_size,
                "received": [list(r) for r in self.received],
                "received_bytes": self.received_bytes,
                "complete": not _missing_ranges(self.received, self.size),
                "committing": self.committing}

    def remove_debris(self) -> List[str]:
        self.close()
        removed = []
        for path in (self.part, self.sidecar):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
        return removed


def _load_sidecar(target: str) -> Optional[Dict[str, Any]]:
    try:
        with open(side_path(target, SIDECAR_SUFFIX), encoding="utf-8") as handle:
            data = json.load(handle)
        part_size = os.stat(side_path(target, PART_SUFFIX)).st_size
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != SIDECAR_VERSION:
        return None
    if data.get("size") != part_size or not isinstance(data.get("received"), list):
        return None
    return data


class _Download:
    """A file being downloaded: identity fixed at ``download_begin``, fd opened lazily."""

    def __init__(self, transfer_id: str, path: str, st: os.stat_result, fd: int):
        self.transfer_id = transfer_id
        self.path = path
        self.size = st.st_size
        self.identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.fd: Optional[int] = fd
        self.lock = threading.Lock()

    def ensure_open(self) -> int:
        if self.fd is None:
            changed = OpError(ErrorCode.CONFLICT,
                              "%s: changed since download_begin; begin again" % self.path,
                              {"path": self.path})
            try:
                fd, st = _open_regular(self.path)
            except OpError as exc:
                if exc.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.IS_A_DIRECTORY):
                    raise changed from None  # replaced by a FIFO, a directory...
                raise
            if (st.st_ino, st.st_size, st.st_mtime_ns) != self.identity:
                os.close(fd)
                raise changed
            self.fd = fd
        return self.fd

    def close(self) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


# --- the service ------------------------------------------------------------------------------


class FilesService:
    """The ``fs_*``, ``upload_*``, ``download_*`` and sync ops of one supervisor."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self._lock = threading.Lock()
        self._uploads: "OrderedDict[str, _Upload]" = OrderedDict()  # least recent first
        self._downloads: "OrderedDict[str, _Download]" = OrderedDict()
        self.hashes = HashCache(os.path.join(supervisor.state_dir, "hash-cache"))

    def resolve(self, path: Any) -> str:
        return paths.resolve(self.supervisor.root_dir, path)

    def close(self) -> None:
        with self._lock:
            uploads = list(self._uploads.values())
            downloads = list(self._downloads.values())
            self._uploads.clear()
            self._downloads.clear()
        for upload in uploads:
            with upload.lock:
                upload.close()  # the part and sidecar stay: a new supervisor resumes them
        for download in downloads:
            download.close()

    # --- small files ---------------------------------------------------------------------

    def fs_list(self, req: Request) -> Dict[str, Any]:
        path = self.resolve(arg(req.args, "path", str, ""))
        limit = arg(req.args, "max_entries", int, FS_LIST_MAX_ENTRIES)
        entries: List[Dict[str, Any]] = []
        try:
            with os.scandir(path) as iterator:
                for entry in iterator:
                    item: Dict[str, Any] = {"name": entry.name}
                    if not _encodable(entry.name):
                        item.update(name=_printable(entry.name), undecodable_name=True)
                    try:
                        st = entry.stat(follow_symlinks=False)
                        item.update(type=_file_type(st.st_mode), size=st.st_size,
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
        result = {"path": path, "exists": True, "type": _file_type(st.st_mode),
                  "size": st.st_size, "mtime": st.st_mtime, "mode": stat.S_IMODE(st.st_mode)}
        if stat.S_ISLNK(st.st_mode):
            result["target"] = os.readlink(path)
            try:
                result["target_type"] = _file_type(os.stat(path).st_mode)
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
        _refuse_directory(path)
        fd, st = _open_regular(path)  # a FIFO would block the open and the read forever
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
        mode = _optional_mode(req.args)
        text = arg(req.args, "text", str, None, allow_none=True)
        if req.buffers:
            data = req.buffers[0]
        elif text is not None:
            data = text.encode("utf-8")
        else:
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "fs_write needs the content in buffers[1] (or a 'text' argument)")
        _refuse_directory(path)
        _ensure_parent(path, make_dirs)
        try:
            st = _atomic_write(path, data, mode, _optional_mtime_ns(req.args))
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
            kind = _file_type(st.st_mode)
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

    # --- upload ----------------------------------------------------------------------------

    def _upload(self, transfer_id: Any) -> _Upload:
        if not isinstance(transfer_id, str):
            raise OpError(ErrorCode.INVALID_ARGUMENT, "argument 'transfer_id' must be str")
        with self._lock:
            upload = self._uploads.get(transfer_id)
            if upload is not None:
                self._uploads.move_to_end(transfer_id)
        if upload is None or upload.done:
            raise OpError(ErrorCode.NOT_FOUND,
                          "unknown upload %r: call upload_begin again to resume it"
                          % transfer_id, {"transfer_id": transfer_id})
        return upload

    def _trim_open_uploads(self, keep: _Upload) -> None:
        """Close the least recently used part files beyond MAX_OPEN_UPLOADS (not ``keep``).

        A closed one reopens on its next chunk; one being committed is left alone (its
        commit reads the descriptor without the upload's lock). Call without any lock held.
        """
        with self._lock:
            open_ones = [u for u in self._uploads.values() if u.fd is not None and u is not keep]
            excess = len(open_ones) + (keep.fd is not None) - MAX_OPEN_UPLOADS
            candidates = open_ones[:max(0, excess)]
        for upload in candidates:
            with upload.lock:
                if not upload.committing:
                    upload.close()

    def _forget(self, upload: _Upload) -> None:
        upload.done = True
        with self._lock:
            if self._uploads.get(upload.transfer_id) is upload:
                del self._uploads[upload.transfer_id]

    def upload_begin(self, req: Request) -> Dict[str, Any]:
        args = req.args
        target = self.resolve(arg(args, "path", str))
        size = arg(args, "size", int)
        sha256 = arg(args, "sha256", str).lower()
        chunk_size = arg(args, "chunk_size", int, wire.DEFAULT_CHUNK_BYTES)
        wanted_id = arg(args, "transfer_id", str, None, allow_none=True)
        mode = _optional_mode(args)
        mtime_ns = _optional_mtime_ns(args)
        make_dirs = arg(args, "make_dirs", bool, True)
        if size < 0:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "size must be >= 0")
        if not _SHA256.match(sha256):
            raise OpError(ErrorCode.INVALID_ARGUMENT, "sha256 must be 64 hex digits")
        if not 0 < chunk_size <= wire.MAX_CHUNK_BYTES:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "chunk_size must be 1..%d"
                          % wire.MAX_CHUNK_BYTES)
        if wanted_id is not None and not _TRANSFER_ID.match(wanted_id):
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "transfer_id must be 1-64 characters of [A-Za-z0-9_.-]")
        _refuse_directory(target)
        _ensure_parent(target, make_dirs)

        with self._lock:
            current = next((u for u in self._uploads.values() if u.target == target), None)
            if wanted_id is not None:
                other = self._uploads.get(wanted_id)
                if other is not None and other.target != target:
                    raise OpError(ErrorCode.CONFLICT, "transfer_id %r is in use for %s"
                                  % (wanted_id, other.target), {"transfer_id": wanted_id})
            if current is not None and current.committing:
                raise OpError(ErrorCode.BUSY, "%s: an upload to this path is being committed"
                              % target, {"path": target})
            if current is not None and (current.size, current.sha256) == (size, sha256):
                upload = current  # a retried or resumed begin: keep what arrived
            else:
                if current is not None:
                    self._uploads.pop(current.transfer_id, None)
                    current.done = True
                upload = None
        if current is not None and upload is None:
            with current.lock:
                current.remove_debris()  # a different file now goes to this path: restart
        if upload is None:
            upload = self._resume_or_create(target, size, sha256, chunk_size, wanted_id)
            with self._lock:
                self._uploads[upload.transfer_id] = upload
        else:
            with self._lock:
                if self._uploads.get(upload.transfer_id) is upload:
                    self._uploads.move_to_end(upload.transfer_id)
        upload.mode = mode
        upload.mtime_ns = mtime_ns
        self._trim_open_uploads(upload)
        return upload.describe()

    def _resume_or_create(self, target: str, size: int, sha256: str, chunk_size: int,
                          wanted_id: Optional[str]) -> _Upload:
        sidecar = _load_sidecar(target)
        if sidecar is not None and (sidecar.get("size"), sidecar.get("sha256")) == (size, sha256):
            upload = _Upload(wanted_id or str(sidecar.get("transfer_id") or uuid.uuid4().hex),
                             target, size, sha256, chunk_size)
            received: Ranges = []
            for row in sidecar["received"]:
                if (isinstance(row, list) and len(row) == 2
                        and all(isinstance(v, int) for v in row) and 0 <= row[0] < row[1] <= size):
                    received = _merge_range(received, row[0], row[1])
            upload.received = received
            upload.hasher = None  # bytes from an earlier life: hash the file at commit
            return upload
        upload = _Upload(wanted_id or uuid.uuid4().hex, target, size, sha256, chunk_size)
        upload.remove_debris()  # another file's partial, or a damaged one
        try:
            free = shutil.disk_usage(os.path.dirname(target)).free
        except OSError:
            free = None
        if free is not None and free < size:
            raise OpError(ErrorCode.TOO_LARGE, "%s: %d bytes do not fit in %d free bytes"
                          % (target, size, free), {"path": target, "free": free})
        try:
            fd = os.open(upload.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _O_BINARY, 0o666)
            upload.fd = fd
            os.ftruncate(fd, size)  # sparse: out-of-order chunks land where they belong
            upload.save_sidecar()
        except OSError as exc:
            upload.remove_debris()
            raise paths.os_error(exc, upload.part) from None
        return upload

    def upload_chunk(self, req: Request) -> Dict[str, Any]:
        offset = arg(req.args, "offset", int)
        if not req.buffers:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "upload_chunk needs the bytes in buffers[1]")
        data = req.buffers[0]
        _check_chunk_length(len(data), "chunk")
        upload = self._upload(req.args.get("transfer_id"))
        end = offset + len(data)
        if offset < 0 or end > upload.size:
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "chunk [%d, %d) lies outside the file's %d bytes"
                          % (offset, end, upload.size), {"size": upload.size})
        with upload.lock:
            if upload.committing or upload.done:
                raise OpError(ErrorCode.CONFLICT, "upload %s is being committed or is over"
                              % upload.transfer_id, {"transfer_id": upload.transfer_id})
            try:
                write_at(upload.open(), offset, data)
                upload.received = _merge_range(upload.received, offset, end)
                if upload.hasher is not None:
                    if offset == upload.hashed_upto:
                        upload.hasher.update(data)
                        upload.hashed_upto = end
                    elif offset < upload.hashed_upto:
                        upload.hasher = None  # hashed bytes were rewritten: re-read them
                upload.save_sidecar()
            except OSError as exc:
                raise paths.os_error(exc, upload.part) from None
            result = {"received_bytes": upload.received_bytes,
                      "complete": not _missing_ranges(upload.received, upload.size)}
        self._trim_open_uploads(upload)
        return result

    def upload_commit(self, req: Request) -> Dict[str, Any]:
        upload = self._upload(req.args.get("transfer_id"))
        with upload.lock:
            if upload.committing:
                raise OpError(ErrorCode.BUSY, "upload %s is already being committed"
                              % upload.transfer_id)
            missing = _missing_ranges(upload.received, upload.size)
            if missing:
                raise OpError(ErrorCode.CONFLICT,
                              "%s: upload incomplete: %d of %d bytes received"
                              % (upload.target, upload.received_bytes, upload.size),
                              {"reason": "incomplete", "missing": missing[:1000],
                               "received_bytes": upload.received_bytes, "size": upload.size})
            upload.committing = True
        try:
            return self._commit(upload)
        finally:
            upload.committing = False

    def _commit(self, upload: _Upload) -> Dict[str, Any]:
        try:
            fd = upload.open()
            st = os.fstat(fd)
            hasher = upload.hasher
            start = upload.hashed_upto if hasher is not None else 0
            hasher, end = _hash_fd(fd, start, hasher)
            actual = hasher.hexdigest()
            upload.close()
        except OSError as exc:
            raise paths.os_error(exc, upload.part) from None
        if st.st_size != upload.size or end != upload.size or actual != upload.sha256:
            upload.remove_debris()
            self._forget(upload)
            raise OpError(ErrorCode.CONFLICT,
                          "%s: upload does not match: expected %d bytes with sha256 %s, got "
                          "%d bytes with sha256 %s; the partial file was removed, upload again"
                          % (upload.target, upload.size, upload.sha256, st.st_size, actual),
                          {"reason": "hash_mismatch", "path": upload.target,
                           "expected_sha256": upload.sha256, "actual_sha256": actual,
                           "expected_size": upload.size, "actual_size": st.st_size})
        mode = upload.mode
        if mode is None:
            try:
                existing = os.stat(upload.target)
                if stat.S_ISREG(existing.st_mode):
                    mode = stat.S_IMODE(existing.st_mode)
            except OSError:
                pass
        try:
            if mode is not None:
                os.chmod(upload.part, mode & 0o7777)
            if upload.mtime_ns is not None:
                os.utime(upload.part, ns=(upload.mtime_ns, upload.mtime_ns))
            _refuse_directory(upload.target)
            os.replace(upload.part, upload.target)
        except OSError as exc:
            raise paths.os_error(exc, upload.target) from None
        try:
            os.unlink(upload.sidecar)
        except OSError:
            pass
        self._forget(upload)
        try:
            self.hashes.put(upload.target, os.stat(upload.target), actual)
        except OSError:
            pass
        return {"path": upload.target, "size": upload.size, "sha256": actual}

    def upload_abort(self, req: Request) -> Dict[str, Any]:
        transfer_id = arg(req.args, "transfer_id", str, None, allow_none=True)
        path = arg(req.args, "path", str, None, allow_none=True)
        if transfer_id is None and path is None:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "upload_abort needs transfer_id or path")
        with self._lock:
            upload = self._uploads.get(transfer_id) if transfer_id is not None else None
            target = upload.target if upload is not None else (
                self.resolve(path) if path is not None else None)
            if upload is None and target is not None:
                upload = next((u for u in self._uploads.values() if u.target == target), None)
            if upload is not None:
                self._uploads.pop(upload.transfer_id, None)
                upload.done = True
        removed: List[str] = []
        if upload is not None:
            with upload.lock:
                removed = upload.remove_debris()
        elif target is not None:  # a partial left by an earlier supervisor
            for debris in (side_path(target, PART_SUFFIX), side_path(target, SIDECAR_SUFFIX)):
                try:
                    os.unlink(debris)
                    removed.append(debris)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise paths.os_error(exc, debris) from None
        return {"aborted": upload is not None or bool(removed), "removed": removed}

    def upload_status(self, req: Request) -> Dict[str, Any]:
        upload = self._upload(req.args.get("transfer_id"))
        with upload.lock:
            return upload.describe()

    # --- download --------------------------------------------------------------------------

    def download_begin(self, req: Request) -> Dict[str, Any]:
        path = self.resolve(arg(req.args, "path", str))
        want_hash = arg(req.args, "hash", bool, True)
        _refuse_directory(path)
        fd, st = _open_regular(path)
        try:
            digest = None
            if want_hash:
                digest = self.hashes.get(path, st)
                if digest is None:
                    digest = _hash_fd(fd)[0].hexdigest()
                    self.hashes.put(path, st, digest)
        except OSError as exc:
            os.close(fd)
            raise paths.os_error(exc, path) from None
        download = _Download(uuid.uuid4().hex, path, st, fd)
        evicted: List[_Download] = []
        with self._lock:
            self._downloads[download.transfer_id] = download
            open_ones = [d for d in self._downloads.values() if d.fd is not None]
            evicted.extend(open_ones[:max(0, len(open_ones) - MAX_OPEN_DOWNLOADS)])
            while len(self._downloads) > MAX_KNOWN_DOWNLOADS:
                evicted.append(self._downloads.popitem(last=False)[1])
        for old in evicted:
            old.close()  # an evicted one still in the table is reopened by its next chunk
        return {"transfer_id": download.transfer_id, "path": path, "size": st.st_size,
                "sha256": digest, "mtime": st.st_mtime, "mtime_ns": st.st_mtime_ns,
                "mode": stat.S_IMODE(st.st_mode)}

    def download_chunk(self, req: Request) -> Result:
        transfer_id = arg(req.args, "transfer_id", str, None, allow_none=True)
        offset = arg(req.args, "offset", int)
        length = arg(req.args, "length", int, wire.DEFAULT_CHUNK_BYTES)
        if offset < 0:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "offset must be >= 0")
        if length <= 0:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "length must be > 0")
        _check_chunk_length(length)
        if transfer_id is not None:
            with self._lock:
                download = self._downloads.get(transfer_id)
                if download is not None:
                    self._downloads.move_to_end(transfer_id)
            if download is None:
                raise OpError(ErrorCode.NOT_FOUND, "unknown download %r: call download_begin"
                              % transfer_id, {"transfer_id": transfer_id})
            if offset > download.size:
                raise OpError(ErrorCode.INVALID_ARGUMENT, "offset %d is past the end (%d bytes)"
                              % (offset, download.size), {"size": download.size})
            # The lock keeps a concurrent eviction from closing (and the OS from reusing) the
            # descriptor mid-read.
            with download.lock:
                try:
                    data = read_at(download.ensure_open(), offset,
                                    min(length, download.size - offset))
                except OSError as exc:
                    raise paths.os_error(exc, download.path) from None
            size = download.size
        else:
            path = self.resolve(arg(req.args, "path", str))
            _refuse_directory(path)
            fd, st = _open_regular(path)
            try:
                size = st.st_size
                if offset > size:
                    raise OpError(ErrorCode.INVALID_ARGUMENT,
                                  "offset %d is past the end of %s (%d bytes)"
                                  % (offset, path, size), {"size": size})
                data = read_at(fd, offset, length)
            except OSError as exc:
                raise paths.os_error(exc, path) from None
            finally:
                os.close(fd)
        return Result({"offset": offset, "length": len(data),
                       "eof": offset + len(data) >= size, "size": size}, [data])

    def download_end(self, req: Request) -> Dict[str, Any]:
        transfer_id = arg(req.args, "transfer_id", str)
        with self._lock:
            download = self._downloads.pop(transfer_id, None)
        if download is not None:
            download.close()
        return {"closed": download is not None}

    # --- directory sync --------------------------------------------------------------------

    def manifest(self, req: Request) -> Any:
        root = self.resolve(arg(req.args, "path", str, ""))
        excludes = _string_list(req.args, "excludes")
        want_hash = arg(req.args, "hash", bool, True)
        as_blob = arg(req.args, "as_blob", bool, False)
        result = build_manifest(root, excludes, hash_files=want_hash, cache=self.hashes,
                                skip_dirs=[self.supervisor.state_dir])
        # The controller refuses a deleting sync here up front; sync_delete enforces it too.
        result["delete_protected"] = self.delete_protection(root)
        if as_blob:
            blob = wire.encode(result, req.codec)
            summary = {k: v for k, v in result.items()
                       if k not in ("files", "dirs", "symlinks", "others")}
            summary.update(file_count=len(result["files"]), codec=req.codec, blob_bytes=len(blob))
            return Result(summary, [blob])
        encoded = len(wire.encode(result, req.codec))
        if encoded > MANIFEST_INLINE_MAX_BYTES:
            raise OpError(ErrorCode.TOO_LARGE,
                          "%s: manifest of %d files is %d bytes, too big for an envelope; "
                          "ask with as_blob=true" % (root, len(result["files"]), encoded),
                          {"path": root, "bytes": encoded})
        return result

    def delete_protection(self, root: str) -> Optional[str]:
        """Why a sync must not delete inside ``root`` unless told so explicitly, or None.

        Protected (by real path, so links and ``..`` do not get around it): the file system
        root, the Jupyter server's root, the home directory, the supervisor's state folder,
        and every directory above one of these.
        """
        real = os.path.realpath(root)
        if os.path.dirname(real) == real:
            return "it is the root of the file system"
        named = (("the Jupyter server's root directory", self.supervisor.root_dir),
                 ("the home directory", os.path.expanduser("~")),
                 ("the supervisor's state folder", self.supervisor.state_dir))
        for what, path in named:
            protected = os.path.realpath(path)
            if real == protected:
                return "it is %s" % what
            if _is_inside(protected, real):
                return "it holds %s (%s)" % (what, protected)
        return None

    def _sync_root(self, req: Request, create: bool) -> Tuple[str, str]:
        root = self.resolve(arg(req.args, "root", str))
        if create and not os.path.lexists(root):
            try:
                os.makedirs(root, exist_ok=True)
            except OSError as exc:
                raise paths.os_error(exc, root) from None
        if not os.path.isdir(root):
            if os.path.lexists(root):
                raise OpError(ErrorCode.NOT_A_DIRECTORY, "%s: not a directory" % root,
                              {"path": root})
            raise OpError(ErrorCode.NOT_FOUND, "%s: no such directory" % root, {"path": root})
        return root, os.path.realpath(root)

    def batch_write(self, req: Request) -> Dict[str, Any]:
        specs = arg(req.args, "files", list)
        if len(specs) != len(req.buffers):
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "batch_write got %d file entries but %d buffers"
                          % (len(specs), len(req.buffers)))
        plan: List[Tuple[str, bytes, Optional[int], Optional[int]]] = []
        for index, spec in enumerate(specs):
            if not isinstance(spec, dict):
                raise OpError(ErrorCode.INVALID_ARGUMENT, "files[%d] must be a map" % index)
            rel = check_relpath(spec.get("path"))
            size = arg(spec, "size", int)
            data = req.buffers[index]
            if size != len(data):
                raise OpError(ErrorCode.INVALID_ARGUMENT, "file %r: size says %d bytes but %d "
                              "were sent" % (rel, size, len(data)))
            plan.append((rel, data, _optional_mode(spec), _optional_mtime_ns(spec)))
        root, real_root = self._sync_root(req, create=arg(req.args, "make_dirs", bool, True))
        # Every path is checked before anything is written.
        targets = [join_inside(root, rel, real_root=real_root) for rel, _, _, _ in plan]
        written = 0
        total = 0
        for index, (_, data, mode, mtime_ns) in enumerate(plan):
            target = targets[index]
            try:
                _refuse_directory(target)
                _ensure_parent(target, True)
                st = _atomic_write(target, data, mode, mtime_ns)
            except OpError as exc:
                exc.details.setdefault("written", written)
                raise
            except OSError as exc:
                error = paths.os_error(exc, target)
                error.details["written"] = written
                raise error from None
            self.hashes.put(target, st, hashlib.sha256(data).hexdigest())
            written += 1
            total += len(data)
        return {"root": root, "written": written, "bytes": total}

    def sync_delete(self, req: Request) -> Dict[str, Any]:
        rels = [check_relpath(p) for p in _string_list(req.args, "paths")]
        prune = arg(req.args, "prune_empty_dirs", bool, True)
        allow_root_delete = arg(req.args, "allow_root_delete", bool, False)
        root, real_root = self._sync_root(req, create=False)
        protected = self.delete_protection(root)
        if protected is not None and not allow_root_delete:
            raise protected_root_error(root, protected)
        targets = [join_inside(root, rel, real_root=real_root) for rel in rels]
        # A listed directory goes only once it is empty: its listed contents go first
        # (deepest first), and anything under it that is not listed (entries the sync
        # excludes, so never saw) keeps it, and the whole call, from deleting anything.
        listed = set(rels)
        for index, rel in enumerate(rels):
            if os.path.isdir(targets[index]) and not os.path.islink(targets[index]):
                kept = _unlisted_entries(targets[index], rel, listed)
                if kept:
                    raise OpError(ErrorCode.CONFLICT,
                                  "%s: not deleted (nor anything else): it holds %s, which the "
                                  "sync does not send (excluded?) and so never deletes. Move or "
                                  "remove them yourself, or stop excluding them"
                                  % (targets[index], ", ".join(map(repr, kept))),
                                  {"path": targets[index], "reason": "directory_not_empty",
                                   "kept": kept})
        deleted: List[str] = []
        missing: List[str] = []
        pruned = 0
        for index in sorted(range(len(rels)), key=lambda i: -rels[i].count("/")):
            rel, target = rels[index], targets[index]
            try:
                st = os.lstat(target)
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(target)  # emptied above; never a recursive delete
                else:
                    os.unlink(target)
                deleted.append(rel)
            except (FileNotFoundError, NotADirectoryError):
                missing.append(rel)
                continue
            except OSError as exc:
                raise paths.os_error(exc, target) from None
            if prune:
                parent = os.path.dirname(target)
                while len(parent) > len(root) and _is_inside(parent, root):
                    try:
                        os.rmdir(parent)  # fails, as wanted, on a non-empty directory
                    except OSError:
                        break
                    pruned += 1
                    parent = os.path.dirname(parent)
        return {"root": root, "deleted": deleted, "missing": missing, "pruned_dirs": pruned}

    def batch_read(self, req: Request) -> Result:
        rels = [check_relpath(p) for p in _string_list(req.args, "paths")]
        budget = arg(req.args, "max_bytes", int, BATCH_READ_DEFAULT_BYTES)
        if not 0 < budget <= BATCH_READ_MAX_BYTES:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "max_bytes must be 1..%d"
                          % BATCH_READ_MAX_BYTES)
        root, real_root = self._sync_root(req, create=False)
        entries: List[Dict[str, Any]] = []
        blobs: List[bytes] = []
        remaining: List[str] = []
        used = 0
        for index, rel in enumerate(rels):
            target = os.path.join(root, *rel.split("/"))
            try:
                join_inside(root, rel, follow_final=True, real_root=real_root)
                _refuse_directory(target)
                fd, st = _open_regular(target)  # a FIFO would block open() forever
                with os.fdopen(fd, "rb") as handle:
                    left = budget - used
                    if st.st_size > left and blobs:
                        remaining = rels[index:]  # the client asks again for these
                        break
                    data = handle.read(left + 1)
                    if len(data) > left:
                        raise OpError(ErrorCode.TOO_LARGE,
                                      "%s: larger than max_bytes=%d: download it in chunks"
                                      % (target, budget), {"path": target})
            except OpError as exc:
                entries.append({"path": rel, "error": {"code": exc.code, "message": exc.message}})
                blobs.append(b"")
                continue
            except OSError as exc:
                error = paths.os_error(exc, target)
                entries.append({"path": rel, "error": {"code": error.code,
                                                       "message": error.message}})
                blobs.append(b"")
                continue
            used += len(data)
            # The sha256 lets the client check each blob as it checks big downloads.
            entries.append({"path": rel, "size": len(data), "mode": stat.S_IMODE(st.st_mode),
                            "mtime": st.st_mtime, "mtime_ns": st.st_mtime_ns,
                            "sha256": hashlib.sha256(data).hexdigest()})
            blobs.append(data)
        return Result({"root": root, "files": entries, "remaining": remaining}, blobs)


def register(supervisor: Supervisor) -> None:
    """Register the file ops on ``supervisor``."""
    service = FilesService(supervisor)
    quick = {
        "fs_list": service.fs_list,
        "fs_stat": service.fs_stat,
        "fs_mkdir": service.fs_mkdir,
        "upload_begin": service.upload_begin,
        # Inline on purpose: chunks are written in arrival order, so they hash as they come.
        "upload_chunk": service.upload_chunk,
        "upload_abort": service.upload_abort,
        "upload_status": service.upload_status,
        "download_end": service.download_end,
    }
    slow = {
        "fs_read": service.fs_read,
        "fs_write": service.fs_write,
        "fs_remove": service.fs_remove,
        "upload_commit": service.upload_commit,
        "download_begin": service.download_begin,
        "download_chunk": service.download_chunk,
        "manifest": service.manifest,
        "batch_write": service.batch_write,
        "sync_delete": service.sync_delete,
        "batch_read": service.batch_read,
    }
    handlers: Dict[str, Callable[[Request], Any]] = {}
    handlers.update(quick)
    handlers.update(slow)
    for op, handler in handlers.items():
        supervisor.register(op, handler, blocking=op in slow)
    supervisor.add_closer(service.close)
