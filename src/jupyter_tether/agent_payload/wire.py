"""The tether wire protocol: envelope codec, error codes and limits, shared by both ends.

This module is injected into the remote kernel and imported by the controller, so it is the
one definition of the protocol. Standard library only (msgpack when present); Python >= 3.9.

A comm message carries a tiny JSON ``data`` (``{"tether": KIND}``) and binary buffers:
``buffers[0]`` is the envelope, ``buffers[1:]`` are raw blobs (file chunks, log bytes).

Envelopes::

    request  {"type": "request", "id": int, "op": str, "args": {...}}
    reply    {"type": "reply", "id": int, "ok": true, "result": {...}}
             {"type": "reply", "id": int, "ok": false,
              "error": {"code": str, "message": str, "details": {...}}}
    event    {"type": "event", "seq": int, "event": str, "body": {...}}

The codec is self-describing: a JSON envelope starts with ``{``; anything else is msgpack.
"""

import json
from typing import Any, Dict, List, Optional, Tuple, Union

try:  # msgpack is optional on the remote side: fall back to JSON without it.
    import msgpack as _msgpack
except ImportError:  # pragma: no cover - depends on the remote environment
    _msgpack = None

PROTOCOL_VERSION = 1
COMM_TARGET = "jupyter_tether"

# Client->kernel websocket frames above 10 MiB close the socket on a stock jupyter_server:
# bulk data moves in chunks well below that.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024
# An envelope is metadata only; anything bigger is a malformed or hostile request.
MAX_ENVELOPE_BYTES = 1024 * 1024
MAX_REPLY_ENVELOPE_BYTES = 256 * 1024 * 1024
# Blob bytes one reply may carry beside its envelope (batch_read packs several small files).
MAX_MESSAGE_BLOB_BYTES = 4 * MAX_CHUNK_BYTES
# The largest websocket message a controller accepts from the kernel: the largest reply
# envelope, the blobs beside it, and headroom for the Jupyter message wrapped around them.
# A bigger one closes the connection (a hostile or broken server) instead of filling memory.
MAX_KERNEL_MESSAGE_BYTES = MAX_REPLY_ENVELOPE_BYTES + MAX_MESSAGE_BLOB_BYTES + 1024 * 1024
# What a controller accepts in a decoded listing or manifest: more entries, or a longer
# name or path (a name is at most 255 bytes on common filesystems), is malformed or hostile.
MAX_MANIFEST_ENTRIES = 2000000
MAX_NAME_CHARS = 1024
MAX_PATH_CHARS = 32 * 1024

MSGPACK = "msgpack"
JSON = "json"


def available_codecs() -> List[str]:
    """Codecs this side can speak, best first."""
    return [MSGPACK, JSON] if _msgpack is not None else [JSON]


class ErrorCode:
    """Stable error codes carried in error replies; clients branch on these, never on text."""

    NOT_FOUND = "not_found"
    INVALID_ARGUMENT = "invalid_argument"
    CONFLICT = "conflict"
    BUSY = "busy"
    INTERNAL = "internal"
    UNKNOWN_OP = "unknown_op"
    MALFORMED = "malformed"
    PERMISSION_DENIED = "permission_denied"
    TOO_LARGE = "too_large"
    TIMEOUT = "timeout"
    IS_A_DIRECTORY = "is_a_directory"
    NOT_A_DIRECTORY = "not_a_directory"


class Op:
    """Every op name the supervisor answers, one constant each (the ``op`` of a request)."""

    # the supervisor itself (supervisor.py)
    HELLO = "hello"
    PING = "ping"
    EVENTS_SINCE = "events_since"
    OPS = "ops"
    # host facts (hostinfo.py)
    ENV_SNAPSHOT = "env_snapshot"
    # small files (fs_ops.py)
    FS_LIST = "fs_list"
    FS_STAT = "fs_stat"
    FS_READ = "fs_read"
    FS_WRITE = "fs_write"
    FS_MKDIR = "fs_mkdir"
    FS_REMOVE = "fs_remove"
    # resumable transfers (uploads.py, downloads.py)
    UPLOAD_BEGIN = "upload_begin"
    UPLOAD_CHUNK = "upload_chunk"
    UPLOAD_COMMIT = "upload_commit"
    DOWNLOAD_BEGIN = "download_begin"
    DOWNLOAD_CHUNK = "download_chunk"
    DOWNLOAD_END = "download_end"
    DOWNLOAD_HASH = "download_hash"
    # directory sync (tree_sync.py)
    MANIFEST = "manifest"
    BATCH_WRITE = "batch_write"
    SYNC_DELETE = "sync_delete"
    BATCH_READ = "batch_read"
    # jobs (jobs.py, follow.py, run_commands.py)
    JOB_START = "job_start"
    JOB_STATUS = "job_status"
    JOB_LIST = "job_list"
    JOB_TAIL = "job_tail"
    JOB_WAIT = "job_wait"
    JOB_KILL = "job_kill"
    JOB_FOLLOW = "job_follow"
    JOB_FOLLOW_ACK = "job_follow_ack"
    JOB_UNFOLLOW = "job_unfollow"
    RUN_COMMANDS = "run_commands"
    # code in a work kernel on this host, over its ZMQ ports (kernel_exec.py)
    KERNEL_EXEC = "kernel_exec"
    # usage of the host, GPUs and jobs (resources.py)
    RESOURCES = "resources"
    # forwarded TCP streams (streams.py)
    STREAM_OPEN = "stream_open"
    STREAM_WRITE = "stream_write"
    STREAM_ACK = "stream_ack"
    STREAM_CLOSE = "stream_close"
    STREAM_SYNC = "stream_sync"

    @classmethod
    def names(cls) -> List[str]:
        """Every op name, sorted."""
        return sorted(v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str))


