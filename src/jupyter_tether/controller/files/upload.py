"""Uploads: one local file (or bytes in memory) to a remote file, resumably, in chunks.

A settled local file (not modified in the last seconds) is hashed while it is sent: its
``upload_begin`` names the content by a key (path and the hash cache's stat key), the chunks are read
and hashed in offset order, and ``upload_commit`` brings the sha256, which the remote checks
against what it wrote. A file whose hash is cached, one modified moments ago, and any
resumed upload are hashed first and begun by sha256. Either way ``begin`` says which ranges
the remote already holds (a resumed upload skips them), chunks go out with ``window``
requests in flight, and the commit verifies the sha256 and renames into place: the remote
file appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from ...agent_payload import wire
from ...agent_payload.fsutil import O_BINARY
from ...agent_payload.hashing import HashCache, cache_key
from ...agent_payload.transfer_state import clean_ranges, missing_ranges
from ...agent_payload.wire import Op
from ...errors import ConnectionLost, NotFound, RemoteError, TetherTimeout, TransferError
from ..caller import Caller
from ..concurrency import limited_tasks
from .local import LocalFile, cacheable, racy
from .progress import Progress, ProgressCallback
from .ranges import chunks
from .remote import resumable, with_context
from .result import TransferResult
from .tuning import CHUNK_TIMEOUT_S, MAX_ATTEMPTS

log = logging.getLogger(__name__)


class Uploader:
    """Sends local files and in-memory bytes to remote paths over a ``Caller``."""

    def __init__(self, caller: Caller, hashes: HashCache) -> None:
        self._caller = caller
        # sha256 of local files by (size, mtime, ctime, inode), shared with sync.
        self._hashes = hashes

    async def upload_path(self, local: str, remote_path: str, *,
                          progress: ProgressCallback | None, chunk_size: int, window: int,
                          mode: int | None, keep_mtime: bool) -> TransferResult:
        """Upload the regular file at the absolute path ``local``."""
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
            fd = os.open(local, os.O_RDONLY | O_BINARY)
        except OSError as exc:
            raise TransferError(f"{where}: cannot read {local}: {exc.strerror or exc}") from None
        source = LocalFile(fd)
        try:
            st = os.fstat(fd)

            def hash_all() -> str:
                return str(source.hash_from(0, hashlib.sha256()).hexdigest())

            def unchanged() -> bool:
                now = os.stat(local)
                return cache_key(now) == cache_key(st)

            started_ns = time.time_ns()
            digest = self._hashes.get(local, st)
            key = None
            if digest is None and racy(st, started_ns):
                # Written moments ago: a write within the same mtime tick would go unseen by
                # ``unchanged``; hash first, so a change shows as a mismatch at commit.
                digest = str(await anyio.to_thread.run_sync(hash_all))
            elif digest is None:
                key = hashlib.sha256(repr((local, *cache_key(st))).encode()).hexdigest()[:32]
            mtime_ns = st.st_mtime_ns if keep_mtime and not racy(st, started_ns) else None
            try:
                result = await self.upload(source.read_at, st.st_size, digest, remote_path, local,
                                           progress=progress, chunk_size=chunk_size,
                                           window=window, mode=mode, mtime_ns=mtime_ns,
                                           key=key, hash_all=hash_all, unchanged=unchanged)
            except RemoteError as exc:
                if exc.details.get("reason") == "hash_mismatch" and not unchanged():
                    raise TransferError(f"{where}: {local} changed while it was being "
                                        "uploaded; upload it again") from exc
                raise
            if cacheable(st, time.time_ns()):
                self._hashes.put(local, st, result.sha256)
            return result
        except OSError as exc:
            raise TransferError(f"{where}: reading {local} failed: {exc.strerror or exc}") from None
        finally:
            source.close()

    async def upload(self, read_at: Callable[[int, int], bytes], size: int, digest: str | None,
                     remote_path: str, local_label: str, *, progress: ProgressCallback | None,
                     chunk_size: int, window: int, mode: int | None,
                     mtime_ns: int | None, key: str | None = None,
                     hash_all: Callable[[], str] | None = None,
                     unchanged: Callable[[], bool] | None = None,
                     if_sha256: str | None = None) -> TransferResult:
        """Upload ``size`` bytes read with ``read_at(offset, length)``, whose sha256 is
        ``digest``; or, with ``digest`` None, named by ``key`` and hashed as the chunks are
        read (``hash_all`` hashes everything when the remote holds part of it already, and
        ``unchanged`` says before the commit whether the source still is what was read).
        ``if_sha256``: replace the remote file only if it still has that content ("": only
        if there is none), checked by the remote right before the rename."""
        where = f"upload {local_label} -> {remote_path}"
        started = time.perf_counter()
        if digest is None and (key is None or hash_all is None):
            raise ValueError("an upload without its sha256 needs a key and hash_all")
        args: dict[str, Any] = {"path": remote_path, "size": size, "chunk_size": chunk_size,
                                "make_dirs": True}
        if mode is not None:
            args["mode"] = mode
        if mtime_ns is not None:
            args["mtime_ns"] = mtime_ns
        tracker = Progress(progress, size)
        resumed: int | None = None
        sent = 0
        attempt = 0
        target: str | None = None
        while True:
            attempt += 1
            try:
                if digest is None and attempt > 1:
                    # Some chunks arrived before the failure: hash what will not be read again.
                    assert hash_all is not None
                    digest = str(await anyio.to_thread.run_sync(hash_all))
                args.update({"sha256": digest} if digest is not None else {"key": key})
                begun = (await self._caller.call(Op.UPLOAD_BEGIN, args)).result
                target = str(begun["path"])
                where = f"upload {local_label} -> {target}"
                # The remote's own record of what it holds: untrusted, so cleaned first.
                missing = missing_ranges(clean_ranges(begun.get("received") or [], size), size)
                if resumed is None:
                    resumed = int(begun.get("received_bytes", 0))
                if digest is None and missing != [[0, size]]:
                    assert hash_all is not None  # a part from an earlier try: resumed
                    digest = str(await anyio.to_thread.run_sync(hash_all))
                hasher = hashlib.sha256() if digest is None else None
                tracker.set(size - sum(e - s for s, e in missing))
                sent += await self._send_chunks(str(begun["transfer_id"]), read_at, missing,
                                                chunk_size, window, tracker, hasher)
                if hasher is not None:
                    if unchanged is not None and not await anyio.to_thread.run_sync(unchanged):
                        raise TransferError(f"{where}: {local_label} changed while it was "
                                            "being uploaded; upload it again")
                    digest = hasher.hexdigest()
                assert digest is not None
                committed = await self._commit(str(begun["transfer_id"]), target, size, digest,
                                               if_sha256)
                break
            except RemoteError as exc:
                if exc.code == wire.ErrorCode.BUSY and attempt < MAX_ATTEMPTS * 20:
                    # A commit whose reply was lost is still running: wait for its outcome
                    # rather than begin (and send) the whole file again.
                    await anyio.sleep(0.5)
                    if target is not None and digest is not None \
                            and await self.remote_has(target, size, digest):
                        committed = {"path": target}
                        break
                    continue
                if (exc.details.get("reason") == "incomplete" or resumable(exc)) \
                        and attempt < MAX_ATTEMPTS:
                    # Chunks lost, or a new supervisor (kernel restart) that knows the
                    # upload only from its sidecar: begin again and send what is missing.
                    log.info("%s: %s; resuming", where, exc)
                    continue
                raise with_context(exc, where) from None
            except (ConnectionLost, TetherTimeout) as exc:
                # ConnectionLost means the link stayed down for its whole reconnect wait:
                # try again only if it is back by now.
                if attempt < MAX_ATTEMPTS and (isinstance(exc, TetherTimeout)
                                               or self._caller.connected):
                    log.info("%s: %s; resuming", where, exc)
                    continue
                raise TransferError(f"{where}: {exc} (the remote keeps what arrived: upload "
                                    "again to resume)") from exc
        assert digest is not None
        return TransferResult(path=str(committed["path"]), local_path=local_label, bytes=size,
                              seconds=time.perf_counter() - started, sha256=digest,
                              resumed_bytes=resumed or 0, sent_bytes=sent, direction="upload")

    async def _send_chunks(self, transfer_id: str, read_at: Callable[[int, int], bytes],
                           ranges: Sequence[Sequence[int]], chunk_size: int, window: int,
                           tracker: Progress, hasher: Any = None) -> int:
        """Send ``ranges`` with ``window`` chunks in flight; returns the bytes acknowledged.

        Chunks are read here, one after the other in offset order (a sequential disk read),
        and fed to ``hasher`` (if any) on the reading thread; only the sends overlap; the
        first error wins.
        """
        def read_and_hash(offset: int, length: int) -> bytes:
            data = read_at(offset, length)
            hasher.update(data)
            return data

        read = read_at if hasher is None else read_and_hash
        caller = self._caller
        acked = 0

        async def send(offset: int, data: bytes) -> None:
            nonlocal acked
            await caller.call(Op.UPLOAD_CHUNK, {"transfer_id": transfer_id, "offset": offset},
                              buffers=[data], timeout=CHUNK_TIMEOUT_S)
            acked += len(data)
            tracker.add(len(data))

        async with limited_tasks(window) as tasks:
            for offset, length in chunks(ranges, chunk_size):
                if not await tasks.slot():
                    break
                data = await anyio.to_thread.run_sync(read, offset, length)
                if len(data) != length:
                    raise TransferError(f"the local file shrank while uploading (short read "
                                        f"at offset {offset})")
                tasks.start(send, offset, data)
        return acked

    async def _commit(self, transfer_id: str, target: str, size: int, digest: str,
                      if_sha256: str | None = None) -> dict[str, Any]:
        # Generous: a resumed upload is re-hashed from disk on the remote before the rename.
        timeout = 120.0 + size / 20e6
        args: dict[str, Any] = {"transfer_id": transfer_id, "sha256": digest}
        if if_sha256 is not None:
            args["if_sha256"] = if_sha256
        try:
            reply = await self._caller.call(Op.UPLOAD_COMMIT, args, timeout=timeout)
            result: dict[str, Any] = reply.result
            return result
        except (ConnectionLost, TetherTimeout, NotFound) as exc:
            # The commit may have run and only its reply got lost (a re-sent commit then finds
            # the transfer gone): the remote file itself says whether it did.
            if isinstance(exc, NotFound) and "transfer_id" not in exc.details:
                raise
            if await self.remote_has(target, size, digest):
                return {"path": target, "size": size, "sha256": digest}
            raise

    async def remote_has(self, path: str, size: int, digest: str) -> bool:
        """Whether the remote file at ``path`` has this size and sha256 (False when unsure)."""
        try:
            begun = (await self._caller.call(Op.DOWNLOAD_BEGIN, {"path": path, "hash": True},
                                             timeout=120.0 + size / 50e6)).result
        except (RemoteError, ConnectionLost, TetherTimeout):
            return False
        with contextlib.suppress(RemoteError, ConnectionLost, TetherTimeout):
            await self._caller.call(Op.DOWNLOAD_END, {"transfer_id": begun["transfer_id"]},
                                    timeout=10)
        return bool(begun.get("size") == size and begun.get("sha256") == digest)
