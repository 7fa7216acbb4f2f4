"""The link's pure parts: events in ``seq`` order with gaps noticed, replies matched to calls."""

from __future__ import annotations

from jupyter_tether.controller.rpc import EventSequencer, PendingCalls
from jupyter_tether.errors import NotFound


def test_events_are_delivered_once_and_a_gap_waits_for_the_replay() -> None:
    sequencer = EventSequencer()
    assert [sequencer.accept(seq) for seq in (1, 2, 2, 1)] == [True, True, False, False]
    assert (sequencer.contiguous, sequencer.has_gap) == (2, False)
    assert sequencer.accept(5) and sequencer.has_gap  # 3 and 4 lost: delivered, gap noted
    assert (sequencer.contiguous, sequencer.highest) == (2, 5)
    assert sequencer.accept(3) and sequencer.accept(4)  # the replay fills it
    assert (sequencer.contiguous, sequencer.has_gap) == (5, False)
    assert not sequencer.accept(4)


def test_events_the_replay_ring_lost_are_given_up() -> None:
    sequencer = EventSequencer(last_seq=10)
    assert not sequencer.accept(10)
    sequencer.accept(14)
    sequencer.accept(16)
    sequencer.skip_to(14)  # 11..13 left the supervisor's ring
    assert (sequencer.contiguous, sequencer.has_gap) == (14, True)
    assert sequencer.accept(15) and sequencer.contiguous == 16


def test_replies_resolve_their_own_call_once() -> None:
    calls = PendingCalls()
    first = calls.new("ping", {}, [], True)
    second = calls.new("fs_stat", {"path": "x"}, [], True)
    assert first.id != second.id and len(calls) == 2
    assert calls.resolve({"id": first.id, "ok": True, "result": {"pong": True}}, [b"blob"])
    assert first.done and first.reply is not None and first.reply.buffers == [b"blob"]
    assert not calls.resolve({"id": first.id, "ok": True, "result": {}}, [])  # a duplicate
    assert not calls.resolve({"id": 999, "ok": True, "result": {}}, [])  # nobody's
    error = {"code": "not_found", "message": "no x", "details": {"path": "x"}}
    assert calls.resolve({"id": second.id, "ok": False, "error": error}, [])
    assert isinstance(second.error, NotFound) and second.error.details == {"path": "x"}
    calls.discard(first)
    calls.discard(second)
    assert len(calls) == 0
