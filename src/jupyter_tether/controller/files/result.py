"""``TransferResult``: what one upload or download did."""

from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass
from typing import Any


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
    #: how the bytes that arrived were checked: "sha256" (hashed here), or "crc32" (each
    #: piece's CRC32 against the remote's, read with the sha256 the remote reports)
    verified: str = "sha256"

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
