"""What a tool may take: bounded waits (``bounded``) and capped outputs (``cap_*``)."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from ..errors import TetherTimeout


class BoundExceeded(Exception):
    """A tool's own ``timeout_s`` ran out (not the remote work's timeout)."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(what)
        self.what = what
        self.seconds = seconds


@asynccontextmanager
async def bounded(seconds: float, what: str) -> AsyncIterator[None]:
    """Give up after ``seconds`` with a message that says the remote side may still go on.

    Only this bound's own deadline becomes ``BoundExceeded``: a ``TetherTimeout`` from inside
    (the supervisor link's own wait ran out) goes through unchanged, to get its own hint.
    """
    with anyio.move_on_after(seconds) as scope:
        try:
            yield
        except TimeoutError as exc:
            # A plain TimeoutError at our deadline is an inner fail_after racing this bound.
            if isinstance(exc, TetherTimeout) or anyio.current_time() < scope.deadline:
                raise
            raise BoundExceeded(what, seconds) from None
    if scope.cancelled_caught:
        raise BoundExceeded(what, seconds)


def cap_head(text: str, limit: int, where: str) -> tuple[str, bool]:
    """Keep the first ``limit`` chars, ending with a marker that says where the rest is."""
    if limit <= 0 or len(text) <= limit:
        return text, False
    return (text[:limit] + f"\n[... truncated: showed {limit} of {len(text)} chars; "
            f"the rest is in {where}]"), True


def cap_tail(text: str, limit: int, where: str) -> tuple[str, bool]:
    """Keep the last ``limit`` chars, starting with a marker that says where the rest is."""
    if limit <= 0 or len(text) <= limit:
        return text, False
    return (f"[... truncated: {len(text) - limit} earlier chars cut; the whole text is in "
            f"{where}]\n" + text[-limit:]), True


def cap_value(value: Any, max_chars: int = 20_000, max_items: int = 200) -> Any:
    """Cap every string and list inside a JSON-like value (for results of unknown size)."""
    if isinstance(value, str):
        return cap_tail(value, max_chars, "the remote (output cut to fit)")[0]
    if isinstance(value, dict):
        return {k: cap_value(v, max_chars, max_items) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [cap_value(v, max_chars, max_items) for v in value[:max_items]]
        if len(value) > max_items:
            items.append(f"[... {len(value) - max_items} more items not shown]")
        return items
    return value


def utf8_prefix(data: bytes, final: bool) -> int:
    """How many leading bytes of ``data`` end on a UTF-8 character boundary."""
    if final:
        return len(data)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    pending = decoder.getstate()[0]
    return len(data) - len(pending)
