"""What of one file's content has arrived: a pure object, no I/O.

A resumable transfer writes chunks, in any order, into a pre-sized part file beside its
target (see paths) and records the byte ranges on disk in a JSON sidecar, so a new process
can resume it. ``TransferState`` is that record: the expected size and sha256, the merged
ranges received, and a running sha256 kept while bytes arrive in order (so the final check
need not re-read the file). Reading and writing the part file and sidecar are the caller's.

Ranges are ``[start, end)`` pairs as lists (they travel in JSON), kept sorted and merged.
"""

import hashlib
from typing import Any, Dict, Iterable, List, Optional, Tuple

SIDECAR_VERSION = 1

Ranges = List[List[int]]


def merge_range(ranges: Ranges, start: int, end: int) -> Ranges:
    """``ranges`` with ``[start, end)`` added, sorted, overlapping and touching ones merged."""
    merged: Ranges = []
    for s, e in sorted([*ranges, [start, end]]):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def missing_ranges(ranges: Ranges, size: int) -> Ranges:
    """The gaps of sorted ``ranges`` within ``[0, size)``."""
    missing: Ranges = []
    cursor = 0
    for s, e in ranges:
        if s > cursor:
            missing.append([cursor, s])
        cursor = max(cursor, e)
    if cursor < size:
        missing.append([cursor, size])
    return missing


def clean_ranges(rows: Iterable[Any], size: int) -> Ranges:
    """Merged ranges from untrusted rows (a sidecar's): anything not a range in ``[0, size)``
    is dropped."""
    received: Ranges = []
    for row in rows:
        if (isinstance(row, list) and len(row) == 2
                and all(isinstance(v, int) for v in row) and 0 <= row[0] < row[1] <= size):
            received = merge_range(received, row[0], row[1])
    return received


def parse_sidecar(data: Any, part_size: int) -> Optional[Dict[str, Any]]:
    """A decoded sidecar if it is one of ours and describes a part file of ``part_size``
    bytes; None for anything else (damaged, another version, another file's)."""
    if not isinstance(data, dict) or data.get("version") != SIDECAR_VERSION:
        return None
    if data.get("size") != part_size or not isinstance(data.get("received"), list):
        return None
    return data


class TransferState:
    """Size, sha256 and received ranges of one transfer, plus its in-order running hash."""

    def __init__(self, size: int, sha256: str, key: str = ""):
        self.size = size
        # "" until the client says it (an upload that hashes while it sends names its content
        # by ``key`` at first, and gives the sha256 at commit)
        self.sha256 = sha256
        self.key = key
        self.received: Ranges = []
        # Hashes the prefix [0, hashed_upto) as it arrives; None once bytes came out of order
        # in a way it cannot follow (a rewrite of hashed bytes, or a resume).
        self.hasher: Any = hashlib.sha256()
        self.hashed_upto = 0

    @classmethod
    def resume(cls, size: int, sha256: str, rows: Iterable[Any],
               key: str = "") -> "TransferState":
        """The state recorded by an earlier process: its bytes must be hashed from the file."""
        state = cls(size, sha256, key)
        state.received = clean_ranges(rows, size)
        state.forget_hash()
        return state

    def same_content(self, size: int, sha256: str, key: str) -> bool:
        """Whether a client's (size, sha256, key) names this transfer's content: by sha256
        where both sides know it, else by a non-empty key."""
        if size != self.size:
            return False
        if sha256 and self.sha256:
            return sha256 == self.sha256
        return bool(key) and key == self.key

    @property
    def received_bytes(self) -> int:
        return sum(e - s for s, e in self.received)

    def missing(self) -> Ranges:
        return missing_ranges(self.received, self.size)

    @property
    def complete(self) -> bool:
        return not self.missing()

    def add(self, offset: int, data: bytes) -> None:
        """Record ``data`` as written at ``offset`` (after it is on disk)."""
        end = offset + len(data)
        self.received = merge_range(self.received, offset, end)
        if self.hasher is not None:
            if offset == self.hashed_upto:
                self.hasher.update(data)
                self.hashed_upto = end
            elif offset < self.hashed_upto:
                self.hasher = None  # hashed bytes were rewritten: re-read them
            # Beyond hashed_upto: a gap, read back from the file at the end.

    def forget_hash(self) -> None:
        """Keep no running hash: the sha256, if wanted, is read back from the file."""
        self.hasher = None

    def hash_resume(self) -> Tuple[Any, int]:
        """The hasher and the file offset from which to feed it the rest of the file."""
        if self.hasher is not None:
            return self.hasher, self.hashed_upto
        return hashlib.sha256(), 0

    def sidecar(self, extra: Dict[str, Any]) -> Dict[str, Any]:
        """The sidecar record: ``extra`` (who and where) plus version, size, sha256, ranges."""
        data: Dict[str, Any] = {"version": SIDECAR_VERSION}
        data.update(extra)
        data.update(size=self.size, sha256=self.sha256, key=self.key, received=self.received)
        return data
