"""Kernel message framing (controller/kernel_wire.py): byte-equal to jupyter_server's own,
and every count and offset a server declares is checked before it is believed."""

from __future__ import annotations

import json
import struct
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)

from jupyter_tether.controller.kernel_wire import (
    FrameError,
    dumps,
    frame_legacy,
    frame_v1,
    new_message,
    unframe_legacy,
    unframe_v1,
)

channels = st.sampled_from(["shell", "iopub", "control", "stdin", "ünïcode"])
parts = st.lists(st.binary(max_size=64), min_size=4, max_size=8)


@given(channels, parts)
def test_v1_frames_match_jupyter_servers_both_ways(channel: str, body: list[bytes]) -> None:
    ours = frame_v1(channel, body)
    assert ours == serialize_msg_to_ws_v1(body, channel)
    got_channel, got = unframe_v1(ours)
    assert got_channel == channel and [bytes(p) for p in got] == body
    assert deserialize_msg_from_ws_v1(ours) == (channel, body)


@given(st.lists(st.binary(max_size=64), max_size=4))
def test_legacy_binary_frames_match_jupyter_servers_both_ways(buffers: list[bytes]) -> None:
    msg = {"header": {"msg_id": "a", "msg_type": "comm_msg"}, "parent_header": {},
           "metadata": {}, "content": {"data": {"x": 1}}, "channel": "iopub"}
    ours = frame_legacy(msg, buffers)
    theirs = serialize_binary_message({**msg, "buffers": buffers})
    # The same layout; the JSON text differs only in spacing.
    assert deserialize_binary_message(ours) == {**msg, "buffers": buffers}
    decoded, views = unframe_legacy(theirs)
    assert decoded == msg and [bytes(v) for v in views] == buffers


def test_a_new_message_has_what_jupyter_client_puts_in_one() -> None:
    msg = new_message("execute_request", {"code": "1"}, session="s1", username="u",
                      channel="control", metadata={"m": 1})
    header = msg["header"]
    assert set(header) == {"msg_id", "msg_type", "username", "session", "date", "version"}
    assert (header["msg_type"], header["session"], header["username"]) == \
        ("execute_request", "s1", "u")
    assert msg["channel"] == "control" and msg["metadata"] == {"m": 1}
    assert msg["parent_header"] == {} and msg["content"] == {"code": "1"}
    assert new_message("x", {}, session="s1", username="u")["header"]["msg_id"] != \
        header["msg_id"]
    # The date goes out as jupyter_client writes it: ISO 8601 in UTC with a Z.
    date = json.loads(dumps(header))["date"]
    assert date.endswith("Z") and datetime.fromisoformat(date[:-1] + "+00:00")


def _v1(count: int, offsets: list[int], tail: bytes = b"") -> bytes:
    return struct.pack(f"<{1 + len(offsets)}Q", count, *offsets) + tail


@pytest.mark.parametrize("frame", [
    b"",
    b"\x01\x02",
    # 2**62 offsets claimed in 16 bytes: jupyter_server's parser loops until memory runs out.
    _v1(1 << 62, [8]),
    _v1(6, [56, 60, 70, 80, 90, 100]),  # offsets past the end of a 56-byte frame
    _v1(6, [56, 57, 56, 57, 57, 57], b"x"),  # an offset going backwards
    _v1(6, [0, 1, 2, 3, 4, 5], b"x"),  # the channel does not start after the offsets
    _v1(3, [32, 33, 33], b"x"),  # fewer parts than a message has
])
def test_malformed_v1_frames_raise_frame_error(frame: bytes) -> None:
    with pytest.raises(FrameError):
        unframe_v1(frame)


@pytest.mark.parametrize("frame", [
    b"",
    struct.pack("!I", 0xFFFFFFFF) + b"{}",  # four billion parts claimed
    struct.pack("!I", 0) + b"{}",
    struct.pack("!II", 1, 4) + b"{}",  # the JSON would overlap the header
    struct.pack("!III", 2, 12, 99) + b"{}",  # a buffer starting past the end
    struct.pack("!II", 1, 8) + b"[]",  # a message that is not an object
])
def test_malformed_legacy_frames_raise(frame: bytes) -> None:
    # FrameError is a ValueError, as json's errors are: the reader drops either.
    with pytest.raises(ValueError):
        unframe_legacy(frame)
