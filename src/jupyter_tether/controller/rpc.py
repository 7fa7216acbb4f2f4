"""RPC channel state with no I/O: request ids, pending calls, and event sequencing.

The link feeds decoded envelopes in and asks what to do; tests drive it directly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..errors import RemoteError


@dataclass
class Event:
    """A supervisor event: ``seq`` is supervisor-wide and increases by one per event."""

    seq: int
    name: str
    body: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)


@dataclass
class Reply:
    result: Any
    buffers: list[bytes] = field(default_factory=list)


class PendingCall:
    """One request waiting for its reply, possibly across reconnects."""

    def __init__(self, request_id: int, op: str, args: dict[str, Any], buffers: list[bytes],
                 idempotent: bool) -> None:
        self.id = request_id
        self.op = op
        self.args = args
        self.buffers = buffers
        self.idempotent = idempotent
        self.sent_generation = -1
        self.reply: Reply | None = None
        self.error: RemoteError | None = None
        self.wakeup = anyio.Event()

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None

    def wake(self) -> None:
        self.wakeup.set()

    def rearm(self) -> None:
        self.wakeup = anyio.Event()


class PendingCalls:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._calls: dict[int, PendingCall] = {}

    def new(self, op: str, args: dict[str, Any], buffers: list[bytes],
            idempotent: bool) -> PendingCall:
        call = PendingCall(next(self._ids), op, args, buffers, idempotent)
        self._calls[call.id] = call
        return call

    def discard(self, call: PendingCall) -> None:
        self._calls.pop(call.id, None)

    def resolve(self, envelope: dict[str, Any], buffers: list[bytes]) -> bool:
        """Match a reply envelope to its call; False if nobody waits for it (a duplicate)."""
        call = self._calls.get(envelope.get("id"))  # type: ignore[arg-type]
        if call is None or call.done:
            return False
        if envelope.get("ok"):
            call.reply = Reply(envelope.get("result"), buffers)
        else:
            call.error = RemoteError.from_wire(envelope.get("error") or {})
        call.wake()
        return True

    def wake_all(self) -> None:
        for call in self._calls.values():
            call.wake()

    def __len__(self) -> int:
        return len(self._calls)


class EventSequencer:
    """Deduplicates events by ``seq`` and notices gaps (iopub drops, reconnects).

    ``contiguous`` is the highest seq up to which every event was seen; events above a
    gap are still delivered at once (log chunks carry byte offsets, so consumers can
    order them), and the gap is filled by asking the supervisor to replay.
    """

    def __init__(self, last_seq: int = 0) -> None:
        self.contiguous = last_seq
        self._above: set[int] = set()

    def accept(self, seq: int) -> bool:
        if seq <= self.contiguous or seq in self._above:
            return False
        self._above.add(seq)
        while self.contiguous + 1 in self._above:
            self.contiguous += 1
            self._above.discard(self.contiguous)
        return True

    @property
    def has_gap(self) -> bool:
        return bool(self._above)

    @property
    def highest(self) -> int:
        return max(self._above, default=self.contiguous)

    def skip_to(self, seq: int) -> None:
        """Give up on events up to ``seq`` (they left the supervisor's replay ring)."""
        if seq > self.contiguous:
            self.contiguous = seq
            self._above = {s for s in self._above if s > seq}
            while self.contiguous + 1 in self._above:
                self.contiguous += 1
                self._above.discard(self.contiguous)
