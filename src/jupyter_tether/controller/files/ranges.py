"""Cutting byte ranges ``[start, end)`` into chunks, pure.

Merging ranges and finding the gaps is ``agent_payload/transfer_state.py``, the same code
on both sides of a transfer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence


def chunks(ranges: Iterable[Sequence[int]], chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` pieces of at most ``chunk_size`` bytes covering ``ranges``."""
    for start, end in ranges:
        for offset in range(start, end, chunk_size):
            yield offset, min(chunk_size, end - offset)
