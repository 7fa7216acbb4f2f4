"""A download's partial file: ``<target>.tether-part`` and its JSON sidecar.

Chunks are written with positional writes into the pre-sized part file beside the target;
the sidecar names the remote path, size and sha256 and the byte ranges on disk, so a later
download of the same remote content resumes with what is missing. The sha256 is verified
before ``finish`` renames the part over the target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ...agent_payload.files import PART_SUFFIX, SIDECAR_SUFFIX, side_name
from ...errors import TransferError
from .local import O_BINARY, LocalFile
from .ranges import merge_range, missing_ranges

DOWNLOAD_SIDECAR_VERSION = 1
_SIDECAR_SAVE_INTERVAL_S = 0.5


class DownloadPart:
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
        self.file: LocalFile | None = None
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
            fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_BINARY
                         | getattr(os, "O_NOFOLLOW", 0), 0o666)
            self.file = LocalFile(fd)
            os.ftruncate(fd, self.size)  # sparse until written
            self.received = []
            self.hasher = hashlib.sha256()
            return 0
        self.file = LocalFile(os.open(self.part, os.O_RDWR | O_BINARY))
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
                ranges = merge_range(ranges, row[0], row[1])
        return ranges

    def missing(self) -> list[tuple[int, int]]:
        return missing_ranges(self.received, self.size)

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
        self.received = merge_range(self.received, offset, offset + len(data))
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
