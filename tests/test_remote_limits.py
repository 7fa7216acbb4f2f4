"""Pure cores of the limits on what the remote sends: exec caps, event gaps, decoded replies."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from jupyter_tether import LimitExceeded
from jupyter_tether.agent_payload import wire
from jupyter_tether.controller.execute import (
    EXEC_LIMITS,
    ExecLimits,
    _Collector,
    cap_head,
    cap_traceback,
)
from jupyter_tether.controller.rpc import (
    MAX_EVENTS_ABOVE_GAP,
    EventSequencer,
    PendingCalls,
    check_listing,
    check_manifest,
    decode_manifest,
)

# --- exec -----------------------------------------------------------------------------------


def test_cap_head_keeps_the_start_and_says_how_much_was_cut() -> None:
    assert cap_head("short", 10) == ("short", False)
    text, cut = cap_head("x" * 3_000_000, 2000, "exception value")
    assert cut and text.startswith("x" * 2000)
    assert text.endswith("[... exception value: 2,998,000 more chars not shown "
                         "(3,000,000 in all) ...]")


def test_cap_traceback_keeps_the_last_entries_within_the_limit() -> None:
    lines = [f"frame {i}\n" + "y" * 300 for i in range(1000)] + ["ValueError: " + "x" * 10**6]
    kept, cut = cap_traceback(lines, 2000)
    assert cut and sum(map(len, kept)) < 3000
    assert kept[0].startswith("[... ") and "earlier traceback entries not shown" in kept[0]
    assert kept[-1].startswith("ValueError: xxx") and "more chars not shown" in kept[-1]
    assert cap_traceback(["a", "b"], 2000) == (["a", "b"], False)
    many, cut = cap_traceback(["e"] * 500, 0, max_entries=100)
    assert cut and len(many) == 101


def test_collector_error_is_capped_whatever_its_size() -> None:
    collector = _Collector(2000, None, None)
    collector.feed("error", {"ename": "E" * 10**6, "evalue": "v" * 3_000_000,
                             "traceback": ["t" * 10**6] * 50}, "m" * 32)
    result = collector.result("ok")
    assert result.truncated and len(json.dumps(result.to_dict())) < 10_000


def test_collector_survives_outputs_of_the_wrong_shape(tmp_path: Path) -> None:
    collector = _Collector(100, tmp_path, None)
    collector.feed("display_data", {"data": ["not", "a", "map"]}, "m" * 32)
    collector.feed("display_data", {"data": {"image/png": "%%% not base64 %%%"}}, "m" * 32)
    collector.feed("display_data", {"data": {"image/png": 12345}}, "m" * 32)
    collector.feed("stream", {"name": "stdout", "text": 42}, "m" * 32)
    collector.feed("error", {"ename": None, "evalue": None, "traceback": "not a list"}, "m" * 32)
    result = collector.result("ok")
    assert result.stdout == "42" and result.images == []
    assert result.results[1]["data"]["image/png"]["error"] == "undecodable image data"
    assert result.error == {"ename": "", "evalue": "", "traceback": []}


def test_collector_caps_mime_types_json_and_total_size() -> None:
    collector = _Collector(1000, None, None)
    bundle = {f"text/x-{i}": "z" * 5000 for i in range(100)}
    collector.feed("display_data", {"data": bundle}, "m" * 32)
    first = collector.results[0]["data"]
    assert first["omitted_mime_types"] == 100 - EXEC_LIMITS.max_mime_types
    assert all(len(v) < 1100 for k, v in first.items() if k.startswith("text/"))
    # The budget (8 x max_output_chars) is spent: later outputs are counted, not kept.
    collector.feed("display_data", {"data": {"application/json": list(range(10**5))}}, "m" * 32)
    result = collector.result("ok")
    assert len(result.results) == 2 and result.results[-1]["type"] == "omitted"
    assert result.omitted_results == 1


def test_collector_saves_images_within_count_and_bytes(tmp_path: Path) -> None:
    limits = ExecLimits(max_images=3, max_image_bytes=1000)
    collector = _Collector(100, tmp_path, None, limits)
    small = base64.b64encode(b"p" * 100).decode()
    big = base64.b64encode(b"q" * 950).decode()
    for data in (small, big, small, small, small):
        collector.feed("display_data", {"data": {"image/png": data}}, "m" * 32)
    result = collector.result("ok")
    assert len(result.images) == 3 and result.truncated  # big: over the bytes; last: count
    saved = [r["data"]["image/png"] for r in result.results]
    assert "saved_to" in saved[0] and "saved_to" not in saved[1]
    assert "at most 3 images" in saved[1]["note"] and "saved_to" not in saved[4]
    assert sum(Path(p).stat().st_size for p in result.images) <= 1000


# --- events ---------------------------------------------------------------------------------


def test_event_sequencer_gives_up_a_gap_instead_of_holding_events_for_ever() -> None:
    sequencer = EventSequencer()
    for seq in range(2, 2 * MAX_EVENTS_ABOVE_GAP + 10, 2):  # every other event missing
        sequencer.accept(seq)
        assert len(sequencer._above) <= MAX_EVENTS_ABOVE_GAP
    assert sequencer.contiguous > MAX_EVENTS_ABOVE_GAP
    assert not sequencer.accept(4)  # given up for good: not delivered twice


def test_failing_the_calls_of_a_closed_connection() -> None:
    # Closed over a message above the limit: which call it answered is unknown (it may
    # even be another controller's), so a call that may be re-sent gets one more try, and
    # ends on a second such close; one that may not be re-sent ends at once.
    calls = PendingCalls()
    sent, later, answered = (calls.new("op", {}, [], True) for _ in range(3))
    once = calls.new("op", {}, [], False)
    sent.sent_generation, later.sent_generation, answered.sent_generation = 1, 2, 1
    once.sent_generation = 1
    calls.resolve({"id": answered.id, "ok": True, "result": {}}, [])
    failure = LimitExceeded("too big", limit="X", value=1)
    calls.fail_sent(1, failure)
    assert not sent.done, "a re-sendable call is tried once more"
    assert once.done and once.failure is failure
    assert not later.done and answered.failure is None
    sent.sent_generation = later.sent_generation = 3  # both re-sent on the next connection
    calls.fail_sent(3, failure)
    assert sent.done and sent.failure is failure, "its second close over the limit ends it"
    assert not later.done, "a call's first close over the limit: one more try"


# --- decoded listings and manifests -------------------------------------------------------------


def _listing(*names: object) -> dict[str, object]:
    return {"path": "/r", "entries": [{"name": n, "type": "file"} for n in names]}


def test_listing_checks() -> None:
    assert check_listing(_listing("a", "b"), 2) == [{"name": "a", "type": "file"},
                                                    {"name": "b", "type": "file"}]
    with pytest.raises(LimitExceeded, match="3 entries, above the limit of 2"):
        check_listing(_listing("a", "b", "c"), 2)
    with pytest.raises(LimitExceeded, match="MAX_NAME_CHARS") as caught:
        check_listing(_listing("n" * (wire.MAX_NAME_CHARS + 1)), 10)
    assert caught.value.limit == "MAX_NAME_CHARS"
    for bad in ("../up", "", "..", "a\0b", 7):
        with pytest.raises(LimitExceeded):
            check_listing(_listing(bad), 10)
    for malformed in (None, [], {"path": "/r"}, {"path": "/r", "entries": ["x"]}):
        with pytest.raises(LimitExceeded, match="malformed"):
            check_listing(malformed, 10)


def test_manifest_checks() -> None:
    good = {"path": "/r", "files": [{"path": "a/b", "size": 1}], "dirs": ["a"],
            "symlinks": [{"path": "l", "target": "a"}], "others": [], "errors": []}
    assert check_manifest(good) is good
    huge = {"path": "/r", "dirs": [""] * (wire.MAX_MANIFEST_ENTRIES + 1)}
    with pytest.raises(LimitExceeded, match="MAX_MANIFEST_ENTRIES"):
        check_manifest(huge)
    long_path = dict(good, files=[{"path": "p" * (wire.MAX_PATH_CHARS + 1)}])
    with pytest.raises(LimitExceeded, match="MAX_PATH_CHARS"):
        check_manifest(long_path)
    for malformed in ([], dict(good, files="x"), dict(good, files=[3]), dict(good, dirs=[3]),
                      dict(good, symlinks=[{"path": "l", "target": None}])):
        with pytest.raises(LimitExceeded):
            check_manifest(malformed)


def test_manifest_blob_is_decoded_and_checked() -> None:
    blob = wire.encode({"path": "/r", "files": [], "dirs": ["d"]}, wire.JSON)
    assert decode_manifest(blob)["dirs"] == ["d"]
    with pytest.raises(LimitExceeded, match="unreadable manifest"):
        decode_manifest(b"\xc1 not msgpack")
    many = wire.encode({"path": "/r", "others": ["o"] * (wire.MAX_MANIFEST_ENTRIES + 1)})
    with pytest.raises(LimitExceeded, match="2,000,001 entries"):
        decode_manifest(many)
