"""A download's partial file: ``<target>.tether-part`` and its JSON sidecar.

Chunks are written with positional writes into the pre-sized part file beside the target;
the sidecar names the remote path, size and sha256 and the byte ranges on disk, so a later
download of the same remote content resumes with what is missing. The sha256 is verified
before ``finish`` renames the part over the target.

A download that starts before the remote has its sha256 (it hashes while the bytes travel)
has ``sha256`` "" until the end: its sidecar names the remote mtime instead, and a partial
resumed on that weaker match is ``unverified`` (a mismatch at the end means start over).

A fresh download over ``GET /files`` is checked with ``PieceChecks`` instead of a local
sha256: the CRC32 of each piece against the remote's, computed in the read that gave (or
gives, cached by inode, size and times) the file's sha256.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import cast

from ...agent_payload.fsutil import O_BINARY
from ...agent_payload.paths import PART_SUFFIX, SIDECAR_SUFFIX, side_name
from ...agent_payload.transfer_state import TransferState, parse_sidecar
from ...errors import TransferError
from .local import LocalFile

_SIDECAR_SAVE_INTERVAL_S = 0.5


def _any_buffer(data: bytes | memoryview) -> bytes:
    # pwrite and sha256 take any buffer: views of a reused buffer spare a copy.
    return cast(bytes, data)


class PieceChecks:
    """The CRC32 of each ``piece_bytes`` piece of what arrived (bytes in order within a
    piece; anything else makes it ``broken``), to compare with the remote's."""

    def __init__(self, size: int, piece_bytes: int) -> None:
        self.size = size
        self.piece_bytes = piece_bytes
        count = -(-size // piece_bytes)
        self._crcs = [0] * count
        self._filled = [0] * count
        self.broken = False

    def add(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while len(view) and not self.broken:
            piece, within = divmod(offset, self.piece_bytes)
            if within != self._filled[piece]:
                self.broken = True  # a gap or a rewrite: the caller hashes the file instead
                return
            take = min(len(view), self.piece_bytes - within)
            self._crcs[piece] = zlib.crc32(view[:take], self._crcs[piece])
            self._filled[piece] += take
            offset += take
            view = view[take:]

    def complete(self) -> bool:
        last = self.size - (len(self._crcs) - 1) * self.piece_bytes
        return not self.broken and all(
            filled == (self.piece_bytes if index < len(self._filled) - 1 else last)
            for index, filled in enumerate(self._filled))

    def mismatches(self, remote: list[int]) -> list[int]:
        """Indexes of the pieces whose CRC32 differs from ``remote``'s (all of them if it
        has another number of pieces)."""
        if len(remote) != len(self._crcs):
            return list(range(len(self._crcs)))
        return [index for index, (mine, theirs) in enumerate(zip(self._crcs, remote, strict=True))
                if mine != theirs]


class DownloadPart:
    """``<target>.tether-part`` and its sidecar: what of which remote content is on disk.

    What has arrived is a ``TransferState``, the object a remote upload keeps too.
    """

    def __init__(self, target: Path, remote_path: str, size: int, sha256: str,
                 mtime_ns: int | None = None) -> None:
        self.target = target
        # Shortened by bytes where ``target`` has a long name (a 255-byte name is valid).
        self.part = target.with_name(side_name(target.name, PART_SUFFIX))
        self.sidecar = target.with_name(side_name(target.name, SIDECAR_SUFFIX))
        self.remote_path = remote_path
        self.size = size
        self.sha256 = sha256
        self.mtime_ns = mtime_ns
        #: resumed from a partial matched by size and mtime only (its sha256 was not known)
        self.unverified = False
        #: set (by the downloader, before any byte) to check pieces instead of a sha256
        self.checks: PieceChecks | None = None
        # Chunks are written in order, so a fresh download hashes as it goes; resumed bytes
        # from an earlier attempt are hashed from disk at the end instead.
        self.state = TransferState(size, sha256)
        self.file: LocalFile | None = None
        self._saved_at = 0.0

    @property
    def received_bytes(self) -> int:
        return self.state.received_bytes

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
            fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_BINARY
                         | getattr(os, "O_NOFOLLOW", 0), 0o666)
            self.file = LocalFile(fd)
            os.ftruncate(fd, self.size)  # sparse until written
            self.state = TransferState(self.size, self.sha256)
            return 0
        self.file = LocalFile(os.open(self.part, os.O_RDWR | O_BINARY))
        self.state = resumed
        return self.received_bytes

    def _load(self) -> TransferState | None:
        try:
            data = json.loads(self.sidecar.read_text(encoding="utf-8"))
            part_size = self.part.stat().st_size
        except (OSError, ValueError):
            return None
        record = parse_sidecar(data, part_size)
        # A partial of other content (the remote file changed since) is started afresh.
        if record is None or record.get("size") != self.size:
            return None
        if not record.get("sha256"):
            # Saved before the remote's hash was known: the same size and mtime will do,
            # and the sha256 at the end decides.
            if self.mtime_ns is None or record.get("remote_mtime_ns") != self.mtime_ns:
                return None
            self.unverified = True
        elif record.get("sha256") != self.sha256:
            return None
        return TransferState.resume(self.size, self.sha256, record["received"])

    def missing(self) -> list[list[int]]:
        return self.state.missing()

    def write(self, offset: int, data: bytes) -> None:
        """Write a chunk (worker thread; chunks arrive here in offset order)."""
        self.write_raw(offset, data)
        self.record(offset, data)

    def write_raw(self, offset: int, data: bytes | memoryview) -> None:
        """Put bytes on disk without recording them (``record`` follows, maybe elsewhere)."""
        assert self.file is not None
        self.file.write_at(offset, _any_buffer(data))

    def record(self, offset: int, data: bytes | memoryview) -> None:
        """Count bytes ``write_raw`` put on disk: hashed if in order, saved now and then.

        One thread at a time, in offset order for the running hash to follow.
        """
        self.state.add(offset, _any_buffer(data))
        if self.checks is not None:
            self.checks.add(offset, data)
        now = time.monotonic()
        if now - self._saved_at >= _SIDECAR_SAVE_INTERVAL_S:
            self.save()

    def save(self) -> None:
        # Written after the data it describes: a sidecar never claims bytes not on disk.
        self._saved_at = time.monotonic()
        data = self.state.sidecar({"remote_path": self.remote_path,
                                   "remote_mtime_ns": self.mtime_ns})
        with contextlib.suppress(OSError):
            self.sidecar.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")

    def check_pieces(self, piece_bytes: int) -> None:
        """Check CRC32s of pieces instead of keeping a running sha256 (a fresh part only)."""
        self.checks = PieceChecks(self.size, piece_bytes)
        self.state.forget_hash()

    def digest(self) -> str:
        """The sha256 of the part: the running hash, fed what it has not seen from disk."""
        assert self.file is not None
        hasher, start = self.state.hash_resume()
        return str(self.file.hash_from(start, hasher).hexdigest())

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
