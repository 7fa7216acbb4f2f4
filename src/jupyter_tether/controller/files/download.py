"""Downloads: one remote file to a local file, resumably, over ranged HTTP GETs or the comm.

``download_begin`` gives the size and sha256, then the bytes come either with ranged
``GET /files/<path>`` (when the server will serve the file: cheaper to relay than kernel
websocket traffic; read off the event loop by ``fast_get`` where the URL is plain http) or as
comm chunks requested with a credit window of ``window`` requests in flight. Either way they
are written into a ``DownloadPart`` beside the target and the sha256 is verified before the
rename. A fresh download of a big file the remote has not hashed yet does not wait for that
hash: the remote computes it while the bytes travel and ``download_hash`` fetches it at the
end. A fresh download over ``GET /files`` is checked piece by piece (CRC32, against what the
remote computed with its sha256) rather than hashed here: hashing cost as much CPU as the
whole GET, and a loaded machine then took twice as long. A download that fails for a resumable reason (the
link dropped, it timed out or was cancelled) leaves that partial behind on purpose: the next
download of the same remote content fetches only what is missing. Any other failure leaves
nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import anyio
import httpx2

from ...agent_payload import wire
from ...agent_payload.paths import PART_SUFFIX, SIDECAR_SUFFIX, is_inside, side_name
from ...agent_payload.wire import Op
from ...errors import ConnectionLost, RemoteError, TetherTimeout, TransferError
from ..caller import Caller
from .fast_get import PIECE_BYTES, FilesGet, NotSimple, ReceiveError, fetch_ranges
from .part import DownloadPart
from .progress import Progress, ProgressCallback
from .ranges import chunks
from .remote import resumable, with_context
from .result import TransferResult
from .tuning import CHUNK_TIMEOUT_S, MANIFEST_TIMEOUT_S, MAX_ATTEMPTS

log = logging.getLogger(__name__)


#: how often bytes fetched over ``GET /files`` go into the progress tracker
REPORT_EVERY_S = 0.1


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


class Downloader:
    """Fetches remote files into local paths over a ``Caller``."""

    def __init__(self, caller: Caller) -> None:
        self._caller = caller

    async def download(self, remote_path: str, local: Path, *,
                       progress: ProgressCallback | None, chunk_size: int, window: int,
                       keep_mtime: bool = False, via: str = "auto") -> TransferResult:
        """Download ``remote_path`` to ``local``, an absolute path taken as it is (no ``~``)."""
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
            part: DownloadPart | None = None
            transfer_id: str | None = None
            keep_partial = False
            try:
                # With no partial to match, the remote may hash while the bytes travel, and
                # bytes over /files are checked by piece.
                fresh = not local.with_name(side_name(local.name, SIDECAR_SUFFIX)).exists()
                args: dict[str, Any] = {"path": remote_path, "hash": True, "defer_hash": fresh}
                if fresh and via == "auto" and self._likely_http(remote_path):
                    args["checks"] = PIECE_BYTES
                begun = (await self._caller.call(Op.DOWNLOAD_BEGIN, args,
                                                 timeout=MANIFEST_TIMEOUT_S)).result
                transfer_id = str(begun["transfer_id"])
                target = str(begun["path"])
                where = f"download {target} -> {local}"
                size, digest = int(begun["size"]), str(begun.get("sha256") or "")
                mtime_ns = begun.get("mtime_ns")
                part = DownloadPart(local, target, size, digest,
                                    mtime_ns if isinstance(mtime_ns, int) else None)
                try:
                    already = await anyio.to_thread.run_sync(part.open)
                except OSError as exc:
                    raise TransferError(f"{where}: cannot write {part.part}: "
                                        f"{exc.strerror or exc}") from None
                if resumed is None:
                    resumed = already
                if "crc32" in begun and not already:
                    part.check_pieces(PIECE_BYTES)
                tracker = Progress(progress, size, part.received_bytes)
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
                actual, digest = await self._verify(part, begun, transfer_id, where)
                part.sha256 = digest
                if actual != digest and part.unverified and attempt < MAX_ATTEMPTS:
                    log.info("%s: the partial matched by mtime only was not this content; "
                             "starting over", where)
                    resumed, fetched = None, 0  # what was kept is thrown away: count anew
                    continue  # keep_partial is False: the finally removes it
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
                                               or self._caller.connected):
                    log.info("%s: %s; resuming", where, exc)
                    continue
                partial = local.with_name(side_name(local.name, PART_SUFFIX))
                raise TransferError(f"{where}: {exc} (the partial {partial} is kept: "
                                    "download again to resume)") from exc
            except RemoteError as exc:
                if resumable(exc) and attempt < MAX_ATTEMPTS:
                    log.info("%s: %s; resuming", where, exc)
                    continue
                if exc.code == wire.ErrorCode.CONFLICT and attempt < MAX_ATTEMPTS:
                    keep_partial = False  # the file changed since begin: start over
                    continue
                keep_partial = False
                raise with_context(exc, where) from None
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
                        # Only frees the remote's descriptor: nobody needs to wait for it.
                        try:
                            self._caller.start_soon(self._end, transfer_id)
                        except (ConnectionLost, RuntimeError):
                            await self._end(transfer_id)
        assert part is not None
        return TransferResult(path=part.remote_path, local_path=str(local), bytes=part.size,
                              seconds=time.perf_counter() - started, sha256=part.sha256,
                              resumed_bytes=resumed or 0, sent_bytes=fetched,
                              direction="download", via=used,
                              verified="crc32" if part.checks is not None else "sha256")

    async def _verify(self, part: DownloadPart, begun: dict[str, Any], transfer_id: str,
                      where: str) -> tuple[str, str]:
        """``(what arrived, what the remote has)`` as sha256s; raises TransferError if the
        pieces' CRC32s differ from the remote's."""
        digest = str(begun.get("sha256") or "")
        remote = begun.get("crc32")
        checks = part.checks
        checking = checks is not None and checks.complete()
        if not digest or (checking and remote is None):
            hashed = (await self._caller.call(Op.DOWNLOAD_HASH, {"transfer_id": transfer_id},
                                              timeout=MANIFEST_TIMEOUT_S)).result
            digest = str(hashed["sha256"])
            remote = hashed.get("crc32", remote)
        if checks is not None and checking and isinstance(remote, list):
            # A value that is not a number (a broken remote) matches no piece.
            bad = checks.mismatches([crc if isinstance(crc, int) else -1 for crc in remote])
            if bad:
                raise TransferError(
                    f"{where}: {len(bad)} piece(s) differ from the remote file (the first at "
                    f"byte {bad[0] * checks.piece_bytes}): it changed while it was being "
                    "downloaded; download it again")
            return digest, digest
        part.checks = None  # not checked by piece after all: hash what is on disk
        return await anyio.to_thread.run_sync(part.digest), digest

    def _likely_http(self, remote_path: str) -> bool:
        """Whether ``remote_path`` will probably come over ``GET /files`` (a guess before
        the remote resolves it: it only decides whether to ask for piece checks)."""
        root = self._caller.files_root  # the supervisor's root: relative paths start there
        return bool(root) and self._files_url_path(
            os.path.normpath(os.path.join(root or "", remote_path))) is not None

    async def _end(self, transfer_id: str) -> None:
        with anyio.move_on_after(5), contextlib.suppress(RemoteError, ConnectionLost,
                                                         TetherTimeout):
            await self._caller.call(Op.DOWNLOAD_END, {"transfer_id": transfer_id}, timeout=5)

    def _files_url_path(self, resolved: str) -> str | None:
        """``files/<rel>`` for a path the server's /files handler will serve, else None."""
        root = self._caller.files_root
        if not root or not is_inside(resolved, root) or resolved == root:
            return None
        rel = os.path.relpath(resolved, root).replace(os.sep, "/")
        if any(part.startswith(".") for part in rel.split("/")):
            return None  # a stock server refuses hidden paths
        return "files/" + urllib.parse.quote(rel)

    async def _fetch_http(self, url_path: str, part: DownloadPart, tracker: Progress) -> int:
        """Fill what ``part`` misses with ranged GETs; raise _NoHttp if the server will not."""
        url, headers = self._caller.files_request(url_path)
        try:
            return await self._fetch_direct(url_path, FilesGet(url, headers, part.size),
                                            part, tracker)
        except NotSimple as exc:
            log.debug("GET %s: %s; streaming it with httpx2", url_path, exc)
        return await self._fetch_httpx(url_path, part, tracker)

    async def _fetch_direct(self, url_path: str, get: FilesGet, part: DownloadPart,
                            tracker: Progress) -> int:
        """What ``part`` misses through ``fast_get`` on a worker thread; returns the bytes
        written. A NotSimple answer ends it; what came before it stays in ``part``.

        The thread never waits for the event loop: it adds what it wrote to a counter that
        is moved into ``tracker`` every ``REPORT_EVERY_S``, and it stops within a move of
        ``get.abort()`` (a progress callback that cancels, or a dropped link).
        """
        done = anyio.Event()
        failure: list[BaseException] = []
        dropped = False
        fetched = 0
        lock = threading.Lock()
        pending = 0

        def report(count: int) -> bool:  # worker thread
            nonlocal pending
            with lock:
                pending += count
            return not get.aborted

        def take() -> None:
            nonlocal fetched, pending
            with lock:
                count, pending = pending, 0
            if count:
                fetched += count
                tracker.add(count)

        async def work() -> None:
            try:
                await anyio.to_thread.run_sync(fetch_ranges, get, part, part.missing(), report)
            except Exception as exc:
                failure.append(exc)
            finally:
                done.set()

        async def watch_link() -> None:
            # As for httpx2: the comm link's keepalive notices a dead path within seconds.
            nonlocal dropped
            while self._caller.connected:
                await anyio.sleep(0.2)
            dropped = True
            get.abort()

        async with anyio.create_task_group() as group:
            group.start_soon(work)
            group.start_soon(watch_link)
            try:
                while not done.is_set():
                    with anyio.move_on_after(REPORT_EVERY_S):
                        await done.wait()
                    take()
            finally:
                get.abort()  # unblocks the thread if we are cancelled; harmless once done
            group.cancel_scope.cancel()  # the watcher; ``work`` has finished
        if failure:
            if isinstance(failure[0], ReceiveError):
                # What arrived is kept; the comm path (which waits for the link) does the rest.
                raise _NoHttp(f"GET {url_path}: {failure[0]}")
            raise failure[0]
        if dropped and part.missing():
            raise _NoHttp("the connection dropped")
        return fetched

    async def _fetch_httpx(self, url_path: str, part: DownloadPart, tracker: Progress) -> int:
        """``_fetch_http`` over httpx2 (TLS, proxies, redirects): on the event loop."""
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
            while self._caller.connected:
                await anyio.sleep(0.2)
            raise _NoHttp("the connection dropped")

        async def reader() -> None:
            async with send:
                for start, end in part.missing():
                    headers = {"Range": f"bytes={start}-{end - 1}"}
                    try:
                        async with self._caller.stream_get(url_path, headers) as response:
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

    async def _fetch_chunks(self, transfer_id: str, part: DownloadPart, chunk_size: int,
                            window: int, tracker: Progress) -> int:
        """Fetch what ``part`` misses with ``window`` requests in flight; written in order.

        One writer takes the chunks in offset order (so a fresh download hashes as it
        goes) and only then returns their credit: requests in flight plus chunks waiting to
        be written never exceed ``window``.
        """
        caller = self._caller
        credit = anyio.Semaphore(window)
        failures: list[BaseException] = []
        written = 0
        send_slot, receive_slot = anyio.create_memory_object_stream[_Slot](window)

        async def fetch(slot: _Slot) -> None:
            try:
                reply = await caller.call(Op.DOWNLOAD_CHUNK, {"transfer_id": transfer_id,
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
                for offset, length in chunks(part.missing(), chunk_size):
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
