"""Files on the remote: chunked resumable transfers, small-file ops, delta sync, tree download.

Everything travels over the supervisor's comm (``agent_payload/files.py`` holds the remote
half and documents each op), never through the contents API:

- ``upload``: the local file is hashed (streaming) first, ``upload_begin`` says which ranges
  the remote already holds (a resumed upload skips them), chunks go out with ``window``
  requests in flight, and ``upload_commit`` verifies the sha256 and renames into place.
- ``download``: ``download_begin`` gives the size and sha256, chunks are requested with a
  credit window of ``window`` requests in flight and written with seek+write into
  ``<target>.tether-part`` beside the target, whose sidecar ``<target>.tether-part.json``
  names the remote sha256 and the ranges on disk; the sha256 is verified before
  ``os.replace``. A download that fails for a resumable reason (the link dropped, it
  timed out or was cancelled) leaves that partial behind on purpose: the next download of
  the same remote content fetches only what is missing. Any other failure leaves nothing.
- ``sync``: local and remote manifests are compared by size and mtime (sha256 where they
  disagree); small files travel in ``batch_write`` messages, big ones through ``upload``.
- ``download_dir``: the remote manifest, then ``batch_read`` for small files and
  ``download`` for big ones; every local path is checked to stay inside the destination.

Memory on each side stays bounded by ``window * chunk_size`` whatever the file size.
"""

from __future__ import annotations

import builtins
import codecs
import contextlib
import dataclasses
import functools
import hashlib
import html
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx2

from ..agent_payload import files as payload_files
from ..agent_payload import wire
from ..agent_payload.files import (
    FS_READ_MAX_BYTES,
    PART_SUFFIX,
    SIDECAR_SUFFIX,
    TEMP_MARK,
    ExcludeMatcher,
    HashCache,
    check_relpath,
    side_name,
)
from ..errors import ConnectionLost, NotFound, RemoteError, TetherTimeout, TransferError
from .rpc import Reply, check_listing, check_manifest, decode_manifest
from .state import state_dir

if TYPE_CHECKING:
    from .tether import AsyncTether

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_CHUNK_BYTES = wire.DEFAULT_CHUNK_BYTES
DEFAULT_WINDOW = 8
# The default sync excludes, defined once. Each row: our gitignore-style pattern (a name
# without "/" matches at any depth), then how the reference tool's ``exclude_globs_csv``
# default spelled it, or None where the reference default lacked it. Everything derives from
# this table: ``DEFAULT_SYNC_EXCLUDES`` (``sync(exclude=None)``, the CLI), the reference CSV
# (the MCP/job-spec default, kept verbatim for the tool contract; ``submit.split_globs``
# maps that exact string back to ``DEFAULT_SYNC_EXCLUDES``, so every default sync leaves
# out the same things) and the submit fingerprint (which skips what sync would skip).
_DEFAULT_EXCLUDE_TABLE: tuple[tuple[str, str | None], ...] = (
    (".git", ".git/**"), (".hg", ".hg/**"), (".svn", ".svn/**"),
    ("__pycache__", "**/__pycache__/**"), ("*.pyc", "**/*.pyc"),
    (".ipynb_checkpoints", None), (".venv", ".venv/**"), ("venv", "venv/**"), ("env", None),
    ("node_modules", None), ("build", "build/**"), ("dist", "dist/**"),
    ("*.egg-info", "*.egg-info/**"), (".mypy_cache", ".mypy_cache/**"),
    (".pytest_cache", ".pytest_cache/**"), (".ruff_cache", ".ruff_cache/**"),
    (".DS_Store", None),
)
#: what ``sync`` leaves out when ``exclude`` is None
DEFAULT_SYNC_EXCLUDES: tuple[str, ...] = tuple(ours for ours, _ in _DEFAULT_EXCLUDE_TABLE)
#: the reference tool's default ``exclude_globs_csv``, verbatim (see the table above)
REFERENCE_EXCLUDE_GLOBS_CSV: str = ",".join(ref for _, ref in _DEFAULT_EXCLUDE_TABLE if ref)
DEFAULT_SYNC_MAX_BYTES = 200 * MiB
# Files up to this size travel inside batch messages; bigger ones are uploaded in chunks.
SMALL_FILE_BYTES = 1 * MiB
# One batch message: a few MiB of data (client->kernel frames above 10 MiB close the
# socket) and a bounded envelope (the supervisor refuses envelopes above 1 MiB).
BATCH_BYTES = 4 * MiB
BATCH_FILES = 500
BATCH_ENVELOPE_BYTES = 512 * 1024
BATCH_WINDOW = 4
PARALLEL_UPLOADS = 3
PARALLEL_DOWNLOADS = 2
# Above this size a write goes through the chunked upload instead of one fs_write.
INLINE_WRITE_BYTES = 4 * MiB
CHUNK_TIMEOUT_S = 120.0
MANIFEST_TIMEOUT_S = 600.0
MAX_ATTEMPTS = 4
# A file modified within this window of being read may change again within the same mtime
# tick (coarse file systems: FAT has 2 s) without its mtime moving. Such "racy" files get no
# mtime copied to the remote, so the next sync compares them by content, not by mtime.
RACY_WINDOW_NS = 2_000_000_000
# Remote file systems may keep only microseconds: closer mtimes than this are equal.
MTIME_TOLERANCE_NS = 1_000
DOWNLOAD_SIDECAR_VERSION = 1
_SIDECAR_SAVE_INTERVAL_S = 0.5

ProgressCallback = Callable[[int, int], None]
_List = builtins.list  # ``list`` is a method name below


# --- results ------------------------------------------------------------------------------


@dataclass
class TransferResult:
    """What one upload or download did. ``path`` is the resolved remote path."""

    path: str
    local_path: str
    bytes: int
    seconds: float
    sha256: str
    #: bytes already at the destination from an earlier, interrupted attempt
    resumed_bytes: int = 0
    #: bytes that travelled this time (``bytes - resumed_bytes`` unless chunks were re-sent)
    sent_bytes: int = 0
    direction: str = "upload"
    #: how the bytes travelled: "comm" chunks, or "http" (ranged GET /files) for downloads
    via: str = "comm"

    @property
    def mb_per_s(self) -> float:
        return self.sent_bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __repr__(self) -> str:
        arrow = "->" if self.direction == "upload" else "<-"
        resumed = f", resumed {self.resumed_bytes} B" if self.resumed_bytes else ""
        return (f"<TransferResult {self.local_path} {arrow} {self.path}: {self.bytes} B in "
                f"{self.seconds:.2f}s ({self.mb_per_s:.0f} MB/s){resumed} "
                f"sha256={self.sha256[:12]}>")

    def _repr_html_(self) -> str:
        arrow = "&rarr;" if self.direction == "upload" else "&larr;"
        resumed = f" &middot; resumed {self.resumed_bytes} B" if self.resumed_bytes else ""
        return (f"<div><b>{html.escape(self.direction)}</b> <code>{html.escape(self.local_path)}"
                f"</code> {arrow} <code>{html.escape(self.path)}</code><br>{self.bytes} B in "
                f"{self.seconds:.2f} s &middot; {self.mb_per_s:.0f} MB/s{resumed} &middot; "
                f"sha256 <code>{html.escape(self.sha256)}</code></div>")


class _Progress:
    """Running byte count handed to a ``progress(done, total)`` callback."""

    def __init__(self, callback: ProgressCallback | None, total: int, done: int = 0) -> None:
        self.callback = callback
        self.total = total
        self.done = done

    def set(self, done: int) -> None:
        self.done = done
        self._emit()

    def per_file(self) -> ProgressCallback:
        """A callback for one file's own progress that adds its increments to this total."""
        seen = 0

        def on_file(done: int, total: int) -> None:
            nonlocal seen
            self.add(done - seen)
            seen = done

        return on_file

    def add(self, count: int) -> None:
        self.done += count
        self._emit()

    def _emit(self) -> None:
        if self.callback is not None:
            self.callback(self.done, self.total)


# --- local I/O helpers (run in worker threads) ---------------------------------------------

_O_BINARY = getattr(os, "O_BINARY", 0)
_HAS_PREAD = hasattr(os, "pread")


