"""Kernel messages on a Jupyter websocket: building them and (de)framing both protocols.

Pure functions, no I/O. They follow ``jupyter_server.services.kernels.connection.base`` and
``jupyter_client.session`` byte for byte (the tests check against them), for two reasons:

* importing those two costs ~90 ms (they pull in zmq and tornado), paid by every CLI call
  and MCP server start, when framing is a few lines;
* what a server sends is untrusted, and their parsers believe the counts a frame declares
  (a v1 frame that claims 2**62 parts makes ``deserialize_msg_from_ws_v1`` loop until memory
  runs out). Here every count and offset is checked against the frame's own length.
"""

from __future__ import annotations

import itertools
import json
import struct
import uuid
from datetime import UTC, datetime
from typing import Any

#: the message protocol version our requests declare (what jupyter_client 7/8 sends)
PROTOCOL_VERSION = "5.3"
# header, parent_header, metadata, content: the parts every message has before its buffers
_JSON_PARTS = 4


class FrameError(ValueError):
    """A websocket frame that is not a well-formed kernel message."""


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    """Compact JSON as a message part."""
    return json.dumps(value, default=_json_default, separators=(",", ":")).encode()


def new_message(msg_type: str, content: dict[str, Any], *, session: str, username: str,
                channel: str = "shell", metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request as ``Session.msg`` builds it, with its ``channel``."""
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": username,
              "session": session, "date": datetime.now(UTC),
              "version": PROTOCOL_VERSION}
    return {"header": header, "msg_id": header["msg_id"], "msg_type": msg_type,
            "parent_header": {}, "content": content, "metadata": dict(metadata or {}),
            "channel": channel}


# --- v1.kernel.websocket.jupyter.org --------------------------------------------------------


def frame_v1(channel: str, parts: list[bytes]) -> bytes:
    """``[count][offsets...][channel][parts...]``, little-endian uint64 offsets."""
    name = channel.encode()
    count = len(parts) + 2
    offsets = [8 * (count + 1), 8 * (count + 1) + len(name)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = struct.pack(f"<{count + 1}Q", count, *offsets)
    return b"".join([head, name, *parts])


def unframe_v1(frame: bytes) -> tuple[str, list[memoryview]]:
    """The channel and the parts of a v1 frame, every offset checked against its length."""
    size = len(frame)
    if size < 8:
        raise FrameError(f"v1 frame of {size} bytes has no offset count")
    (count,) = struct.unpack_from("<Q", frame)
    if count < 2 + _JSON_PARTS or 8 * (count + 1) > size:
        raise FrameError(f"v1 frame declares {count} offsets in {size} bytes")
    offsets = struct.unpack_from(f"<{count}Q", frame, 8)
    if offsets[0] != 8 * (count + 1) or offsets[-1] > size or \
            any(a > b for a, b in itertools.pairwise(offsets)):
        raise FrameError("v1 frame offsets are out of order or outside the frame")
    view = memoryview(frame)
    channel = bytes(view[offsets[0]:offsets[1]]).decode("utf-8", "replace")
    return channel, [view[offsets[i]:offsets[i + 1]] for i in range(1, count - 1)]


# --- the legacy protocol's binary frames (messages with buffers) ----------------------------


def frame_legacy(msg: dict[str, Any], buffers: list[bytes]) -> bytes:
    """``[n][offsets...][json][buffers...]``, big-endian uint32 offsets."""
    parts = [dumps(msg), *buffers]
    offsets = [4 * (len(parts) + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    return b"".join([struct.pack(f"!{len(parts) + 1}I", len(parts), *offsets), *parts])


def unframe_legacy(frame: bytes) -> tuple[dict[str, Any], list[memoryview]]:
    """The message dict and buffers of a legacy binary frame, offsets checked."""
    size = len(frame)
    if size < 4:
        raise FrameError(f"binary frame of {size} bytes has no part count")
    (count,) = struct.unpack_from("!I", frame)
    if count < 1 or 4 * (count + 1) > size:
        raise FrameError(f"binary frame declares {count} parts in {size} bytes")
    offsets = (*struct.unpack_from(f"!{count}I", frame, 4), size)
    if offsets[0] != 4 * (count + 1) or any(a > b for a, b in itertools.pairwise(offsets)):
        raise FrameError("binary frame offsets are out of order or outside the frame")
    view = memoryview(frame)
    msg = json.loads(bytes(view[offsets[0]:offsets[1]]))
    if not isinstance(msg, dict):
        raise FrameError("binary frame's message is not a JSON object")
    return msg, [view[offsets[i]:offsets[i + 1]] for i in range(1, count)]
