"""RPC channel state with no I/O: request ids, pending calls, and event sequencing.

The link feeds decoded envelopes in and asks what to do (resolve this call, deliver this
event, ask for a replay); with no socket in sight it is tested with plain inputs
(``tests/test_rpc.py``). Also here: the checks on listings and manifests from the remote.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..agent_payload import wire
from ..errors import LimitExceeded, RemoteError, TetherError

log = logging.getLogger(__name__)

#: events held above a gap while waiting for the replay; past it the gap is given up
MAX_EVENTS_ABOVE_GAP = 10_000


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
        #: a local verdict that ends the call (the link closed over a broken limit)
        self.failure: TetherError | None = None
        #: a connection it was sent on closed over a message above the limit
        self.over_limit_before = False
        self.wakeup = anyio.Event()

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None or self.failure is not None

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

    def fail_sent(self, generation: int, failure: TetherError) -> None:
        """Connection ``generation`` closed over a message above the link's limit: end its
        unanswered calls with ``failure``, but for a call that may be re-sent and was not
        ended this way before.

        The message is refused unread, so whose it was is unknown: iopub goes to every
        client of the kernel, and a big reply to another controller on the same supervisor
        closes this one too. A re-sendable call is sent once more; if its own reply is
        the one above the limit, it meets it again and ends then.
        """
        for call in self._calls.values():
            if call.sent_generation == generation and not call.done:
                if call.idempotent and not call.over_limit_before:
                    call.over_limit_before = True
                    continue
                call.failure = failure
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
        if len(self._above) > MAX_EVENTS_ABOVE_GAP:
            # The replay never filled the gap (or a hostile peer leaves gaps on purpose):
            # holding every later seq would grow without bound. What is missing is lost.
            log.warning("%d events arrived above a gap the replay did not fill; giving up "
                        "on the missing ones (MAX_EVENTS_ABOVE_GAP)", len(self._above))
            self.skip_to(self.highest)
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


# --- decoded replies: listings and manifests ---------------------------------------------------


def _too_many(what: str, count: int, limit: int, name: str) -> LimitExceeded:
    return LimitExceeded(f"the supervisor sent {what} with {count:,} entries, above the limit of "
                         f"{limit:,} ({name}): refused as malformed or hostile", limit=name,
                         value=limit)


def _check_text(value: Any, what: str, limit: int, name: str) -> str:
    if not isinstance(value, str):
        raise LimitExceeded(f"the supervisor sent a {what} that is not a string: refused as "
                            "malformed", limit=name, value=limit)
    if len(value) > limit:
        raise LimitExceeded(f"the supervisor sent a {what} of {len(value):,} chars, above the "
                            f"limit of {limit:,} ({name}): refused as malformed or hostile",
                            limit=name, value=limit)
    return value


def check_listing(result: Any, max_entries: int) -> list[dict[str, Any]]:
    """The entries of an ``fs_list`` reply, checked: at most ``max_entries`` (what was asked),
    each a map with a plain name within ``wire.MAX_NAME_CHARS``. Raises LimitExceeded."""
    entries = result.get("entries") if isinstance(result, dict) else None
    if not isinstance(entries, list):
        raise LimitExceeded("the supervisor sent a listing without an entry list: refused as "
                            "malformed", limit="MAX_NAME_CHARS", value=wire.MAX_NAME_CHARS)
    _check_text(result.get("path"), "listed path", wire.MAX_PATH_CHARS, "MAX_PATH_CHARS")
    if len(entries) > max(max_entries, 0):
        raise _too_many("a listing", len(entries), max_entries, "max_entries")
    for entry in entries:
        if not isinstance(entry, dict):
            raise LimitExceeded("the supervisor sent a listing entry that is not a map: refused "
                                "as malformed", limit="MAX_NAME_CHARS", value=wire.MAX_NAME_CHARS)
        name = _check_text(entry.get("name"), "file name", wire.MAX_NAME_CHARS, "MAX_NAME_CHARS")
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise LimitExceeded(f"the supervisor listed an impossible file name {name[:80]!r}: "
                                "refused as malformed or hostile", limit="MAX_NAME_CHARS",
                                value=wire.MAX_NAME_CHARS)
        if "target" in entry and entry["target"] is not None:
            _check_text(entry["target"], "link target", wire.MAX_PATH_CHARS, "MAX_PATH_CHARS")
    return entries


def check_manifest(manifest: Any) -> dict[str, Any]:
    """A decoded ``manifest`` checked before use: at most ``wire.MAX_MANIFEST_ENTRIES``
    entries in all, paths and link targets within ``wire.MAX_PATH_CHARS``, the expected
    shapes. Raises LimitExceeded."""
    if not isinstance(manifest, dict):
        raise LimitExceeded("the supervisor sent a manifest that is not a map: refused as "
                            "malformed", limit="MAX_MANIFEST_ENTRIES",
                            value=wire.MAX_MANIFEST_ENTRIES)
    lists = {key: manifest.get(key) or [] for key in ("files", "dirs", "symlinks", "others",
                                                      "errors")}
    for key, items in lists.items():
        if not isinstance(items, list):
            raise LimitExceeded(f"the supervisor sent a manifest whose {key!r} is not a list: "
                                "refused as malformed", limit="MAX_MANIFEST_ENTRIES",
                                value=wire.MAX_MANIFEST_ENTRIES)
    total = sum(len(items) for items in lists.values())
    if total > wire.MAX_MANIFEST_ENTRIES:
        raise _too_many("a manifest", total, wire.MAX_MANIFEST_ENTRIES, "MAX_MANIFEST_ENTRIES")
    limit, name = wire.MAX_PATH_CHARS, "MAX_PATH_CHARS"
    _check_text(manifest.get("path", ""), "manifest root", limit, name)
    for key in ("dirs", "others"):
        for item in lists[key]:
            _check_text(item, "path", limit, name)
    for key in ("files", "symlinks", "errors"):
        for item in lists[key]:
            if not isinstance(item, dict):
                raise LimitExceeded(f"the supervisor sent a manifest {key[:-1]} entry that is "
                                    "not a map: refused as malformed", limit=name, value=limit)
            _check_text(item.get("path"), "path", limit, name)
            if key == "symlinks":
                _check_text(item.get("target", ""), "link target", limit, name)
    return manifest


def decode_manifest(blob: bytes) -> dict[str, Any]:
    """A manifest sent as a blob, decoded (within ``wire.MAX_REPLY_ENVELOPE_BYTES``) and
    checked by ``check_manifest``. Raises LimitExceeded."""
    try:
        manifest, _ = wire.decode(blob, wire.MAX_REPLY_ENVELOPE_BYTES)
    except wire.DecodeError as exc:
        raise LimitExceeded(f"the supervisor sent an unreadable manifest ({exc}): refused",
                            limit="MAX_REPLY_ENVELOPE_BYTES",
                            value=wire.MAX_REPLY_ENVELOPE_BYTES) from None
    return check_manifest(manifest)
