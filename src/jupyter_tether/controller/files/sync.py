"""Executing a sync (local -> remote): scan, manifest, ``plan_sync``, then delete and send.

Small files travel in ``batch_write`` messages, a few in flight; big ones go through the
chunked upload. The local hashes a sync computes are kept in the hash cache, persisted per
synced tree, so the next sync of an unchanged tree hashes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import time
from collections.abc import Sequence
from typing import Any

import anyio

from ...agent_payload.hashing import HashCache
from ...agent_payload.wire import Op
from ...errors import RemoteError, TransferError
from ..caller import Caller
from ..concurrency import gather_limited
from .excludes import normal_excludes
from .local import cacheable, racy, sha256_path
from .plan import ContentHashes, SyncOptions, SyncPlan, plan_sync, unreadable_refusal
from .progress import Progress, ProgressCallback
from .remote import ManifestFetch, with_context
from .scan import LocalEntry, LocalTree, scan_local
from .tuning import (
    BATCH_WINDOW,
    CHUNK_TIMEOUT_S,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_SYNC_MAX_BYTES,
    DEFAULT_WINDOW,
    MANIFEST_TIMEOUT_S,
    PARALLEL_UPLOADS,
    SMALL_FILE_BYTES,
)
from .upload import Uploader


class TreeSync:
    """Runs syncs of local trees to remote directories (see ``AsyncFiles.sync``)."""

    def __init__(self, caller: Caller, hashes: HashCache, uploader: Uploader,
                 manifest: ManifestFetch) -> None:
        self._caller = caller
        self._hashes = hashes
        self._uploader = uploader
        self._manifest = manifest

    async def run(self, local_dir: str | os.PathLike[str], remote_dir: str, *,
                  exclude: str | Sequence[str] | None = None, delete: bool = False,
                  max_bytes: int | None = DEFAULT_SYNC_MAX_BYTES,
                  progress: ProgressCallback | None = None,
                  gitignore: bool = True, dry_run: bool = False,
                  allow_root_delete: bool = False) -> dict[str, Any]:
        started = time.perf_counter()
        root = os.path.abspath(os.path.expanduser(os.fspath(local_dir)))
        where = f"sync {root} -> {remote_dir}"
        if not os.path.isdir(root):
            raise TransferError(f"{where}: {root} is not a local directory")
        patterns = normal_excludes(exclude)
        real_root = os.path.realpath(root)
        await anyio.to_thread.run_sync(self._hashes.load_root, real_root)
        # Scanned through its real path: the persisted hash cache is keyed by it.
        tree = await anyio.to_thread.run_sync(
            lambda: scan_local(real_root, patterns, gitignore=gitignore))
        if delete and not dry_run:
            refusal = unreadable_refusal(tree, where)
            if refusal is not None:  # before asking the remote for anything
                raise TransferError(refusal)
        try:
            remote = await self._manifest(remote_dir, tree.patterns, hash_files=False)
        except RemoteError as exc:
            raise with_context(exc, where) from None
        options = SyncOptions(delete=delete, max_bytes=max_bytes,
                              allow_root_delete=allow_root_delete, local_dir=root,
                              remote_dir=remote_dir)
        plan = plan_sync(tree, remote, options)
        remote_root = plan.remote_root
        where = f"sync {root} -> {remote_root}"
        if plan.refusals and not dry_run:
            raise TransferError(plan.refusals[0])
        if plan.to_hash:
            # Same size, different mtime: the content decides (hashes are cached both sides).
            try:
                hashed = await self._manifest(remote_dir, tree.patterns, hash_files=True)
            except RemoteError as exc:
                raise with_context(exc, where) from None
            remote_sha = {f["path"]: f.get("sha256") for f in hashed.get("files", [])}
            local_sha = await self._local_hashes(plan.to_hash)
            plan = plan_sync(tree, remote, options, ContentHashes(local_sha, remote_sha))
            if plan.refusals and not dry_run:
                raise TransferError(plan.refusals[0])
        if dry_run:
            return {
                "dry_run": True, "local_dir": root, "remote_dir": remote_root,
                "files": len(tree.files), "would_upload": len(plan.upload),
                "would_upload_bytes": plan.upload_bytes,
                "would_upload_paths": plan.upload[:200],
                "unchanged": plan.unchanged, "would_delete": len(plan.delete),
                "would_delete_paths": plan.delete[:200], "would_refuse": plan.refusals,
                "uploaded": 0, "bytes_sent": 0, "bytes": 0, "deleted": 0,
                "skipped": tree.skipped, "errors": tree.errors,
                "remote_errors": remote.get("errors", []),
                "seconds": time.perf_counter() - started,
            }

        deleted: list[str] = []
        pruned_dirs = 0
        if plan.delete:
            try:
                reply = await self._caller.call(
                    Op.SYNC_DELETE, {"root": remote_root, "paths": plan.delete,
                                     "allow_root_delete": allow_root_delete},
                    timeout=MANIFEST_TIMEOUT_S)
            except RemoteError as exc:
                raise with_context(exc, f"{where}: nothing was sent or deleted") from None
            deleted = [str(p) for p in reply.result.get("deleted", [])]
            pruned_dirs = int(reply.result.get("pruned_dirs") or 0)

        tracker = Progress(progress, plan.upload_bytes)
        outcome = await self._send_files(remote_root, plan, tracker)
        for rel in plan.mkdirs:
            await self._mkdir(f"{remote_root}/{rel}")
        if plan.make_root:
            await self._mkdir(remote_root)
        await anyio.to_thread.run_sync(self._save_hashes, real_root, tree)

        problems = tree.errors + outcome["errors"]
        result: dict[str, Any] = {
            "local_dir": root, "remote_dir": remote_root, "files": len(tree.files),
            "uploaded": outcome["uploaded"], "bytes_sent": outcome["bytes"],
            "bytes": outcome["bytes"], "unchanged": plan.unchanged, "deleted": len(deleted),
            "pruned_dirs": pruned_dirs,
            "batches": outcome["batches"], "large_files": outcome["large_files"],
            "changed": plan.upload[:50], "deleted_paths": deleted[:50],
            "skipped": tree.skipped, "errors": problems,
            "remote_errors": remote.get("errors", []),
            "seconds": time.perf_counter() - started,
        }
        if problems:
            shown = "; ".join(p["error"] for p in problems[:5])
            raise TransferError(f"{where}: {len(problems)} local entries could not be read "
                                f"(the other files were sent): {shown}")
        return result

    async def _mkdir(self, path: str) -> None:
        await self._caller.call(Op.FS_MKDIR, {"path": path, "parents": True})

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
                        if cacheable(st, now):
                            self._hashes.put(entry.path, st, digest)
                    out[entry.rel] = digest
                except OSError:
                    continue  # unreadable now: it counts as changed and fails when sent
            return out

        return await anyio.to_thread.run_sync(run)

    def _save_hashes(self, real_root: str, tree: LocalTree) -> None:
        rows: dict[str, list[Any]] = {}
        for rel, entry in tree.files.items():
            digest = self._hashes.get(entry.path, entry.st)
            if digest is not None:
                st = entry.st
                rows[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest]
        self._hashes.save_root(real_root, rows)

    async def _send_files(self, remote_root: str, plan: SyncPlan,
                          tracker: Progress) -> dict[str, Any]:
        """The plan's batches in batch_write messages, its big files through upload."""
        outcome: dict[str, Any] = {"uploaded": 0, "bytes": 0, "batches": len(plan.batches),
                                   "large_files": 0, "errors": []}
        late: list[LocalEntry] = []

        async def send_batch(batch: list[LocalEntry]) -> None:
            specs, blobs, grown, errors = await anyio.to_thread.run_sync(self._read_batch, batch)
            outcome["errors"].extend(errors)
            late.extend(grown)
            if specs:
                await self._caller.call(Op.BATCH_WRITE, {"root": remote_root, "files": specs,
                                                         "make_dirs": True},
                                        buffers=blobs, timeout=CHUNK_TIMEOUT_S)
                sent = sum(len(b) for b in blobs)
                outcome["uploaded"] += len(specs)
                outcome["bytes"] += sent
                tracker.add(sent)

        async def send_large(entry: LocalEntry) -> None:
            try:
                result = await self._uploader.upload_path(
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
            await gather_limited([functools.partial(send_batch, b) for b in plan.batches],
                                 BATCH_WINDOW)
            # Files that grew past the small-file size since the scan go in chunks too.
            await gather_limited([functools.partial(send_large, e) for e in [*plan.large, *late]],
                                 PARALLEL_UPLOADS)
        except RemoteError as exc:
            raise with_context(exc, f"sync to {remote_root}") from None
        return outcome

    def _read_batch(self, batch: Sequence[LocalEntry]) -> tuple[
            list[dict[str, Any]], list[bytes], list[LocalEntry], list[dict[str, str]]]:
        """Read a batch's files (worker thread): specs, bytes, files that grew, errors."""
        specs: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        grown: list[LocalEntry] = []
        errors: list[dict[str, str]] = []
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
            is_racy = racy(st, now)
            specs.append({"path": entry.rel, "size": len(data), "mode": stat.S_IMODE(st.st_mode),
                          "mtime_ns": None if is_racy else st.st_mtime_ns})
            blobs.append(data)
            if cacheable(st, now) and len(data) == st.st_size:
                self._hashes.put(entry.path, st, hashlib.sha256(data).hexdigest())
        return specs, blobs, grown, errors
