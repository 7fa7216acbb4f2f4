"""Fast unit tests of the payload's pure pieces: plain inputs, expected outputs, no server."""

from __future__ import annotations

import collections
import hashlib
import threading
from pathlib import Path

import pytest

from jupyter_tether.agent_payload import app, wire
from jupyter_tether.agent_payload.excludes import make_matcher
from jupyter_tether.agent_payload.transfer_state import (
    SIDECAR_VERSION,
    TransferState,
    clean_ranges,
    merge_range,
    missing_ranges,
    parse_sidecar,
)

# --- transfer state ------------------------------------------------------------------------


@pytest.mark.parametrize(("ranges", "added", "merged"), [
    ([], (0, 5), [[0, 5]]),
    ([[0, 5]], (5, 10), [[0, 10]]),             # touching ranges join
    ([[0, 5]], (3, 8), [[0, 8]]),               # overlapping ones too
    ([[10, 20]], (0, 5), [[0, 5], [10, 20]]),   # a gap stays a gap, sorted
    ([[0, 2], [4, 6], [8, 10]], (1, 9), [[0, 10]]),
    ([[0, 10]], (2, 3), [[0, 10]]),             # already covered
])
def test_merge_range(ranges: list[list[int]], added: tuple[int, int], merged: list[list[int]]):
    assert merge_range(ranges, *added) == merged


@pytest.mark.parametrize(("ranges", "size", "missing"), [
    ([], 10, [[0, 10]]),
    ([], 0, []),
    ([[0, 10]], 10, []),
    ([[2, 4], [6, 8]], 10, [[0, 2], [4, 6], [8, 10]]),
    ([[0, 4]], 10, [[4, 10]]),
])
def test_missing_ranges(ranges: list[list[int]], size: int, missing: list[list[int]]):
    assert missing_ranges(ranges, size) == missing


def test_clean_ranges_drops_what_is_not_a_range_inside_the_file():
    rows = [[0, 4], [4, 6], "x", [1], [5, 3], [-1, 2], [8, 11], [7, 7], [2.0, 3], None, [8, 10]]
    assert clean_ranges(rows, 10) == [[0, 6], [8, 10]]


def _arrive(state: TransferState, data: bytes, order: list[tuple[int, int]]) -> None:
    for start, end in order:
        state.add(start, data[start:end])


def _finish(state: TransferState, data: bytes) -> str:
    """What a commit does: continue the running hash with the file's bytes from its offset."""
    hasher, start = state.hash_resume()
    hasher.update(data[start:])
    return str(hasher.hexdigest())


DATA = bytes(range(256)) * 40  # 10240 bytes


def test_in_order_chunks_are_hashed_as_they_arrive():
    state = TransferState(len(DATA), hashlib.sha256(DATA).hexdigest())
    _arrive(state, DATA, [(0, 4096), (4096, 8192), (8192, 10240)])
    assert state.complete and state.missing() == [] and state.received == [[0, 10240]]
    hasher, start = state.hash_resume()
    assert start == len(DATA)  # nothing left to read back
    assert hasher.hexdigest() == state.sha256


def test_a_gap_keeps_the_running_hash_and_the_rest_is_read_back():
    state = TransferState(len(DATA), hashlib.sha256(DATA).hexdigest())
    _arrive(state, DATA, [(0, 1000), (5000, 6000), (1000, 5000), (6000, 10240)])
    assert state.complete
    assert state.hash_resume()[1] == 5000  # hashed up to the gap's end, no further
    assert _finish(state, DATA) == state.sha256


def test_rewriting_hashed_bytes_drops_the_running_hash():
    state = TransferState(len(DATA), hashlib.sha256(DATA).hexdigest())
    _arrive(state, DATA, [(0, 4096), (0, 4096), (4096, 10240)])
    hasher, start = state.hash_resume()
    assert start == 0 and hasher.hexdigest() == hashlib.sha256(b"").hexdigest()
    assert _finish(state, DATA) == state.sha256