class _LocalFile:
    """A file descriptor with positional reads and writes (a lock stands in for pread on Windows)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def read_at(self, offset: int, length: int) -> bytes:
        with self._lock if not _HAS_PREAD else contextlib.nullcontext():
            return payload_files.read_at(self.fd, offset, length)

    def write_at(self, offset: int, data: bytes) -> None:
        with self._lock if not _HAS_PREAD else contextlib.nullcontext():
            payload_files.write_at(self.fd, offset, data)

    def hash_from(self, start: int, hasher: Any) -> Any:
        offset = start
        while True:
            block = self.read_at(offset, 4 * MiB)
            if not block:
                return hasher
            hasher.update(block)
            offset += len(block)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def sha256_path(path: str) -> str:
    """Streaming sha256 of a local file (memory: one block)."""
    handle = _LocalFile(os.open(path, os.O_RDONLY | _O_BINARY))
    try:
        digest: str = handle.hash_from(0, hashlib.sha256()).hexdigest()
        return digest
    finally:
        handle.close()


def _racy(st: os.stat_result, now_ns: int) -> bool:
    return st.st_mtime_ns >= now_ns - RACY_WINDOW_NS


def _cacheable(st: os.stat_result, now_ns: int) -> bool:
    # A hash of a file modified moments ago may be stale by the time it is looked up again
    # with an unchanged stat (same coarse tick): only cache settled files.
    return max(st.st_mtime_ns, st.st_ctime_ns) < now_ns - RACY_WINDOW_NS


def _atomic_local_write(target: Path, data: bytes, mtime_ns: int | None = None) -> None:
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


def _ranges_missing(received: Sequence[Sequence[int]], size: int) -> list[tuple[int, int]]:
    missing: list[tuple[int, int]] = []
    cursor = 0
    for start, end in sorted((int(s), int(e)) for s, e in received):
        if start > cursor:
            missing.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < size:
        missing.append((cursor, size))
    return missing


def _merge(ranges: list[list[int]], start: int, end: int) -> list[list[int]]:
    merged: list[list[int]] = []
    for s, e in sorted([*ranges, [start, end]]):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def _chunks(ranges: Iterable[tuple[int, int]], chunk_size: int) -> Iterator[tuple[int, int]]:
    for start, end in ranges:
        for offset in range(start, end, chunk_size):
            yield offset, min(chunk_size, end - offset)


def _check_tuning(chunk_size: int, window: int) -> None:
    if not 0 < chunk_size <= wire.MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be 1..{wire.MAX_CHUNK_BYTES} bytes (client->kernel "
                         f"frames above 10 MiB close the socket), got {chunk_size}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def _with_context(exc: RemoteError, context: str) -> RemoteError:
    """The same typed error (NotFound stays NotFound) with what we were doing in front."""
    return type(exc)(exc.code, f"{context}: {exc.message}", exc.details)


def _resumable(exc: BaseException) -> bool:
    """Errors after which the same transfer can go on (the remote kept what arrived)."""
    if isinstance(exc, (ConnectionLost, TetherTimeout)):
        return True
    # A new supervisor (kernel restart) forgot the transfer id; begin again resumes it.
    return isinstance(exc, NotFound) and "transfer_id" in exc.details


# --- local paths for extraction --------------------------------------------------------------


def _is_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


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
    if not _is_inside(os.path.realpath(target.parent), real_root):
        raise TransferError(f"refusing remote name {relpath!r}: {target} would land outside "
                            f"{base} (through a symlink)")
    return target


def _make_dirs_inside(root: Path, directory: Path) -> None:
    """Create ``directory`` under ``root`` one level at a time, never through an outside link."""
    real_root = os.path.realpath(root)
    current = root
    for part in directory.relative_to(root).parts:
        current = current / part
        if os.path.lexists(current):
            if not _is_inside(os.path.realpath(current), real_root):
                raise TransferError(f"refusing to write under {current}: it leads outside {root}")
            if not current.is_dir():
                raise TransferError(f"cannot create {directory}: {current} is not a directory")
            continue
        current.mkdir()


# --- the local tree for sync -----------------------------------------------------------------


@dataclass
class LocalEntry:
    rel: str
    path: str
    st: os.stat_result

    @property
    def size(self) -> int:
        return self.st.st_size


@dataclass
class LocalTree:
    root: str
    files: dict[str, LocalEntry]
    dirs: list[str]
    skipped: list[dict[str, str]]
    errors: list[dict[str, str]]
    #: root-relative exclude patterns (the given ones plus every .gitignore, scoped)
    patterns: list[str]


def _glob_escape(text: str) -> str:
    escaped = re.sub(r"([*?\[\\])", r"\\\1", text)
    return "\\" + escaped if escaped[:1] in ("!", "#") else escaped


def scoped_gitignore_pattern(line: str, rel_dir: str) -> str | None:
    """A ``.gitignore`` line of directory ``rel_dir`` rewritten relative to the tree's root.

    As in git, a pattern without a slash matches at any depth below its directory, one with
    a slash is anchored to it, and deeper files come later so they take precedence.
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if not rel_dir:
        return text
    negate = ""
    if text.startswith("!"):
        negate, text = "!", text[1:]
    dir_only = text.endswith("/")
    body = text.rstrip("/")
    anchored = "/" in body
    body = body.lstrip("/")
    if not body:
        return None
    prefix = _glob_escape(rel_dir)
    scoped = f"{prefix}/{body}" if anchored else f"{prefix}/**/{body}"
    return negate + scoped + ("/" if dir_only else "")


def _is_debris(name: str) -> bool:
    return name.endswith((PART_SUFFIX, SIDECAR_SUFFIX)) or TEMP_MARK in name


def scan_local(root: str | os.PathLike[str], patterns: Sequence[str], *,
               gitignore: bool = True) -> LocalTree:
    """Walk a local tree for ``sync``: regular files (and in-tree file links), dirs, skips.

    Symlinks are followed only to regular files inside the tree; links to directories (which
    could loop or duplicate content) and links leading outside are reported in ``skipped``,
    as are sockets, FIFOs and devices. ``.gitignore`` files apply to their own directory and
    below; the given ``patterns`` come last, so a ``.gitignore`` cannot re-include them.
    """
    root_str = os.fspath(root)
    real_root = os.path.realpath(root_str)
    base = [p for p in patterns if p and p.strip()]
    tree = LocalTree(root_str, {}, [], [], [], [])
    scoped_all: list[str] = []
    stack: list[tuple[str, str, list[str], ExcludeMatcher]] = [
        ("", root_str, [], ExcludeMatcher(base))]
    while stack:
        rel_dir, abs_dir, inherited, matcher = stack.pop()
        if gitignore:
            ignore_file = os.path.join(abs_dir, ".gitignore")
            try:
                if os.path.isfile(ignore_file):
                    with open(ignore_file, encoding="utf-8", errors="replace") as handle:
                        lines = handle.read().splitlines()
                    scoped = [s for s in (scoped_gitignore_pattern(x, rel_dir) for x in lines) if s]
                    if scoped:
                        inherited = inherited + scoped
                        scoped_all.extend(scoped)
                        matcher = ExcludeMatcher(inherited + base)
            except OSError as exc:
                tree.errors.append({"path": rel_dir + "/.gitignore" if rel_dir else ".gitignore",
                                    "error": f"{ignore_file}: {exc.strerror or exc}"})
        try:
            iterator = os.scandir(abs_dir)
        except OSError as exc:
            if not rel_dir:
                raise TransferError(f"cannot read local directory {abs_dir}: "
                                    f"{exc.strerror or exc}") from None
            tree.errors.append({"path": rel_dir, "error": f"{abs_dir}: {exc.strerror or exc}"})
            continue
        with iterator:
            for entry in iterator:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    _scan_entry(tree, entry, rel, real_root, matcher, stack, inherited)
                except OSError as exc:  # vanished or unreadable meanwhile: say so, go on
                    tree.errors.append({"path": rel, "error": f"{entry.path}: "
                                                              f"{exc.strerror or exc}"})
    tree.dirs.sort()
    tree.skipped.sort(key=lambda s: s["path"])
    tree.patterns = scoped_all + base
    return tree


def _scan_entry(tree: LocalTree, entry: os.DirEntry[str], rel: str, real_root: str,
                matcher: ExcludeMatcher, stack: list[tuple[str, str, list[str], ExcludeMatcher]],
                inherited: list[str]) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        tree.skipped.append({"path": os.fsencode(rel).decode("utf-8", "replace"),
                             "reason": "name is not valid UTF-8"})
        return
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        is_dir = os.path.isdir(target)
        if matcher and matcher.excludes_entry(rel, is_dir):
            return
        if not _is_inside(target, real_root):
            tree.skipped.append({"path": rel, "reason": f"symlink to {target}, outside the "
                                                        "local directory: not followed"})
        elif is_dir:
            tree.skipped.append({"path": rel, "reason": "symlink to a directory: not followed"})
        elif os.path.isfile(target):
            tree.files[rel] = LocalEntry(rel, entry.path, os.stat(entry.path))
        else:
            tree.skipped.append({"path": rel, "reason": "dangling symlink or not a regular file"})
        return
    if entry.is_dir(follow_symlinks=False):
        if matcher and matcher.excludes_entry(rel, True):
            return
        tree.dirs.append(rel)
        stack.append((rel, entry.path, inherited, matcher))
        return
    if matcher and matcher.excludes_entry(rel, False):
        return
    if entry.is_file(follow_symlinks=False):
        if _is_debris(entry.name):
            return
        tree.files[rel] = LocalEntry(rel, entry.path, entry.stat(follow_symlinks=False))
    else:
        tree.skipped.append({"path": rel, "reason": "not a regular file (socket, FIFO or "
                                                    "device)"})


def _parents(rel: str) -> Iterator[str]:
    parts = rel.split("/")
    for depth in range(1, len(parts)):
        yield "/".join(parts[:depth])


def _covered(rel: str, prefixes: set[str]) -> bool:
    """Whether ``rel`` is one of ``prefixes`` or lies under one of them."""
    return rel in prefixes or any(parent in prefixes for parent in _parents(rel))


