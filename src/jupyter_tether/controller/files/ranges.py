"""Byte ranges ``[start, end)`` of a transfer, pure: merging, the gaps, and cutting into chunks.

The supervisor keeps the same arithmetic for its side in ``agent_payload/transfer_state.py``;
here the received ranges may come from the remote, so ``missing_ranges`` sorts them first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence


def missing_ranges(received: Sequence[Sequence[int]], size: int) -> list[tuple[int, int]]:
    """The gaps of ``received`` (in any order, overlapping or not) within ``[0, size)``."""
    missing: list[tuple[int, int]] = []
    cursor = 0
    for start, end in sorted((int(s), int(e)) for s, e in received):
        if start > cursor:
            missing.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < size:
        missing.append((cursor, size))
    return missing


def merge_range(ranges: list[list[int]], start: int, end: int) -> list[list[int]]:
    """``ranges`` with ``[start, end)`` added, sorted, overlapping and touching ones merged."""
    merged: list[list[int]] = []
    for s, e in sorted([*ranges, [start, end]]):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def chunks(ranges: Iterable[tuple[int, int]], chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` pieces of at most ``chunk_size`` bytes covering ``ranges``."""
    for start, end in ranges:
        for offset in range(start, end, chunk_size):
            yield offset, min(chunk_size, end - offset)
