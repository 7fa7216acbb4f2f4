"""``AsyncFiles`` (``tether.files``): the one face of the file services, delegating to the rest.

Small-file ops (list, stat, read, write, remove, mkdir) are single requests and live here;
transfers are in ``upload``/``download``, tree operations in ``sync``/``download_dir``.
"""

from __future__ import annotations

import builtins
import codecs
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from ...agent_payload.fs_ops import FS_READ_MAX_BYTES
from ...agent_payload.hashing import HashCache
from ...agent_payload.wire import Op
from ..caller import Caller
from ..rpc import check_listing
from ..state import state_dir
from .download import Downloader
from .download_dir import DirDownload
from .progress import ProgressCallback
from .remote import fetch_manifest
from .result import TransferResult
from .sync import TreeSync
from .tuning import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_SYNC_MAX_BYTES,
    DEFAULT_WINDOW,
    INLINE_WRITE_BYTES,
    check_tuning,
)
from .upload import Uploader

log = logging.getLogger(__name__)
_List = builtins.list  # ``list`` is a method name below


class AsyncFiles:
    """``tether.files``: transfers, small-file ops and directory sync on the remote."""

    def __init__(self, caller: Caller) -> None:
        self._caller = caller
        # sha256 of local files by (size, mtime, ctime, inode); persisted per synced tree.
        self._hashes = HashCache(str(state_dir() / "hash-cache"))
        self._uploader = Uploader(caller, self._hashes)
        self._downloader = Downloader(caller)

    async def _manifest(self, path: str, excludes: Sequence[str], *,
                        hash_files: bool) -> dict[str, Any]:
        return await fetch_manifest(self._caller, path, excludes, hash_files=hash_files)

    # --- small files ----------------------------------------------------------------------

    async def list(self, path: str = "", *, max_entries: int = 10000) -> _List[dict[str, Any]]:
        """Entries of a remote directory: name, path, type, size, mtime (and link target)."""
        reply = await self._caller.call(Op.FS_LIST, {"path": path, "max_entries": max_entries})
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
        reply = await self._caller.call(Op.FS_STAT, {"path": path})
        result: dict[str, Any] = reply.result
        return result

    async def _read(self, path: str, offset: int, max_bytes: int) -> tuple[bytes, bool, str]:
        parts: _List[bytes] = []
        got = 0
        eof = False
        resolved = path
        while got < max_bytes:
            want = min(max_bytes - got, FS_READ_MAX_BYTES)
            reply = await self._caller.call(Op.FS_READ, {"path": path, "offset": offset + got,
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

    async def write_bytes(self, path: str, data: bytes, *, mode: int | None = None,
                          if_sha256: str | None = None) -> dict[str, Any]:
        """Create or replace a remote file atomically; returns path, size, sha256.

        ``if_sha256``: only if the remote file still has that content ("": only if there is
        none), checked right before the rename; else ``Conflict`` (details: ``reason``
        "changed", the file's ``sha256`` now) and nothing is written."""
        if len(data) <= INLINE_WRITE_BYTES:
            args: dict[str, Any] = {"path": path}
            if mode is not None:
                args["mode"] = mode
            if if_sha256 is not None:
                args["if_sha256"] = if_sha256
            reply = await self._caller.call(Op.FS_WRITE, args, buffers=[bytes(data)])
            result: dict[str, Any] = reply.result
            return result
        # Too big for one message: the chunked upload, straight from memory.
        digest = await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
        view = memoryview(data)
        done = await self._uploader.upload(
            lambda offset, length: bytes(view[offset:offset + length]), len(data), digest,
            path, "<memory>", progress=None, chunk_size=DEFAULT_CHUNK_BYTES,
            window=DEFAULT_WINDOW, mode=mode, mtime_ns=None, if_sha256=if_sha256)
        return {"path": done.path, "size": done.bytes, "sha256": done.sha256}

    async def write_text(self, path: str, content: str, *, encoding: str = "utf-8") -> dict[str, Any]:
        """Create or replace a remote text file atomically; returns path, size, sha256."""
        return await self.write_bytes(path, content.encode(encoding))

    async def remove(self, path: str, recursive: bool = False, *,
                     missing_ok: bool = False) -> dict[str, Any]:
        """Remove a remote file, link or (empty, or with ``recursive``) directory."""
        reply = await self._caller.call(Op.FS_REMOVE, {"path": path, "recursive": recursive,
                                                       "missing_ok": missing_ok})
        result: dict[str, Any] = reply.result
        return result

    async def mkdir(self, path: str, *, parents: bool = True) -> dict[str, Any]:
        """Create a remote directory (and its parents, with ``parents``); fine if it exists."""
        reply = await self._caller.call(Op.FS_MKDIR, {"path": path, "parents": parents})
        result: dict[str, Any] = reply.result
        return result

    # --- transfers ------------------------------------------------------------------------

    async def upload(self, local_path: str | os.PathLike[str], remote_path: str, *,
                     progress: ProgressCallback | None = None,
                     chunk_size: int = DEFAULT_CHUNK_BYTES,
                     window: int = DEFAULT_WINDOW) -> TransferResult:
        """Upload one local file, resumably; the remote file appears whole or not at all.

        An interrupted upload (cancelled, or the link down for longer than its reconnect
        wait) leaves ``<remote>.tether-part`` and its sidecar on the remote; uploading the
        same content to the same path again sends only what had not arrived.
        """
        check_tuning(chunk_size, window)
        local = os.path.abspath(os.path.expanduser(os.fspath(local_path)))
        return await self._uploader.upload_path(local, remote_path, progress=progress,
                                                chunk_size=chunk_size, window=window,
                                                mode=None, keep_mtime=False)

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
        check_tuning(chunk_size, window)
        if via not in ("auto", "comm"):
            raise ValueError("via must be 'auto' or 'comm'")
        local = Path(os.path.abspath(os.path.expanduser(os.fspath(local_path))))
        return await self._download(remote_path, local, progress=progress,
                                    chunk_size=chunk_size, window=window, via=via)

    async def _download(self, remote_path: str, local: Path, *,
                        progress: ProgressCallback | None, chunk_size: int, window: int,
                        keep_mtime: bool = False, via: str = "auto") -> TransferResult:
        """``download`` to ``local``, an absolute path taken as it is (no ``~``)."""
        return await self._downloader.download(remote_path, local, progress=progress,
                                               chunk_size=chunk_size, window=window,
                                               keep_mtime=keep_mtime, via=via)

    # --- trees ----------------------------------------------------------------------------

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
        runner = TreeSync(self._caller, self._hashes, self._uploader, self._manifest)
        return await runner.run(local_dir, remote_dir, exclude=exclude, delete=delete,
                                max_bytes=max_bytes, progress=progress, gitignore=gitignore,
                                dry_run=dry_run, allow_root_delete=allow_root_delete)

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
        # Built per call, so the run asks ``self._manifest`` as it is now (tests replace it).
        runner = DirDownload(self._caller, self._downloader, self._manifest)
        return await runner.run(remote_dir, root, progress=progress, exclude=exclude)