def _normal_excludes(exclude: str | Sequence[str] | None) -> list[str]:
    if exclude is None:
        return list(DEFAULT_SYNC_EXCLUDES)
    if isinstance(exclude, str):
        return [p.strip() for p in re.split(r"[,\n]", exclude) if p.strip()]
    return [str(p) for p in exclude]


# --- a download's partial file ------------------------------------------------------------------


class _DownloadPart:
    """``<target>.tether-part`` and its sidecar: what of which remote content is on disk."""

    def __init__(self, target: Path, remote_path: str, size: int, sha256: str) -> None:
        self.target = target
        # Shortened by bytes where ``target`` has a long name (a 255-byte name is valid).
        self.part = target.with_name(side_name(target.name, PART_SUFFIX))
        self.sidecar = target.with_name(side_name(target.name, SIDECAR_SUFFIX))
        self.remote_path = remote_path
        self.size = size
        self.sha256 = sha256
        self.received: list[list[int]] = []
        self.file: _LocalFile | None = None
        # Chunks are written in order, so a fresh download hashes as it goes; resumed bytes
        # from an earlier attempt are hashed from disk at the end instead.
        self.hasher: Any = None
        self.hashed_upto = 0
        self._saved_at = 0.0

    @property
    def received_bytes(self) -> int:
        return sum(e - s for s, e in self.received)

    def open(self) -> int:
        """Open (resuming a matching partial) and return the bytes already on disk."""
        resumed = self._load()
        if resumed is None:
            for path in (self.part, self.sidecar):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            free = shutil.disk_usage(self.target.parent).free
            if free < self.size:
                raise TransferError(f"{self.target}: {self.size} bytes do not fit in the {free} "
                                    "bytes free locally")
            # O_EXCL|O_NOFOLLOW: never write through a link that appeared at the part's name.
            fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_BINARY
                         | getattr(os, "O_NOFOLLOW", 0), 0o666)
            self.file = _LocalFile(fd)
            os.ftruncate(fd, self.size)  # sparse until written
            self.received = []
            self.hasher = hashlib.sha256()
            return 0
        self.file = _LocalFile(os.open(self.part, os.O_RDWR | _O_BINARY))
        self.received = resumed
        self.hasher = None
        return self.received_bytes

    def _load(self) -> list[list[int]] | None:
        try:
            data = json.loads(self.sidecar.read_text(encoding="utf-8"))
            part_size = self.part.stat().st_size
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("version") != DOWNLOAD_SIDECAR_VERSION:
            return None
        if (data.get("sha256"), data.get("size")) != (self.sha256, self.size) \
                or part_size != self.size or not isinstance(data.get("received"), list):
            return None
        ranges: list[list[int]] = []
        for row in data["received"]:
            if isinstance(row, list) and len(row) == 2 and all(isinstance(v, int) for v in row) \
                    and 0 <= row[0] < row[1] <= self.size:
                ranges = _merge(ranges, row[0], row[1])
        return ranges

    def missing(self) -> list[tuple[int, int]]:
        return _ranges_missing(self.received, self.size)

    def write(self, offset: int, data: bytes) -> None:
        """Write a chunk (worker thread; chunks arrive here in offset order)."""
        assert self.file is not None
        self.file.write_at(offset, data)
        if self.hasher is not None:
            if offset == self.hashed_upto:
                self.hasher.update(data)
                self.hashed_upto += len(data)
            else:
                self.hasher = None
        self.received = _merge(self.received, offset, offset + len(data))
        now = time.monotonic()
        if now - self._saved_at >= _SIDECAR_SAVE_INTERVAL_S:
            self.save()

    def save(self) -> None:
        # Written after the data it describes: a sidecar never claims bytes not on disk.
        self._saved_at = time.monotonic()
        data = {"version": DOWNLOAD_SIDECAR_VERSION, "remote_path": self.remote_path,
                "size": self.size, "sha256": self.sha256, "received": self.received}
        with contextlib.suppress(OSError):
            self.sidecar.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")

    def digest(self) -> str:
        if self.hasher is not None and self.hashed_upto == self.size:
            return str(self.hasher.hexdigest())
        assert self.file is not None
        return str(self.file.hash_from(0, hashlib.sha256()).hexdigest())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def finish(self) -> None:
        self.close()
        os.replace(self.part, self.target)
        with contextlib.suppress(FileNotFoundError):
            self.sidecar.unlink()

    def discard(self) -> None:
        self.close()
        for path in (self.part, self.sidecar):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class _NoHttp(Exception):
    """The server will not serve this file over ``/files``: use the comm instead."""


class _GarbledReply(ConnectionLost):
    """A reply whose blob does not match its envelope: re-fetch, as after a drop."""


class _Slot:
    __slots__ = ("data", "declared", "error", "length", "offset", "ready")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.data: bytes | None = None
        self.declared = length  # the length the reply's envelope claims
        self.error: BaseException | None = None
        self.ready = anyio.Event()


# --- the service ---------------------------------------------------------------------------


