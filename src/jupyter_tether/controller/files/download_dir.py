"""Downloading a remote tree into a local directory, file by file, names checked.

The remote manifest, then ``batch_read`` for small files (a few messages in flight) and
``Downloader.download`` for big ones. Every name from the remote becomes a local path only
through ``safe_local_path``, checked again once its parent directories exist.
"""

from __future__ import annotations

import functools
import hashlib
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from ...agent_payload.wire import Op
from ...errors import NotFound, RemoteError, TransferError
from ..caller import Caller
from ..concurrency import gather_limited
from .download import Downloader
from .excludes import normal_excludes
from .local import atomic_local_write, make_dirs_inside, safe_local_path
from .plan import MTIME_TOLERANCE_NS
from .progress import Progress, ProgressCallback
from .remote import ManifestFetch, with_context
from .tuning import (
    BATCH_BYTES,
    BATCH_FILES,
    BATCH_WINDOW,
    CHUNK_TIMEOUT_S,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_WINDOW,
    PARALLEL_DOWNLOADS,
    SMALL_FILE_BYTES,
    MiB,
)

Planned = tuple[dict[str, Any], Path]  # a manifest's file entry and its checked local path


class DirDownload:
    """Runs downloads of remote trees (see ``AsyncFiles.download_dir``)."""

    def __init__(self, caller: Caller, downloader: Downloader,
                 manifest: ManifestFetch) -> None:
        self._caller = caller
        self._downloader = downloader
        self._manifest = manifest

    async def run(self, remote_dir: str, root: Path, *,
                  progress: ProgressCallback | None = None,
                  exclude: str | Sequence[str] | None = None) -> dict[str, Any]:
        """Download ``remote_dir`` into ``root``, an absolute path taken as it is (no ``~``)."""
        if not root.is_absolute():
            raise ValueError(f"{root} must be an absolute path")
        started = time.perf_counter()
        where = f"download {remote_dir} -> {root}"
        patterns = [] if exclude is None else normal_excludes(exclude)
        try:
            manifest = await self._manifest(remote_dir, patterns, hash_files=False)
        except RemoteError as exc:
            raise with_context(exc, where) from None
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

        skipped: list[dict[str, str]] = []
        errors: list[dict[str, str]] = []
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
                    make_dirs_inside(root, target)
                except TransferError as exc:  # a local link leading out, or a file in the way
                    skipped.append({"path": rel, "reason": str(exc)})
                except OSError as exc:
                    errors.append({"path": rel, "error": f"{target}: {exc.strerror or exc}"})
        files: list[Planned] = []
        for item in manifest.get("files", []):
            target = plan(str(item["path"]))
            if target is not None:
                files.append((item, target))
        files, unchanged = split_unchanged(files)
        total = sum(int(item["size"]) for item, _ in files)
        tracker = Progress(progress, total)
        written = {"files": 0, "bytes": 0}
        groups, large = group_for_download(files)

        async def fetch_group(group: list[Planned]) -> None:
            targets = {str(item["path"]): target for item, target in group}
            pending = list(targets)
            while pending:
                reply = await self._caller.call(
                    Op.BATCH_READ, {"root": remote_root, "paths": pending,
                                    "max_bytes": BATCH_BYTES + MiB},
                    timeout=CHUNK_TIMEOUT_S)
                stored = await anyio.to_thread.run_sync(
                    store_batch, root, targets, pending, reply.result, reply.buffers, errors)
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
                make_dirs_inside(root, target.parent)
                # Checked again now that the parents exist (a link could have appeared).
                safe_local_path(root, str(item["path"]))
                result = await self._downloader.download(
                    f"{remote_root}/{item['path']}", target, progress=on_file,
                    chunk_size=DEFAULT_CHUNK_BYTES, window=DEFAULT_WINDOW, keep_mtime=True)
            except (TransferError, RemoteError, OSError) as exc:
                errors.append({"path": str(item["path"]), "error": str(exc)})
                return
            written["files"] += 1
            written["bytes"] += result.bytes

        try:
            await gather_limited([functools.partial(fetch_group, g) for g in groups],
                                 BATCH_WINDOW)
            await gather_limited([functools.partial(fetch_large, i, t) for i, t in large],
                                 PARALLEL_DOWNLOADS)
        except RemoteError as exc:
            raise with_context(exc, where) from None
        result: dict[str, Any] = {
            "remote_dir": remote_root, "local_dir": str(root), "files": written["files"],
            "bytes": written["bytes"], "unchanged": unchanged, "skipped": skipped,
            "errors": errors,
            "seconds": time.perf_counter() - started,
        }
        if errors:
            shown = "; ".join(f"{e['path']}: {e['error']}" for e in errors[:5])
            raise TransferError(f"{where}: {len(errors)} entries failed (the other "
                                f"{written['files']} files are in place): {shown}")
        return result


def split_unchanged(files: Sequence[Planned]) -> tuple[list[Planned], int]:
    """The files to fetch, and how many are already here: a local regular file with the
    remote's size and mtime (as an earlier download left it: files keep their remote mtime)
    is not fetched again, the quick check ``sync`` makes on the way up."""
    fetch: list[Planned] = []
    same = 0
    for item, target in files:
        mtime = item.get("mtime_ns")
        try:
            st = target.lstat()
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == int(item["size"]) \
                and isinstance(mtime, int) and abs(st.st_mtime_ns - mtime) < MTIME_TOLERANCE_NS:
            same += 1
        else:
            fetch.append((item, target))
    return fetch, same


def group_for_download(files: Sequence[Planned]) -> tuple[list[list[Planned]], list[Planned]]:
    """Small files in ``batch_read``-sized groups (bytes, count), and the big ones."""
    small = [(i, t) for i, t in files if int(i["size"]) <= SMALL_FILE_BYTES]
    large = [(i, t) for i, t in files if int(i["size"]) > SMALL_FILE_BYTES]
    groups: list[list[Planned]] = []
    current: list[Planned] = []
    size = 0
    for item, target in small:
        if current and (size + int(item["size"]) > BATCH_BYTES or len(current) >= BATCH_FILES):
            groups.append(current)
            current, size = [], 0
        current.append((item, target))
        size += int(item["size"])
    if current:
        groups.append(current)
    return groups, large


def store_batch(root: Path, targets: dict[str, Path], pending: Sequence[str], result: Any,
                blobs: Sequence[bytes], errors: list[dict[str, str]]) -> tuple[int, int, list[str]]:
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
            make_dirs_inside(root, target.parent)
            safe_local_path(root, rel)
            mtime = entry.get("mtime_ns")
            atomic_local_write(target, data,
                               mtime if isinstance(mtime, int) and
                               not isinstance(mtime, bool) else None)
        except (TransferError, OSError, ValueError) as exc:
            errors.append({"path": rel, "error": f"{target}: {exc}"})
            continue
        count += 1
        total += len(data)
    return count, total, remaining