def test_incomplete_state_says_what_is_missing():
    state = TransferState(100, "0" * 64)
    state.add(10, b"x" * 20)
    state.add(50, b"x" * 10)
    assert not state.complete
    assert state.received_bytes == 30
    assert state.missing() == [[0, 10], [30, 50], [60, 100]]


def test_sidecar_round_trip_resumes_without_the_running_hash():
    state = TransferState(100, "a" * 64)
    state.add(0, b"x" * 40)
    record = state.sidecar({"transfer_id": "t1", "target": "/x/y"})
    assert record["version"] == SIDECAR_VERSION and record["transfer_id"] == "t1"
    parsed = parse_sidecar(record, part_size=100)
    assert parsed is not None
    resumed = TransferState.resume(parsed["size"], parsed["sha256"], parsed["received"])
    assert resumed.received == [[0, 40]] and resumed.received_bytes == 40
    assert resumed.hash_resume()[1] == 0  # bytes from an earlier life: hashed from the file


@pytest.mark.parametrize("damage", [
    {"version": SIDECAR_VERSION + 1},
    {"size": 99},               # not the part file's size
    {"received": "0-40"},
])
def test_a_foreign_or_damaged_sidecar_is_refused(damage: dict[str, object]):
    record = TransferState(100, "a" * 64).sidecar({})
    record.update(damage)
    assert parse_sidecar(record, part_size=100) is None
    assert parse_sidecar(["not", "a", "map"], part_size=100) is None


# --- excludes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("patterns", "path", "is_dir", "excluded"), [
    (["build/", "!build/keep.txt"], "build/keep.txt", False, True),  # an excluded dir wins
    (["*.log", "!keep.log"], "a/keep.log", False, False),
    (["logs/"], "logs", False, False),             # dir-only pattern, a file of that name
    (["logs/"], "a/logs", True, True),
    (["src/*.py"], "src/a.py", False, True),       # "*" stays within one directory
    (["src/*.py"], "src/sub/a.py", False, False),
    (["**/cache"], "cache", True, True),           # "**/" is zero or more directories
    (["**/cache"], "a/b/cache", True, True),
    (["/build"], "build", True, True),             # a leading slash anchors to the root
    (["/build"], "sub/build", True, False),
    (["[ab].txt"], "b.txt", False, True),
    (["[!ab].txt"], "b.txt", False, False),
    (["[!ab].txt"], "c.txt", False, True),
    (["file?.bin"], "file1.bin", False, True),
    (["file?.bin"], "file/.bin", False, False),
    (["\\#notes"], "#notes", False, True),         # an escaped "#" is not a comment
    (["#notes"], "#notes", False, False),
    (["a[b"], "a[b", False, True),                 # an unclosed class is literal
    (["*.pyc"], "pkg\\mod.pyc", False, True),      # backslashes are separators too
])
def test_exclude_rules(patterns: list[str], path: str, is_dir: bool, excluded: bool):
    assert make_matcher(patterns)(path, is_dir) is excluded


def test_an_empty_matcher_excludes_nothing():
    assert not make_matcher(None)
    assert not make_matcher(["# only a comment", "", "   "])
    assert make_matcher([".git", 3, None])(".git", True)  # non-strings are ignored
    assert make_matcher(["*"])("", True) is False  # the root itself is never excluded


# --- op names --------------------------------------------------------------------------------


def test_op_constants_name_every_registered_op_and_nothing_else(tmp_path: Path):
    supervisor = app.create_supervisor(lambda *_: None, root_dir=str(tmp_path),
                                       state_dir=str(tmp_path / "state"))
    try:
        registered = sorted(supervisor._ops)
    finally:
        supervisor.close()
    assert registered == wire.Op.names()
    assert len(set(wire.Op.names())) == len(wire.Op.names())