class AsyncFiles:
    """``tether.files``: transfers, small-file ops and directory sync over the comm."""

    def __init__(self, tether: AsyncTether) -> None:
        self._tether = tether
        # sha256 of local files by (size, mtime, ctime, inode); persisted per synced tree.
        self._hashes = HashCache(str(state_dir() / "hash-cache"))

    async def _call(self, op: str, args: dict[str, Any], *, buffers: Sequence[bytes] = (),
                    timeout: float | None = 60.0, idempotent: bool = True) -> Reply:
        # Every file op is safe to repeat (chunks rewrite the same bytes, commits are checked),
        # so the link may re-send any of them after a reconnect.
        return await self._tether.link.call(op, args, buffers=list(buffers), timeout=timeout,
                                            idempotent=idempotent)

    # --- small files ----------------------------------------------------------------------

    async def list(self, path: str = "", *, max_entries: int = 10000) -> _List[dict[str, Any]]:
        """Entries of a remote directory: name, path, type, size, mtime (and link target)."""
        reply = await self._call("fs_list", {"path": path, "max_entries": max_entries})
        entries = check_listing(reply.result, max_entries)
        base = str(reply.result["path"])
        for entry in entries:
            entry["path"] = base.rstrip("/") + "/" + str(entry["name"])
        if reply.result.get("truncated"):
            log.warning("%s has %s entries; listed the first %d", base, reply.result.get("total"),
                        max_entries)
        return entries

    async def stat(self, path: str) -> dict[str, Any]:
        """Type, size, mtime, mode of a remote path; ``exists`` is False (no error) if missing."""
        reply = await self._call("fs_stat", {"path": path})
        result: dict[str, Any] = reply.result
        return result

    async def _read(self, path: str, offset: int, max_bytes: int) -> tuple[bytes, bool, str]:
        parts: _List[bytes] = []
        got = 0
        eof = False
        resolved = path
        while got < max_bytes:
            want = min(max_bytes - got, FS_READ_MAX_BYTES)
            reply = await self._call("fs_read", {"path": path, "offset": offset + got,
                                                 "max_bytes": want})
            data = reply.buffers[0] if reply.buffers else b""
            resolved = str(reply.result.get("path", path))
            parts.append(data)
            got += len(data)
            if reply.result.get("eof") or not data:
                eof = True
                break
        return b"".join(parts), eof, resolved

    async def read_bytes(self, path: str, *, max_bytes: int | None = None) -> bytes:
        """The whole remote file (or its first ``max_bytes``) in memory."""
        data, _, _ = await self._read(path, 0, max_bytes if max_bytes is not None else 2**62)
        return data

    async def read_text(self, path: str, *, max_bytes: int = FS_READ_MAX_BYTES, offset: int = 0,
                        encoding: str = "utf-8", errors: str = "replace") -> str:
        """Text from ``offset``, at most ``max_bytes`` bytes (a cut character is dropped)."""
        data, eof, _ = await self._read(path, offset, max_bytes)
        decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
        return str(decoder.decode(data, final=eof))

    async def write_bytes(self, path: str, data: bytes, *, mode: int | None = None) -> dict[str, Any]:
        """Create or replace a remote file atomically; returns path, size, sha256."""
        if len(data) <= INLINE_WRITE_BYTES:
            args: dict[str, Any] = {"path": path}
            if mode is not None:
                args["mode"] = mode
            reply = await self._call("fs_write", args, buffers=[bytes(data)])
            result: dict[str, Any] = reply.result
            return result
        # Too big for one message: the chunked upload, straight from memory.
        digest = await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
        view = memoryview(data)
        done = await self._upload(
            lambda offset, length: bytes(view[offset:offset + length]), len(data), digest,
            path, "<memory>", progress=None, chunk_size=DEFAULT_CHUNK_BYTES,
            window=DEFAULT_WINDOW, mode=mode, mtime_ns=None)
        return {"path": done.path, "size": done.bytes, "sha256": done.sha256}

    async def write_text(self, path: str, content: str, *, encoding: str = "utf-8") -> dict[str, Any]:
        """Create or replace a remote text file atomically; returns path, size, sha256."""
        return await self.write_bytes(path, content.encode(encoding))

    async def remove(self, path: str, recursive: bool = False, *,
                     missing_ok: bool = False) -> dict[str, Any]:
        """Remove a remote file, link or (empty, or with ``recursive``) directory."""
        reply = await self._call("fs_remove", {"path": path, "recursive": recursive,
                                               "missing_ok": missing_ok})
        result: dict[str, Any] = reply.result
        return result

    async def mkdir(self, path: str, *, parents: bool = True) -> dict[str, Any]:
        reply = await self._call("fs_mkdir", {"path": path, "parents": parents})
        result: dict[str, Any] = reply.result
        return result

    # --- upload ---------------------------------------------------------------------------

    async def upload(self, local_path: str | os.PathLike[str], remote_path: str, *,
                     progress: ProgressCallback | None = None,
                     chunk_size: int = DEFAULT_CHUNK_BYTES,
                     window: int = DEFAULT_WINDOW) -> TransferResult:
        """Upload one local file, resumably; the remote file appears whole or not at all.

        An interrupted upload (cancelled, or the link down for longer than its reconnect
        wait) leaves ``<remote>.tether-part`` and its sidecar on the remote; uploading the
        same content to the same path again sends only what had not arrived.
        """
        _check_tuning(chunk_size, window)
        local = os.path.abspath(os.path.expanduser(os.fspath(local_path)))
        return await self._upload_path(local, remote_path, progress=progress,
                                       chunk_size=chunk_size, window=window, mode=None,
                                       keep_mtime=False)

    async def _upload_path(self, local: str, remote_path: str, *,
                           progress: ProgressCallback | None, chunk_size: int, window: int,
                           mode: int | None, keep_mtime: bool) -> TransferResult:
        where = f"upload {local} -> {remote_path}"
        try:
            st = os.stat(local)
        except OSError as exc:
            raise TransferError(f"{where}: cannot read {local}: {exc.strerror or exc}") from None
        if stat.S_ISDIR(st.st_mode):
            raise TransferError(f"{where}: {local} is a directory (use sync for directories)")
        if not stat.S_ISREG(st.st_mode):
            raise TransferError(f"{where}: {local} is not a regular file")
        try:
            fd = os.open(local, os.O_RDONLY | _O_BINARY)
        except OSError as exc:
            raise TransferError(f"{where}: cannot read {local}: {exc.strerror or exc}") from None
        source = _LocalFile(fd)
        try:
            st = os.fstat(fd)
            cached = self._hashes.get(local, st)
            if cached is not None:
                digest = cached
            else:
                digest = str(await anyio.to_thread.run_sync(
                    lambda: source.hash_from(0, hashlib.sha256()).hexdigest()))
                if _cacheable(st, time.time_ns()):
                    self._hashes.put(local, st, digest)
            mtime_ns = st.st_mtime_ns if keep_mtime and not _racy(st, time.time_ns()) else None
            try:
                return await self._upload(source.read_at, st.st_size, digest, remote_path, local,
                                          progress=progress, chunk_size=chunk_size,
                                          window=window, mode=mode, mtime_ns=mtime_ns)
            except RemoteError as exc:
                if exc.details.get("reason") == "hash_mismatch":
                    now = os.stat(local)
                    if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                        raise TransferError(f"{where}: {local} changed while it was being "
                                            "uploaded; upload it again") from exc
                raise
        except OSError as exc:
            raise TransferError(f"{where}: reading {local} failed: {exc.strerror or exc}") from None
        finally:
            source.close()

    async def _upload(self, read_at: Callable[[int, int], bytes], size: int, digest: str,
                      remote_path: str, local_label: str, *, progress: ProgressCallback | None,
                      chunk_size: int, window: int, mode: int | None,
                      mtime_ns: int | None) -> TransferResult:
        where = f"upload {local_label} -> {remote_path}"
        started = time.perf_counter()
        args: dict[str, Any] = {"path": remote_path, "size": size, "sha256": digest,
                                "chunk_size": chunk_size, "make_dirs": True}
        if mode is not None:
            args["mode"] = mode
        if mtime_ns is not None:
            args["mtime_ns"] = mtime_ns
        tracker = _Progress(progress, size)
        resumed: int | None = None
        sent = 0
        attempt = 0
        target: str | None = None
        while True:
            attempt += 1
            try:
                begun = (await self._call("upload_begin", args)).result
                target = str(begun["path"])
                where = f"upload {local_label} -> {target}"
                missing = _ranges_missing(begun.get("received") or [], size)
                if resumed is None:
                    resumed = int(begun.get("received_bytes", 0))
                tracker.set(size - sum(e - s for s, e in missing))
                sent += await self._send_chunks(str(begun["transfer_id"]), read_at, missing,
                                                chunk_size, window, tracker)
                committed = await self._commit(str(begun["transfer_id"]), target, size, digest)
                break
            except RemoteError as exc:
                if exc.code == wire.ErrorCode.BUSY and attempt < MAX_ATTEMPTS * 20:
                    # A commit whose reply was lost is still running: wait for its outcome
                    # rather than begin (and send) the whole file again.
                    await anyio.sleep(0.5)
                    if target is not None and await self._remote_has(target, size, digest):
                        committed = {"path": target}
                        break
                    continue
                if (exc.details.get("reason") == "incomplete" or _resumable(exc)) \
                        and attempt < MAX_ATTEMPTS:
                    # Chunks lost, or a new supervisor (kernel restart) that knows the
                    # upload only from its sidecar: begin again and send what is missing.
                    log.info("%s: %s; resuming", where, exc)
                    continue
                raise _with_context(exc, where) from None
            except (ConnectionLost, TetherTimeout) as exc:
                # ConnectionLost means the link stayed down for its whole reconnect wait:
                # try again only if it is back by now.
                if attempt < MAX_ATTEMPTS and (isinstance(exc, TetherTimeout)
                                               or self._tether.link.connected):
                    log.info("%s: %s; resuming", where, exc)
                    continue
                raise TransferError(f"{where}: {exc} (the remote keeps what arrived: upload "
                                    "again to resume)") from exc
        return TransferResult(path=str(committed["path"]), local_path=local_label, bytes=size,
                              seconds=time.perf_counter() - started, sha256=digest,
                              resumed_bytes=resumed or 0, sent_bytes=sent, direction="upload")

    async def _send_chunks(self, transfer_id: str, read_at: Callable[[int, int], bytes],
                           ranges: Sequence[tuple[int, int]], chunk_size: int, window: int,
                           tracker: _Progress) -> int:
        """Send ``ranges`` with ``window`` chunks in flight; returns the bytes acknowledged."""
        link = self._tether.link
        credit = anyio.Semaphore(window)
        failures: _List[BaseException] = []
        acked = 0

        async def send(offset: int, data: bytes, scope: anyio.CancelScope) -> None:
            nonlocal acked
            try:
                await link.call("upload_chunk", {"transfer_id": transfer_id, "offset": offset},
                                buffers=[data], timeout=CHUNK_TIMEOUT_S)
                acked += len(data)
                tracker.add(len(data))
            except Exception as exc:
                failures.append(exc)
                scope.cancel()
            finally:
                credit.release()

        async with anyio.create_task_group() as group:
            for offset, length in _chunks(ranges, chunk_size):
                await credit.acquire()
                if failures:
                    break
                try:
                    data = await anyio.to_thread.run_sync(read_at, offset, length)
                    if len(data) != length:
                        raise TransferError(f"the local file shrank while uploading (short read "
                                            f"at offset {offset})")
                except Exception as exc:  # raised here it would come out as an ExceptionGroup
                    failures.append(exc)
                    group.cancel_scope.cancel()
                    break
                group.start_soon(send, offset, data, group.cancel_scope)
        if failures:
            raise failures[0]
        return acked

    async def _commit(self, transfer_id: str, target: str, size: int, digest: str) -> dict[str, Any]:
        # Generous: a resumed upload is re-hashed from disk on the remote before the rename.
        timeout = 120.0 + size / 20e6
        try:
            reply = await self._call("upload_commit", {"transfer_id": transfer_id},
                                     timeout=timeout)
            result: dict[str, Any] = reply.result
            return result
        except (ConnectionLost, TetherTimeout, NotFound) as exc:
            # The commit may have run and only its reply got lost (a re-sent commit then finds
            # the transfer gone): the remote file itself says whether it did.
            if isinstance(exc, NotFound) and "transfer_id" not in exc.details:
                raise
            if await self._remote_has(target, size, digest):
                return {"path": target, "size": size, "sha256": digest}
            raise

    async def _remote_has(self, path: str, size: int, digest: str) -> bool:
        try:
            begun = (await self._call("download_begin", {"path": path, "hash": True},
                                      timeout=120.0 + size / 50e6)).result
        except (RemoteError, ConnectionLost, TetherTimeout):
            return False
        with contextlib.suppress(RemoteError, ConnectionLost, TetherTimeout):
            await self._call("download_end", {"transfer_id": begun["transfer_id"]}, timeout=10)
        return bool(begun.get("size") == size and begun.get("sha256") == digest)

    # --- download -------------------------------------------------------------------------

    async def download(self, remote_path: str, local_path: str | os.PathLike[str], *,
                       progress: ProgressCallback | None = None,
                       chunk_size: int = DEFAULT_CHUNK_BYTES,
                       window: int = DEFAULT_WINDOW, via: str = "auto") -> TransferResult:
        """Download one remote file; the local file appears whole (sha256-verified) or not at all.

        A download interrupted by a dropped link, a timeout or cancellation keeps
        ``<local>.tether-part`` and ``<local>.tether-part.json``: downloading the same remote
        content to the same place again fetches only what is missing. Any other failure
        removes them.

        ``via="auto"`` streams the bytes with ranged ``GET /files/<path>`` when the file is
        under the server root and not hidden (the server relays that ~3x cheaper than kernel
        websocket traffic), and uses comm chunks otherwise (gateways have no ``/files``).
        Either way the supervisor's sha256 decides. ``via="comm"`` forces the comm path.
        """
        _check_tuning(chunk_size, window)
        if via not in ("auto", "comm"):
            raise ValueError("via must be 'auto' or 'comm'")
        local = Path(os.path.abspath(os.path.expanduser(os.fspath(local_path))))
        return await self._download(remote_path, local, progress=progress,
                                    chunk_size=chunk_size, window=window, via=via)

    def _files_url_path(self, resolved: str) -> str | None:
        """``files/<rel>`` for a path the server's /files handler will serve, else None."""
        root = self._tether.link.facts.get("root_dir")
        if not root or not _is_inside(resolved, root) or resolved == root:
            return None
        rel = os.path.relpath(resolved, root).replace(os.sep, "/")
        if any(part.startswith(".") for part in rel.split("/")):
            return None  # a stock server refuses hidden paths
        return "files/" + urllib.parse.quote(rel)

    async def _fetch_http(self, url_path: str, part: _DownloadPart, tracker: _Progress) -> int:
        """Fill what ``part`` misses with ranged GETs; raise _NoHttp if the server will not."""
        fetched = 0
        # Reading the socket and hashing+writing overlap: hashlib and file writes release the
        # GIL, so a writer thread fed through a short queue keeps both cores busy.
        send, receive = anyio.create_memory_object_stream[tuple[int, bytes]](8)

        async def writer() -> None:
            nonlocal fetched
            async with receive:
                async for offset, data in receive:
                    await anyio.to_thread.run_sync(part.write, offset, data)
                    fetched += len(data)
                    tracker.add(len(data))

        async def watch_link() -> None:
            # The comm link's keepalive notices a dead path within seconds; a streamed GET on
            # a blackholed connection would only notice at its read timeout.
            link = self._tether.link
            while link.connected:
                await anyio.sleep(0.2)
            raise _NoHttp("the connection dropped")

        async def reader() -> None:
            async with send:
                for start, end in part.missing():
                    headers = {"Range": f"bytes={start}-{end - 1}"}
                    try:
                        async with self._tether.rest.stream_get(url_path, headers) as response:
                            if response.status_code != 206 and not (
                                    response.status_code == 200 and start == 0
                                    and end == part.size):
                                raise _NoHttp(f"GET {url_path}: HTTP {response.status_code}")
                            offset = start
                            async for data in response.aiter_bytes(2 * 1024 * 1024):
                                if offset + len(data) > end:
                                    raise _NoHttp("the server sent more than the range asked for")
                                await send.send((offset, data))
                                offset += len(data)
                            if offset != end:
                                raise _NoHttp(f"GET {url_path} ended at {offset} of {end} bytes")
                    except httpx2.HTTPError as exc:
                        # What arrived is kept; the comm path (which waits for the link to
                        # come back) fetches the rest.
                        raise _NoHttp(f"GET {url_path} failed: {exc}") from None
            watcher.cancel()

        watcher = anyio.CancelScope()

        async def watch() -> None:
            with watcher:
                await watch_link()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch)
                group.start_soon(writer)
                group.start_soon(reader)
        except BaseExceptionGroup as group_error:
            # One task failed and the others were cancelled: surface the real failure.
            raise group_error.exceptions[0] from None
        return fetched

    async def _download(self, remote_path: str, local: Path, *,
                        progress: ProgressCallback | None, chunk_size: int, window: int,
                        keep_mtime: bool = False, via: str = "auto") -> TransferResult:
        where = f"download {remote_path} -> {local}"
        if local.is_dir():
            raise TransferError(f"{where}: {local} is a directory; give the file's local path")
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransferError(f"{where}: cannot create {local.parent}: "
                                f"{exc.strerror or exc}") from None
        started = time.perf_counter()
        resumed: int | None = None
        fetched = 0
        attempt = 0
        used = "comm"
        while True:
            attempt += 1
            part: _DownloadPart | None = None
            transfer_id: str | None = None
            keep_partial = False
            try:
                begun = (await self._call("download_begin", {"path": remote_path, "hash": True},
                                          timeout=MANIFEST_TIMEOUT_S)).result
                transfer_id = str(begun["transfer_id"])
                target = str(begun["path"])
                where = f"download {target} -> {local}"
                size, digest = int(begun["size"]), str(begun["sha256"])
                part = _DownloadPart(local, target, size, digest)
                try:
                    already = await anyio.to_thread.run_sync(part.open)
                except OSError as exc:
                    raise TransferError(f"{where}: cannot write {part.part}: "
                                        f"{exc.strerror or exc}") from None
                if resumed is None:
                    resumed = already
                tracker = _Progress(progress, size, part.received_bytes)
                tracker.set(part.received_bytes)
                keep_partial = True
                url_path = self._files_url_path(target) if via == "auto" else None
                if url_path is not None:
                    try:
                        fetched += await self._fetch_http(url_path, part, tracker)
                        used = "http"
                    except _NoHttp as exc:
                        log.info("%s: %s; fetching the rest over the comm", where, exc)
                        via = "comm"
                if part.missing():
                    used = "comm"
                    fetched += await self._fetch_chunks(transfer_id, part, chunk_size, window,
                                                        tracker)
                keep_partial = False
                actual = await anyio.to_thread.run_sync(part.digest)
                if actual != digest:
                    raise TransferError(
                        f"{where}: sha256 mismatch (expected {digest}, got {actual}): the remote "
                        "file changed while it was being downloaded; download it again")
                await anyio.to_thread.run_sync(part.finish)
                if keep_mtime and isinstance(begun.get("mtime_ns"), int):
                    with contextlib.suppress(OSError):
                        os.utime(local, ns=(begun["mtime_ns"], begun["mtime_ns"]))
                break
            except (ConnectionLost, TetherTimeout) as exc:
                if attempt < MAX_ATTEMPTS and (isinstance(exc, (TetherTimeout, _GarbledReply))
                                               or self._tether.link.connected):
                    log.info("%s: %s; resuming", where, exc)
                    continue
                partial = local.with_name(side_name(local.name, PART_SUFFIX))
                raise TransferError(f"{where}: {exc} (the partial {partial} is kept: "
                                    "download again to resume)") from exc
            except RemoteError as exc:
                if _resumable(exc) and attempt < MAX_ATTEMPTS:
                    log.info("%s: %s; resuming", where, exc)
                    continue
                if exc.code == wire.ErrorCode.CONFLICT and attempt < MAX_ATTEMPTS:
                    keep_partial = False  # the file changed since begin: start over
                    continue
                keep_partial = False
                raise _with_context(exc, where) from None
            except OSError as exc:
                keep_partial = False
                raise TransferError(f"{where}: writing {local} failed: "
                                    f"{exc.strerror or exc}") from None
            except Exception:
                keep_partial = False
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    if part is not None and part.file is not None:
                        if keep_partial:
                            part.save()
                            part.close()
                        else:
                            part.discard()
                    if transfer_id is not None:
                        with anyio.move_on_after(5), contextlib.suppress(
                                RemoteError, ConnectionLost, TetherTimeout):
                            await self._call("download_end", {"transfer_id": transfer_id},
                                             timeout=5)
        assert part is not None
        return TransferResult(path=part.remote_path, local_path=str(local), bytes=part.size,
                              seconds=time.perf_counter() - started, sha256=part.sha256,
                              resumed_bytes=resumed or 0, sent_bytes=fetched,
                              direction="download", via=used)

    async def _fetch_chunks(self, transfer_id: str, part: _DownloadPart, chunk_size: int,
                            window: int, tracker: _Progress) -> int:
        """Fetch what ``part`` misses with ``window`` requests in flight; written in order.

        One writer takes the chunks in offset order (so a fresh download hashes as it
        goes) and only then returns their credit: requests in flight plus chunks waiting to
        be written never exceed ``window``.
        """
        link = self._tether.link
        credit = anyio.Semaphore(window)
        failures: _List[BaseException] = []
        written = 0
        send_slot, receive_slot = anyio.create_memory_object_stream[_Slot](window)

        async def fetch(slot: _Slot) -> None:
            try:
                reply = await link.call("download_chunk", {"transfer_id": transfer_id,
                                                           "offset": slot.offset,
                                                           "length": slot.length},
                                        timeout=CHUNK_TIMEOUT_S)
                slot.data = reply.buffers[0] if reply.buffers else b""
                slot.declared = int(reply.result.get("length", -1))
            except Exception as exc:
                slot.error = exc
            finally:
                slot.ready.set()

        async def writer(scope: anyio.CancelScope) -> None:
            nonlocal written
            async with receive_slot:
                async for slot in receive_slot:
                    await slot.ready.wait()
                    data, slot.data = slot.data, None
                    if slot.error is None and slot.declared != slot.length:
                        slot.error = TransferError(
                            f"{part.remote_path}: the remote file has {slot.declared} bytes "
                            f"at offset {slot.offset} where {slot.length} were expected: it "
                            "changed size; download it again")
                    elif slot.error is None and (data is None or len(data) != slot.length):
                        # The envelope says one size, the blob is another: a message mangled
                        # in transit (a kernel dying mid-send). Fetch it again.
                        slot.error = _GarbledReply(
                            f"{part.remote_path}: a garbled chunk at offset {slot.offset}")
                    if slot.error is not None:
                        failures.append(slot.error)
                        scope.cancel()
                        return
                    assert data is not None
                    try:
                        await anyio.to_thread.run_sync(part.write, slot.offset, data)
                    except OSError as exc:
                        failures.append(TransferError(f"writing {part.part} failed: "
                                                      f"{exc.strerror or exc}"))
                        scope.cancel()
                        return
                    written += len(data)
                    credit.release()
                    tracker.add(len(data))

        async with anyio.create_task_group() as group:
            group.start_soon(writer, group.cancel_scope)
            async with send_slot:
                for offset, length in _chunks(part.missing(), chunk_size):
                    await credit.acquire()
                    if failures:
                        break
                    slot = _Slot(offset, length)
                    group.start_soon(fetch, slot)
                    try:
                        await send_slot.send(slot)
                    except anyio.BrokenResourceError:
                        break  # the writer stopped: its failure is in ``failures``
        if failures:
            raise failures[0]
        return written

    # --- directory sync (local -> remote) ----------------------------------------------------

    async def _manifest(self, path: str, excludes: Sequence[str], *,
                        hash_files: bool) -> dict[str, Any]:
        reply = await self._call("manifest", {"path": path, "excludes": list(excludes),
                                              "hash": hash_files, "as_blob": True},
                                 timeout=MANIFEST_TIMEOUT_S)
        if reply.buffers:
            return decode_manifest(reply.buffers[0])
        return check_manifest(reply.result)

    async def _local_hashes(self, entries: Sequence[LocalEntry]) -> dict[str, str]:
        def run() -> dict[str, str]:
            now = time.time_ns()
            out: dict[str, str] = {}
            for entry in entries:
                try:
                    st = os.stat(entry.path)
                    digest = self._hashes.get(entry.path, st)
                    if digest is None:
                        digest = sha256_path(entry.path)
                        if _cacheable(st, now):
                            self._hashes.put(entry.path, st, digest)
                    out[entry.rel] = digest
                except OSError:
                    continue  # unreadable now: it counts as changed and fails when sent
            return out

        return await anyio.to_thread.run_sync(run)

    async def sync(self, local_dir: str | os.PathLike[str], remote_dir: str, *,
                   exclude: str | Sequence[str] | None = None, delete: bool = False,
                   max_bytes: int | None = DEFAULT_SYNC_MAX_BYTES,
                   progress: ProgressCallback | None = None,
                   gitignore: bool = True, dry_run: bool = False,
                   allow_root_delete: bool = False) -> dict[str, Any]:
        """Make ``remote_dir`` hold ``local_dir``'s files, sending only what changed.

        Files are compared by size and mtime, and by sha256 where the sizes match but the
        mtimes do not. ``exclude`` None means ``DEFAULT_SYNC_EXCLUDES``; ``.gitignore`` files
        apply too unless ``gitignore`` is False. ``delete`` removes remote files (not
        excluded ones) that the local tree lacks, and remote entries of the wrong type in
        the way; it never deletes a remote path at or under a local one listed in
        ``skipped``, and it refuses (TransferError, nothing sent or deleted) when some local
        entries could not be read. Refuses, before sending anything, when more than
        ``max_bytes`` would travel. Local symlinks to files inside ``local_dir`` are sent as
        files; other links are not followed and are listed in ``skipped``. Raises
        TransferError at the end if some local files could not be read (the others are sent).

        ``delete`` is refused (nothing sent or deleted) when the remote directory is ``/``,
        the server's root, the home directory or a directory above one of them, unless
        ``allow_root_delete``; the supervisor enforces that too. A remote directory that a
        local file replaces is deleted only if it holds nothing the sync excludes. The
        result's ``deleted`` counts what was deleted. ``dry_run`` changes nothing: it
        reports what would be uploaded (``would_upload``) and deleted (``would_delete``),
        and in ``would_refuse`` why a real run would refuse.
        """
        started = time.perf_counter()
        root = os.path.abspath(os.path.expanduser(os.fspath(local_dir)))
        where = f"sync {root} -> {remote_dir}"
        if not os.path.isdir(root):
            raise TransferError(f"{where}: {root} is not a local directory")
        patterns = _normal_excludes(exclude)
        real_root = os.path.realpath(root)
        await anyio.to_thread.run_sync(self._hashes.load_root, real_root)
        # Scanned through its real path: the persisted hash cache is keyed by it.
        tree = await anyio.to_thread.run_sync(
            lambda: scan_local(real_root, patterns, gitignore=gitignore))
        refusals: _List[str] = []  # why a real run would refuse (a dry run reports them)
        if delete and tree.errors:
            # A remote file under an unreadable local directory may well exist locally too.
            shown = "; ".join(e["error"] for e in tree.errors[:5])
            refusals.append(
                f"{where}: refusing delete=True: {len(tree.errors)} local entries could not be "
                f"read ({', '.join(e['path'] for e in tree.errors[:5])}"
                f"{' ...' if len(tree.errors) > 5 else ''}), so remote files cannot be judged "
                f"absent locally; nothing was sent or deleted. Make them readable, exclude "
                f"them, or sync without delete. {shown}")
            if not dry_run:
                raise TransferError(refusals[0])
        try:
            remote = await self._manifest(remote_dir, tree.patterns, hash_files=False)
        except RemoteError as exc:
            raise _with_context(exc, where) from None
        remote_root = str(remote["path"])
        where = f"sync {root} -> {remote_root}"
        protected = remote.get("delete_protected")
        if delete and protected and not allow_root_delete:
            # Decided by the supervisor from the real paths; its sync_delete refuses too.
            refusals.append(f"sync {root}: "
                            + payload_files.protected_root_error(remote_root, str(protected)).message)
            if not dry_run:
                raise TransferError(refusals[-1])
        rfiles: dict[str, dict[str, Any]] = {f["path"]: f for f in remote.get("files", [])}
        rdirs = set(remote.get("dirs", []))
        rlinks = {s["path"] for s in remote.get("symlinks", [])}
        rothers = set(remote.get("others", []))

        changed: _List[str] = []
        unchanged = 0
        candidates: _List[LocalEntry] = []
        for rel, entry in tree.files.items():
            theirs = rfiles.get(rel)
            if theirs is None or theirs.get("size") != entry.size:
                changed.append(rel)
            elif abs(int(theirs.get("mtime_ns") or 0) - entry.st.st_mtime_ns) < MTIME_TOLERANCE_NS:
                unchanged += 1
            else:
                candidates.append(entry)
        if candidates:
            # Same size, different mtime: the content decides (hashes are cached both sides).
            try:
                hashed = await self._manifest(remote_dir, tree.patterns, hash_files=True)
            except RemoteError as exc:
                raise _with_context(exc, where) from None
            remote_sha = {f["path"]: f.get("sha256") for f in hashed.get("files", [])}
            local_sha = await self._local_hashes(candidates)
            for entry in candidates:
                mine = local_sha.get(entry.rel)
                if mine is not None and mine == remote_sha.get(entry.rel):
                    unchanged += 1
                else:
                    changed.append(entry.rel)
        changed.sort()

        # Remote entries of the wrong type in the way, and remote extras.
        needed_dirs = set(tree.dirs)
        for rel in tree.files:
            needed_dirs.update(_parents(rel))
        blockers = sorted({rel for rel in tree.files if rel in rdirs}
                          | {d for d in needed_dirs if d in rfiles or d in rlinks or d in rothers})
        # A remote directory a local file replaces goes entry by entry (its files are
        # extras): its subdirectories are listed too, and the supervisor removes none that
        # still holds something unlisted (an excluded entry).
        replaced = {rel for rel in tree.files if rel in rdirs}
        inner_dirs = sorted(d for d in rdirs if any(p in replaced for p in _parents(d)))
        # What the scan skipped (links to directories, FIFOs...) or could not read is not
        # "absent locally": remote files at or under those paths are never extras.
        unseen = {str(s["path"]) for s in tree.skipped} | {str(e["path"]) for e in tree.errors}
        extras = sorted(rel for rel in (set(rfiles) | rlinks | rothers)
                        - set(tree.files) - set(blockers) if not _covered(rel, unseen))
        if blockers and not delete:
            shown = ", ".join(f"{remote_root}/{b}" for b in blockers[:5])
            refusals.append(f"{where}: remote entries of another type are in the way: "
                            f"{shown}{' ...' if len(blockers) > 5 else ''}; pass "
                            "delete=True to replace them")
            if not dry_run:
                raise TransferError(refusals[-1])
        total = sum(tree.files[rel].size for rel in changed)
        if max_bytes is not None and total > max_bytes:
            refusals.append(f"{where}: {len(changed)} changed files hold {total} bytes, over "
                            f"max_bytes={max_bytes}; nothing was sent. Pass a larger "
                            f"max_bytes (e.g. max_bytes={total}) or exclude big files")
            if not dry_run:
                raise TransferError(refusals[-1])
        to_delete = sorted(set(blockers) | set(extras) | set(inner_dirs)) if delete else []
        if dry_run:
            return {
                "dry_run": True, "local_dir": root, "remote_dir": remote_root,
                "files": len(tree.files), "would_upload": len(changed),
                "would_upload_bytes": total, "would_upload_paths": changed[:200],
                "unchanged": unchanged, "would_delete": len(to_delete),
                "would_delete_paths": to_delete[:200], "would_refuse": refusals,
                "uploaded": 0, "bytes_sent": 0, "bytes": 0, "deleted": 0,
                "skipped": tree.skipped, "errors": tree.errors,
                "remote_errors": remote.get("errors", []),
                "seconds": time.perf_counter() - started,
            }

        deleted: _List[str] = []
        pruned_dirs = 0
        if to_delete:
            try:
                reply = await self._call("sync_delete", {"root": remote_root, "paths": to_delete,
                                                         "allow_root_delete": allow_root_delete},
                                         timeout=MANIFEST_TIMEOUT_S)
            except RemoteError as exc:
                raise _with_context(exc, f"{where}: nothing was sent or deleted") from None
            deleted = [str(p) for p in reply.result.get("deleted", [])]
            pruned_dirs = int(reply.result.get("pruned_dirs") or 0)

        tracker = _Progress(progress, total)
        outcome = await self._send_files(remote_root, [tree.files[rel] for rel in changed],
                                         tracker)
        # Empty local directories travel too (others appear with their files).
        missing_dirs = set(tree.dirs) - rdirs - {d for rel in changed for d in _parents(rel)}
        inner = {p for d in missing_dirs for p in _parents(d)}
        for rel in sorted(missing_dirs - inner):  # mkdir makes the parents
            await self.mkdir(f"{remote_root}/{rel}")
        if not remote.get("exists") and not changed:
            await self.mkdir(remote_root)
        await anyio.to_thread.run_sync(self._save_hashes, real_root, tree)

        problems = tree.errors + outcome["errors"]
        result: dict[str, Any] = {
            "local_dir": root, "remote_dir": remote_root, "files": len(tree.files),
            "uploaded": outcome["uploaded"], "bytes_sent": outcome["bytes"],
            "bytes": outcome["bytes"], "unchanged": unchanged, "deleted": len(deleted),
            "pruned_dirs": pruned_dirs,
            "batches": outcome["batches"], "large_files": outcome["large_files"],
            "changed": changed[:50], "deleted_paths": deleted[:50], "skipped": tree.skipped,
            "errors": problems, "remote_errors": remote.get("errors", []),
            "seconds": time.perf_counter() - started,
        }
        if problems:
            shown = "; ".join(p["error"] for p in problems[:5])
            raise TransferError(f"{where}: {len(problems)} local entries could not be read "
                                f"(the other files were sent): {shown}")
        return result

    def _save_hashes(self, real_root: str, tree: LocalTree) -> None:
        rows: dict[str, _List[Any]] = {}
        for rel, entry in tree.files.items():
            digest = self._hashes.get(entry.path, entry.st)
            if digest is not None:
                st = entry.st
                rows[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest]
        self._hashes.save_root(real_root, rows)

    async def _send_files(self, remote_root: str, entries: Sequence[LocalEntry],
                          tracker: _Progress) -> dict[str, Any]:
        """Small files in batch_write messages, big ones through upload, a few at a time."""
        small = [e for e in entries if e.size <= SMALL_FILE_BYTES]
        large = [e for e in entries if e.size > SMALL_FILE_BYTES]
        batches: _List[_List[LocalEntry]] = []
        current: _List[LocalEntry] = []
        size = envelope = 0
        for entry in small:
            cost = len(entry.rel.encode()) + 96
            if current and (size + entry.size > BATCH_BYTES or len(current) >= BATCH_FILES
                            or envelope + cost > BATCH_ENVELOPE_BYTES):
                batches.append(current)
                current, size, envelope = [], 0, 0
            current.append(entry)
            size += entry.size
            envelope += cost
        if current:
            batches.append(current)
        outcome: dict[str, Any] = {"uploaded": 0, "bytes": 0, "batches": len(batches),
                                   "large_files": 0, "errors": []}
        late: _List[LocalEntry] = []

        async def send_batch(batch: _List[LocalEntry]) -> None:
            specs, blobs, grown, errors = await anyio.to_thread.run_sync(self._read_batch, batch)
            outcome["errors"].extend(errors)
            late.extend(grown)
            if specs:
                await self._call("batch_write", {"root": remote_root, "files": specs,
                                                 "make_dirs": True},
                                 buffers=blobs, timeout=CHUNK_TIMEOUT_S)
                sent = sum(len(b) for b in blobs)
                outcome["uploaded"] += len(specs)
                outcome["bytes"] += sent
                tracker.add(sent)

        async def send_large(entry: LocalEntry) -> None:
            try:
                result = await self._upload_path(
                    entry.path, f"{remote_root}/{entry.rel}", progress=tracker.per_file(),
                    chunk_size=DEFAULT_CHUNK_BYTES, window=DEFAULT_WINDOW,
                    mode=stat.S_IMODE(entry.st.st_mode), keep_mtime=True)
            except TransferError as exc:
                if os.path.exists(entry.path):
                    raise
                outcome["errors"].append({"path": entry.rel, "error": str(exc)})
                return
            outcome["uploaded"] += 1
            outcome["large_files"] += 1
            outcome["bytes"] += result.sent_bytes

        try:
            await _run_limited([functools.partial(send_batch, b) for b in batches],
                               BATCH_WINDOW)
            await _run_limited([functools.partial(send_large, e) for e in [*large, *late]],
                               PARALLEL_UPLOADS)
        except RemoteError as exc:
            raise _with_context(exc, f"sync to {remote_root}") from None
        return outcome

    def _read_batch(self, batch: Sequence[LocalEntry]) -> tuple[
            _List[dict[str, Any]], _List[bytes], _List[LocalEntry], _List[dict[str, str]]]:
        """Read a batch's files (worker thread): specs, bytes, files that grew, errors."""
        specs: _List[dict[str, Any]] = []
        blobs: _List[bytes] = []
        grown: _List[LocalEntry] = []
        errors: _List[dict[str, str]] = []
        now = time.time_ns()
        for entry in batch:
            try:
                with open(entry.path, "rb") as handle:
                    st = os.fstat(handle.fileno())
                    data = handle.read(SMALL_FILE_BYTES + 1)
            except OSError as exc:
                errors.append({"path": entry.rel,
                               "error": f"{entry.path}: {exc.strerror or exc}"})
                continue
            if len(data) > SMALL_FILE_BYTES:  # it grew since the scan: upload it in chunks
                grown.append(LocalEntry(entry.rel, entry.path, st))
                continue
            racy = _racy(st, now)
            specs.append({"path": entry.rel, "size": len(data), "mode": stat.S_IMODE(st.st_mode),
                          "mtime_ns": None if racy else st.st_mtime_ns})
            blobs.append(data)
            if _cacheable(st, now) and len(data) == st.st_size:
                self._hashes.put(entry.path, st, hashlib.sha256(data).hexdigest())
        return specs, blobs, grown, errors

    # --- directory download (remote -> local) -------------------------------------------------

    async def download_dir(self, remote_dir: str, local_dir: str | os.PathLike[str], *,
                           progress: ProgressCallback | None = None,
                           exclude: str | Sequence[str] | None = None) -> dict[str, Any]:
        """Download a remote tree into ``local_dir`` (created if needed), file by file.

        Nothing is staged on the remote. Every name is checked before anything is written:
        absolute paths, ``..`` and names that would resolve outside ``local_dir`` (through
        links already there) are refused; remote symlinks are not recreated and devices,
        FIFOs and sockets are not read: they are listed in ``skipped``. Files keep their
        remote mtime. ``exclude`` (globs, as for ``sync``) is empty when None. Raises
        TransferError at the end if some files could not be read or written (the others are
        in place).
        """
        root = Path(os.path.abspath(os.path.expanduser(os.fspath(local_dir))))
        return await self._download_dir(remote_dir, root, progress=progress, exclude=exclude)

    async def _download_dir(self, remote_dir: str, root: Path, *,
                            progress: ProgressCallback | None = None,
                            exclude: str | Sequence[str] | None = None) -> dict[str, Any]:
        """``download_dir`` into ``root``, an absolute path taken as it is (no ``~``)."""
        if not root.is_absolute():
            raise ValueError(f"{root} must be an absolute path")
        started = time.perf_counter()
        where = f"download {remote_dir} -> {root}"
        patterns = [] if exclude is None else _normal_excludes(exclude)
        try:
            manifest = await self._manifest(remote_dir, patterns, hash_files=False)
        except RemoteError as exc:
            raise _with_context(exc, where) from None
        remote_root = str(manifest["path"])
        where = f"download {remote_root} -> {root}"
        if not manifest.get("exists"):
            raise NotFound("not_found", f"{where}: {remote_root}: no such directory on the remote",
                           {"path": remote_root})
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransferError(f"{where}: cannot create {root}: {exc.strerror or exc}") from None
        if not root.is_dir():
            raise TransferError(f"{where}: {root} is not a directory")

        skipped: _List[dict[str, str]] = []
        errors: _List[dict[str, str]] = []
        skipped += [{"path": str(s["path"]), "reason": f"remote symlink to {s.get('target')}: "
                                                       "not recreated"}
                    for s in manifest.get("symlinks", [])]
        skipped += [{"path": str(p), "reason": "not a regular file (device, FIFO or socket)"}
                    for p in manifest.get("others", [])]
        errors += [{"path": str(e.get("path")), "error": str(e.get("message"))}
                   for e in manifest.get("errors", [])]

        def plan(rel: str) -> Path | None:
            try:
                return safe_local_path(root, rel)
            except TransferError as exc:
                skipped.append({"path": rel, "reason": str(exc)})
                return None

        for rel in manifest.get("dirs", []):
            target = plan(rel)
            if target is not None:
                try:
                    _make_dirs_inside(root, target)
                except TransferError as exc:  # a local link leading out, or a file in the way
                    skipped.append({"path": rel, "reason": str(exc)})
                except OSError as exc:
                    errors.append({"path": rel, "error": f"{target}: {exc.strerror or exc}"})
        files: _List[tuple[dict[str, Any], Path]] = []
        for item in manifest.get("files", []):
            target = plan(str(item["path"]))
            if target is not None:
                files.append((item, target))
        total = sum(int(item["size"]) for item, _ in files)
        tracker = _Progress(progress, total)
        written = {"files": 0, "bytes": 0}

        small = [(i, t) for i, t in files if int(i["size"]) <= SMALL_FILE_BYTES]
        large = [(i, t) for i, t in files if int(i["size"]) > SMALL_FILE_BYTES]
        groups: _List[_List[tuple[dict[str, Any], Path]]] = []
        current: _List[tuple[dict[str, Any], Path]] = []
        size = 0
        for item, target in small:
            if current and (size + int(item["size"]) > BATCH_BYTES or len(current) >= BATCH_FILES):
                groups.append(current)
                current, size = [], 0
            current.append((item, target))
            size += int(item["size"])
        if current:
            groups.append(current)

        async def fetch_group(group: _List[tuple[dict[str, Any], Path]]) -> None:
            targets = {str(item["path"]): target for item, target in group}
            pending = list(targets)
            while pending:
                reply = await self._call("batch_read", {"root": remote_root, "paths": pending,
                                                        "max_bytes": BATCH_BYTES + MiB},
                                         timeout=CHUNK_TIMEOUT_S)
                stored = await anyio.to_thread.run_sync(
                    self._store_batch, root, targets, pending, reply.result, reply.buffers,
                    errors)
                written["files"] += stored[0]
                written["bytes"] += stored[1]
                tracker.add(stored[1])
                remaining = stored[2]
                if remaining and len(remaining) >= len(pending):
                    raise TransferError(f"{where}: batch_read made no progress")
                pending = remaining

        async def fetch_large(item: dict[str, Any], target: Path) -> None:
            on_file = tracker.per_file()
            try:
                _make_dirs_inside(root, target.parent)
                # Checked again now that the parents exist (a link could have appeared).
                safe_local_path(root, str(item["path"]))
                result = await self._download(f"{remote_root}/{item['path']}", target,
                                              progress=on_file, chunk_size=DEFAULT_CHUNK_BYTES,
                                              window=DEFAULT_WINDOW, keep_mtime=True)
            except (TransferError, RemoteError, OSError) as exc:
                errors.append({"path": str(item["path"]), "error": str(exc)})
                return
            written["files"] += 1
            written["bytes"] += result.bytes

        try:
            await _run_limited([functools.partial(fetch_group, g) for g in groups], BATCH_WINDOW)
            await _run_limited([functools.partial(fetch_large, i, t) for i, t in large],
                               PARALLEL_DOWNLOADS)
        except RemoteError as exc:
            raise _with_context(exc, where) from None
        result: dict[str, Any] = {
            "remote_dir": remote_root, "local_dir": str(root), "files": written["files"],
            "bytes": written["bytes"], "skipped": skipped, "errors": errors,
            "seconds": time.perf_counter() - started,
        }
        if errors:
            shown = "; ".join(f"{e['path']}: {e['error']}" for e in errors[:5])
            raise TransferError(f"{where}: {len(errors)} entries failed (the other "
                                f"{written['files']} files are in place): {shown}")
        return result

    @staticmethod
    def _store_batch(root: Path, targets: dict[str, Path], pending: Sequence[str],
                     result: Any, blobs: Sequence[bytes],
                     errors: _List[dict[str, str]]) -> tuple[int, int, _List[str]]:
        """Check and write one batch_read reply (worker thread): (files, bytes, remaining).

        The reply comes from the remote and is checked like a big download: one blob per
        entry, each as long as its entry's size and with its sha256, or that file is not
        written (and is reported). A path asked for but neither answered nor listed as
        remaining is reported too, never silently dropped.
        """
        asked = set(pending)
        entries = result.get("files") if isinstance(result, dict) else None
        if not isinstance(entries, list) or len(entries) != len(blobs):
            shown = len(entries) if isinstance(entries, list) else "no"
            for rel in pending:
                errors.append({"path": rel, "error": f"the remote's batch_read reply is "
                               f"malformed ({shown} entries, {len(blobs)} blobs): not written"})
            return 0, 0, []
        answers: dict[str, tuple[dict[str, Any], bytes] | None] = {}
        for entry, data in zip(entries, blobs, strict=True):
            name = entry.get("path") if isinstance(entry, dict) else None
            if not isinstance(name, str) or name not in asked:
                continue  # not something we asked for
            answers[name] = None if name in answers else (entry, data)  # twice: trust neither
        raw_remaining = result.get("remaining")
        remaining = [p for p in (raw_remaining if isinstance(raw_remaining, list) else [])
                     if isinstance(p, str) and p in asked and p not in answers]
        count = total = 0
        for rel in pending:
            target = targets[rel]
            if rel not in answers:
                if rel not in remaining:
                    errors.append({"path": rel, "error": "the remote's batch_read reply left "
                                                         "it out: not written"})
                continue
            answer = answers[rel]
            if answer is None:
                errors.append({"path": rel, "error": "the remote's batch_read reply has it "
                                                     "twice: not written"})
                continue
            entry, data = answer
            if "error" in entry:
                error = entry["error"]
                message = error.get("message", error) if isinstance(error, dict) else error
                errors.append({"path": rel, "error": str(message)})
                continue
            size, digest = entry.get("size"), entry.get("sha256")
            if isinstance(size, bool) or not isinstance(size, int) or size != len(data) \
                    or not isinstance(digest, str) \
                    or hashlib.sha256(data).hexdigest() != digest.lower():
                errors.append({"path": rel, "error": (
                    f"the remote sent {len(data)} bytes for it where its reply says {size!r} "
                    f"bytes with sha256 {digest!r}, which they do not match: not written")})
                continue
            try:
                _make_dirs_inside(root, target.parent)
                safe_local_path(root, rel)
                mtime = entry.get("mtime_ns")
                _atomic_local_write(target, data,
                                    mtime if isinstance(mtime, int) and
                                    not isinstance(mtime, bool) else None)
            except (TransferError, OSError, ValueError) as exc:
                errors.append({"path": rel, "error": f"{target}: {exc}"})
                continue
            count += 1
            total += len(data)
        return count, total, remaining

async def _run_limited(jobs: Sequence[Callable[[], Any]], limit: int) -> None:
    """Run coroutine factories with at most ``limit`` at once; the first error wins."""
    if not jobs:
        return
    failures: _List[BaseException] = []
    gate = anyio.Semaphore(limit)

    async def run(job: Callable[[], Any], scope: anyio.CancelScope) -> None:
        try:
            await job()
        except Exception as exc:
            failures.append(exc)
            scope.cancel()
        finally:
            gate.release()

    async with anyio.create_task_group() as group:
        for job in jobs:
            await gate.acquire()
            if failures:
                break
            group.start_soon(run, job, group.cancel_scope)
    if failures:
        raise failures[0]


__all__ = ["DEFAULT_SYNC_EXCLUDES", "REFERENCE_EXCLUDE_GLOBS_CSV", "AsyncFiles", "TransferResult",
           "safe_local_path", "scan_local", "scoped_gitignore_pattern"]