class OpError(Exception):
    """Raised by an op handler to send a typed error reply."""

    def __init__(self, code: str, message: str, details: Optional[Dict[str, Any]] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class DecodeError(ValueError):
    """The bytes are not a valid envelope."""


def encode(envelope: Dict[str, Any], codec: str = MSGPACK) -> bytes:
    """Encode an envelope; falls back to JSON when msgpack is not available."""
    if codec == MSGPACK and _msgpack is not None:
        return _msgpack.packb(envelope, use_bin_type=True)
    return json.dumps(envelope, separators=(",", ":"), default=_json_default).encode("utf-8")


def decode(data: Any, max_bytes: int = MAX_ENVELOPE_BYTES) -> Tuple[Dict[str, Any], str]:
    """Decode an envelope, returning it and the codec it used. Raises DecodeError.

    The supervisor keeps the default cap on what clients send; the controller passes a
    larger one for replies it asked for (a big manifest, say).
    """
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise DecodeError("envelope must be bytes, got %s" % type(data).__name__)
    if len(data) == 0:
        raise DecodeError("empty envelope")
    if len(data) > max_bytes:
        raise DecodeError("envelope of %d bytes exceeds %d" % (len(data), max_bytes))
    try:
        if data[:1] == b"{":
            value = json.loads(bytes(data).decode("utf-8"))
            codec = JSON
        else:
            if _msgpack is None:
                raise DecodeError("msgpack envelope but msgpack is not installed here")
            value = _msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
            codec = MSGPACK
    except DecodeError:
        raise
    except Exception as exc:  # any parser failure is the sender's fault
        raise DecodeError("undecodable envelope: %s" % exc) from None
    if not isinstance(value, dict):
        raise DecodeError("envelope must be a map, got %s" % type(value).__name__)
    return value, codec


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("bytes belong in buffers, not in a JSON envelope")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError("not JSON serialisable: %r" % type(value).__name__)


def request(request_id: Union[int, str], op: str, args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return {"type": "request", "id": request_id, "op": op, "args": args or {}}


def reply_ok(request_id: Any, result: Any) -> Dict[str, Any]:
    return {"type": "reply", "id": request_id, "ok": True, "result": result}


def reply_error(
    request_id: Any, code: str, message: str, details: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    return {
        "type": "reply",
        "id": request_id,
        "ok": False,
        "error": {"code": code, "message": message, "details": details or {}},
    }


def event(seq: int, name: str, body: Dict[str, Any]) -> Dict[str, Any]:
    return {"type": "event", "seq": seq, "event": name, "body": body}


# --- argument checking helpers, shared by every op handler -------------------------------

_MISSING = object()


def arg(
    args: Dict[str, Any],
    name: str,
    kind: Any,
    default: Any = _MISSING,
    *,
    allow_none: bool = False,
) -> Any:
    """Fetch and type-check one argument, raising a clear ``invalid_argument`` error."""
    if name not in args or (args[name] is None and not allow_none):
        if default is _MISSING:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "missing required argument %r" % name)
        return default
    value = args[name]
    if value is None and allow_none:
        return None
    # bool is an int subclass: never accept True where a number is wanted.
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    elif float in kinds and isinstance(value, int):
        ok = True
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = "/".join(k.__name__ for k in kinds)
        raise OpError(
            ErrorCode.INVALID_ARGUMENT,
            "argument %r must be %s, got %s" % (name, names, type(value).__name__),
        )
    return value