def test_one_read_gives_the_sha256_and_the_crc32_of_each_piece(tmp_path: Path):
    import os
    import zlib

    from jupyter_tether.agent_payload.hashing import HASH_BLOCK_BYTES, digest_pass

    data = os.urandom(2 * HASH_BLOCK_BYTES + 12345)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    piece = 300 * 1000  # not a divisor of the read block: pieces straddle reads
    fd = os.open(path, os.O_RDONLY)
    try:
        sha, crcs, end = digest_pass(fd, piece, lambda: False)
        assert (sha, end) == (hashlib.sha256(data).hexdigest(), len(data))
        assert crcs == [zlib.crc32(data[o:o + piece]) for o in range(0, len(data), piece)]
        assert digest_pass(fd, 0, lambda: False) == (sha, None, len(data))
        assert digest_pass(fd, piece, lambda: True)[2] == 0  # stopped at once
    finally:
        os.close(fd)


def test_the_upload_writer_outlives_a_failing_chunk_and_bounds_what_waits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_tether.agent_payload import uploads

    monkeypatch.setattr(uploads, "MAX_QUEUED_BYTES", 10)
    counters: collections.Counter[str] = collections.Counter()
    writer = uploads._ChunkWriter(counters)
    gate = threading.Event()
    done: list[int] = []

    def failing() -> None:
        gate.wait(10)
        raise OSError("disk full")

    writer.submit(failing, 8)
    started, submitted = threading.Event(), threading.Event()

    def submit_second() -> None:
        started.set()
        writer.submit(lambda: done.append(1), 8)
        submitted.set()

    second = threading.Thread(target=submit_second)
    second.start()
    assert started.wait(10)
    # 16 bytes queued would pass the 10-byte bound: the caller waits while the first is held.
    assert not submitted.wait(0.5), "the second submit returned past the bound"
    gate.set()
    second.join(10)
    assert not second.is_alive()
    writer.close()
    assert done == [1] and counters["upload_writer_errors"] == 1


# --- forwarded streams: room and push pacing ------------------------------------------------


def test_check_room_refuses_a_duplicate_and_each_limit() -> None:
    from jupyter_tether.agent_payload import stream_state as st

    st.check_room([("a", 1)], "a", ("a", 2))  # room: no error
    with pytest.raises(wire.OpError) as dup:
        st.check_room([("a", 1)], "a", ("a", 1))
    assert dup.value.code == wire.ErrorCode.CONFLICT
    mine = [("a", i) for i in range(st.MAX_STREAMS_PER_OWNER)]
    with pytest.raises(wire.OpError, match="per controller") as per_owner:
        st.check_room(mine, "a", ("a", -1))
    assert per_owner.value.code == wire.ErrorCode.TOO_LARGE
    st.check_room(mine, "b", ("b", 0))  # another controller still has room
    everyone = mine + [("b", i) for i in range(st.MAX_STREAMS - len(mine))]
    with pytest.raises(wire.OpError, match="its limit") as full:
        st.check_room(everyone, "c", ("c", 0))
    assert full.value.details == {"limit": st.MAX_STREAMS}


def test_push_pacer_spends_its_burst_then_paces_at_its_rate() -> None:
    from jupyter_tether.agent_payload.stream_state import PushPacer

    pacer = PushPacer(rate=100.0, burst=3.0, now=0.0)
    assert pacer.wait_s() == 0.0  # a quiet link sends at once
    pacer.take(3)
    assert pacer.wait_s() == pytest.approx(0.01)  # one token comes every 1/rate s
    pacer.refill(0.005)
    assert pacer.wait_s() == pytest.approx(0.005)
    pacer.refill(0.01)
    assert pacer.wait_s() == 0.0
    pacer.refill(100.0)  # a long quiet spell saves up the burst, no more
    assert pacer.tokens == 3.0
    pacer.refill(50.0)  # a clock that goes back adds nothing
    assert pacer.tokens == 3.0
