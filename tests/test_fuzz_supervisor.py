"""The supervisor answers abuse with errors and keeps serving: hypothesis fuzz, then a real kernel.

In-process, every example feeds the Supervisor one hostile input (random bytes, random maps
in msgpack or JSON, requests with wrong types, unknown ops, huge sizes and offsets, chunks
out of order) and then checks that it still answers ``ping``, that a request with a usable
id got exactly one reply, and that no input made an op fail with an internal error.

Safety: the fuzzed ops run for real in a temporary root. Random text never contains ``/``,
``.`` or ``~`` (so no path can leave that root), and the ops that run commands only ever get
wrongly typed commands. The root holds special files (FIFOs, a socket, a link to
``/dev/zero``) that reads must refuse at once rather than block a worker forever.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jupyter_tether import AsyncTether
from jupyter_tether.agent_payload import wire
from jupyter_tether.controller.embedded import LocalJupyterServer

from .conftest import fast_options
from .inprocess import InProcess

KNOWN_CODES = {value for name, value in vars(wire.ErrorCode).items() if name.isupper()}
#: ops that run shell commands: only ever fed wrongly typed commands
COMMAND_OPS = {"job_start", "run_commands"}
#: slow by nature (pip freeze, nvidia-smi): left out of the random mix
SLOW_OPS = {"env_snapshot"}
ARG_NAMES = ["path", "offset", "size", "sha256", "chunk_size", "transfer_id", "length",
             "max_bytes", "max_entries", "text", "data", "job_id", "cwd", "timeout", "signal",
             "grace", "lines", "seq", "protocol", "window", "state", "limit", "make_dirs",
             "parents", "recursive", "missing_ok", "mode", "mtime_ns", "hash", "defer_hash", "as_blob",
             "excludes", "paths", "files", "prune_empty_dirs", "idempotency_key", "name",
             "env_overrides", "log_path", "fail_fast", "timeout_s_per_command",
             "max_output_chars", "root", "subscriber"]
#: the arguments each op reads, so that examples reach past "missing argument"
OP_ARGS = {
    "fs_list": ["path", "max_entries"], "fs_stat": ["path"],
    "fs_read": ["path", "offset", "max_bytes"], "fs_write": ["path", "text", "make_dirs"],
    "fs_mkdir": ["path", "parents"], "fs_remove": ["path", "recursive", "missing_ok"],
    "upload_begin": ["path", "size", "sha256", "chunk_size", "transfer_id"],
    "upload_chunk": ["transfer_id", "offset"], "upload_commit": ["transfer_id"],
    "download_begin": ["path", "hash", "defer_hash", "transfer_id"],
    "download_chunk": ["transfer_id", "offset", "length", "path"],
    "download_end": ["transfer_id"], "download_hash": ["transfer_id"],
    "manifest": ["path", "hash", "as_blob", "excludes"],
    "batch_write": ["files", "root", "make_dirs"],
    "sync_delete": ["paths", "root", "prune_empty_dirs"],
    "batch_read": ["paths", "max_bytes", "root"],
    "job_status": ["job_id"], "job_unfollow": ["job_id", "subscriber"],
    "job_tail": ["job_id", "offset", "lines", "max_bytes"], "job_wait": ["job_id", "timeout"],
    "job_kill": ["job_id", "signal", "grace"],
    "job_follow": ["job_id", "offset", "window", "subscriber"],
    "job_follow_ack": ["job_id", "offset", "subscriber"], "job_list": ["state", "limit"],
    "events_since": ["seq"], "hello": ["protocol"],
}
#: live objects the fixture creates, so that ops on them get hostile offsets and sizes
UPLOAD_ID, DOWNLOAD_ID = "fuzz-upload", "fuzz-download"
#: special files in the root (made by the harness, remade when an op replaced them)
SPECIAL_FILES = ["fifo", "sub_dir/fifo", "fifo_link", "sock", "zero"]
KNOWN_JOBS: list[str] = []
EXAMPLES = 300


# --- the in-process target ------------------------------------------------------------------


class FuzzTarget(InProcess):
    """An in-process supervisor with live targets and special files in its root."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._pings = itertools.count(1)
        self._socket: socket.socket | None = None

    def make_special_files(self) -> None:
        """FIFOs, a socket and a link to a device in the root, each remade if an op replaced it."""
        def kind(rel: str) -> int:
            try:
                return os.lstat(self.root / rel).st_mode
            except OSError:
                return 0

        def clear(rel: str) -> None:
            path = self.root / rel
            if path.is_dir() and not path.is_symlink():
                import shutil
                shutil.rmtree(path)
            elif os.path.lexists(path):
                path.unlink()

        if not hasattr(os, "mkfifo"):
            return
        for rel in ("fifo", "sub_dir/fifo"):
            if not stat.S_ISFIFO(kind(rel)):
                clear(rel)
                (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.mkfifo(self.root / rel)
        for rel, target in (("fifo_link", "fifo"), ("zero", "/dev/zero")):
            if not stat.S_ISLNK(kind(rel)) or os.readlink(self.root / rel) != target:
                clear(rel)
                (self.root / rel).symlink_to(target)
        sock_path = str(self.root / "sock")
        if hasattr(socket, "AF_UNIX") and len(sock_path) < 100 and not stat.S_ISSOCK(kind("sock")):
            clear("sock")
            if self._socket is not None:
                self._socket.close()
            self._socket = socket.socket(socket.AF_UNIX)
            self._socket.bind(sock_path)

    def replies_to(self, request_id: Any, timeout: float) -> list[dict[str, Any]]:
        """Every reply envelope to ``request_id``, once at least one came."""
        return [envelope for envelope, _ in self.take(request_id, timeout)]

    def assert_alive(self) -> None:
        ping_id = f"alive-{next(self._pings)}"
        self.submit("ping", request_id=ping_id)
        (reply,) = self.replies_to(ping_id, 5)
        assert reply["ok"] and reply["result"]["pong"] is True

    def envelope(self, op: str, args: dict[str, Any],
                 buffers: tuple[bytes, ...] = ()) -> dict[str, Any]:
        return self.request(op, args, buffers, timeout=15)[0]

    def prepare_targets(self) -> list[str]:
        """An upload and a download in progress, and a finished job; returns the job ids."""
        data = bytes(range(256)) * 4096
        (self.root / "data.bin").write_bytes(data)
        self.make_special_files()
        begun = self.envelope("upload_begin", {"path": "up.bin", "size": len(data),
                                               "sha256": "0" * 64, "transfer_id": UPLOAD_ID})
        assert begun["ok"], begun
        down = self.envelope("download_begin", {"path": "data.bin", "transfer_id": DOWNLOAD_ID})
        assert down["ok"], down
        job = self.envelope("job_start", {"command": "echo fuzz target", "idempotency_key": "t"})
        assert job["ok"], job
        job_id = job["result"]["job_id"]
        assert self.envelope("job_wait", {"job_id": job_id, "timeout": 10})["ok"]
        return [job_id]

    def close(self) -> None:
        super().close()
        if self._socket is not None:
            self._socket.close()


def usable_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    h = FuzzTarget(tmp_path_factory.mktemp("fuzz-root"))
    KNOWN_JOBS[:] = h.prepare_targets()
    yield h
    h.close()


# --- strategies ------------------------------------------------------------------------------

# No "/", "." or "~": a random string can never name a path outside the root.
_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)  # not encodable as UTF-8
safe_text = st.text(st.characters(blacklist_characters="/.~\\", blacklist_categories=_SURROGATES),
                    min_size=1, max_size=24)
safe_path = st.from_regex(r"[a-z0-9_]{1,10}(/[a-z0-9_]{1,10}){0,2}", fullmatch=True)
#: a path in the root, now and then one of the special files
some_path = st.one_of(safe_path, safe_path, st.sampled_from(SPECIAL_FILES))
huge_ints = st.sampled_from([-(2**63), -1, 2**31, 2**32 + 7, 2**40, 2**53 + 1, 2**62,
                             2**63 - 1, 2**64 - 1])
msgpack_ints = st.integers(-(2**63), 2**64 - 1)
scalars = st.one_of(st.none(), st.booleans(), msgpack_ints, huge_ints,
                    st.floats(allow_nan=True, allow_infinity=True), safe_text,
                    st.binary(max_size=32))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(ARG_NAMES), safe_text),
                                            inner, max_size=4)),
    max_leaves=12,
)


def encode(envelope: Any, codec: str) -> bytes:
    if codec == "msgpack":
        return bytes(msgpack.packb(envelope, use_bin_type=True))
    return json.dumps(envelope, default=lambda v: v.hex()).encode()


sizes = st.one_of(st.integers(-(2**20), 2**22), huge_ints)
#: a plausibly typed value per argument name, so that fuzzing reaches past the type checks
plausible: dict[str, st.SearchStrategy[Any]] = {
    "path": some_path, "cwd": safe_path, "log_path": safe_path,
    "root": st.one_of(st.just(""), safe_path), "subscriber": safe_text,
    "offset": sizes, "size": sizes, "length": sizes, "max_bytes": sizes, "chunk_size": sizes,
    "max_entries": sizes, "lines": sizes, "limit": sizes, "seq": sizes, "window": sizes,
    "max_output_chars": sizes, "mtime_ns": sizes, "mode": sizes, "signal": st.integers(-5, 80),
    "protocol": st.integers(-1, 3),
    "timeout": st.floats(-1, 0.2), "grace": st.floats(-1, 0.2),
    "timeout_s_per_command": st.floats(-1, 0.2),
    "sha256": st.one_of(st.from_regex(r"[0-9a-f]{64}", fullmatch=True), safe_text),
    "transfer_id": st.one_of(st.sampled_from([UPLOAD_ID, DOWNLOAD_ID]),
                             st.from_regex(r"[A-Za-z0-9_-]{1,70}", fullmatch=True), safe_text),
    "job_id": st.one_of(st.deferred(lambda: st.sampled_from(KNOWN_JOBS or ["jnone"])),
                        st.from_regex(r"j[0-9a-f]{0,12}", fullmatch=True)),
    "paths": st.lists(some_path, max_size=3),
    "files": st.lists(st.fixed_dictionaries({"path": some_path, "size": sizes}), max_size=3),
    "excludes": st.lists(safe_text, max_size=3),
    "env_overrides": st.dictionaries(safe_text, st.one_of(st.none(), safe_text), max_size=2),
    "text": safe_text, "data": st.binary(max_size=64), "name": safe_text,
    "idempotency_key": safe_text, "state": st.sampled_from(["running", "exited", "x"]),
}


@st.composite
def arguments(draw: st.DrawFn, op: Any) -> Any:
    args: dict[str, Any] = {}
    names = list(OP_ARGS.get(op, [])) if isinstance(op, str) else []
    names += draw(st.lists(st.sampled_from(ARG_NAMES), max_size=3, unique=True))
    for name in names:
        if name in args or not draw(st.sampled_from([True, True, True, False])):
            continue
        strategy = plausible.get(name, values)
        args[name] = draw(st.one_of(strategy, strategy, values))
    if isinstance(op, str) and op in COMMAND_OPS:
        # Never a runnable command: these must fail on the type check.
        args["command"] = draw(st.one_of(st.none(), st.integers(), st.booleans()))
        args["commands"] = draw(st.one_of(st.none(), st.integers(), safe_text))
    return args


@st.composite
def requests(draw: st.DrawFn, ops: list[str]) -> tuple[bytes, list[bytes]]:
    """A request: mostly well formed with hostile arguments, sometimes a hostile envelope."""
    op: Any = draw(st.sampled_from(ops))
    request_id: Any = draw(st.integers(1, 2**62))
    args: Any = draw(arguments(op))
    envelope: dict[Any, Any] = {"type": "request", "id": request_id, "op": op, "args": args}
    if draw(st.sampled_from([False, False, False, True])):
        # A hostile envelope: any field of any type, or missing.
        field = draw(st.sampled_from(["type", "id", "op", "args"]))
        if draw(st.booleans()):
            envelope.pop(field)
        else:
            envelope[field] = draw(st.one_of(values, safe_text))
    codec = draw(st.sampled_from(["msgpack", "json"]))
    try:
        data = encode(envelope, codec)
    except (OverflowError, TypeError, ValueError):
        data = encode(envelope, "json")
    buffers = draw(st.lists(st.binary(max_size=64), max_size=3))
    return data, buffers


# --- in-process fuzz ------------------------------------------------------------------------


def fuzzable_ops(h: FuzzTarget) -> list[str]:
    return [op for op in h.ok("ops", timeout=5) if op not in SLOW_OPS]


def check_reply(h: FuzzTarget, request_id: Any, wanted: bool) -> None:
    if not wanted:
        return
    replies = h.replies_to(request_id, 15)
    time.sleep(0)  # let a (wrong) second reply show up before counting
    assert len(replies) == 1, f"exactly one reply per request, got {replies}"
    reply = replies[0]
    if not reply["ok"]:
        error = reply["error"]
        assert error["code"] in KNOWN_CODES, error
        assert error["code"] != "internal", f"bad input must not be an internal error: {error}"


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_requests_get_errors_and_supervisor_keeps_serving(harness: FuzzTarget,
                                                                 data: st.DataObject) -> None:
    harness.make_special_files()
    ops = fuzzable_ops(harness)
    envelope, buffers = data.draw(requests(ops))
    try:
        decoded, _ = wire.decode(envelope)
        sent_id = decoded.get("id")  # what the supervisor sees (after a JSON round trip)
        answerable = decoded.get("type") == "request" and usable_id(sent_id)
    except wire.DecodeError:
        sent_id, answerable = None, False
    harness.send_raw(envelope, buffers, "fuzz")
    check_reply(harness, sent_id, answerable)
    harness.assert_alive()
    harness.clear_replies()  # replies to unusable ids have nobody to go to


def test_every_op_meets_every_special_file_with_a_prompt_reply(harness: FuzzTarget) -> None:
    """FIFOs, sockets and devices: an answer within seconds, never a worker blocked forever."""
    ops = [op for op in fuzzable_ops(harness) if op not in COMMAND_OPS]
    for special in SPECIAL_FILES:
        for op in ops:
            harness.make_special_files()
            args = {"path": special, "paths": [special], "root": "", "offset": 0,
                    "length": 16, "size": 4, "sha256": "0" * 64, "text": "x"}
            reply = harness.envelope(op, args)  # waits 15 s at most, far above a prompt answer
            if not reply["ok"]:
                assert reply["error"]["code"] != "internal", (op, special, reply["error"])
            if op in ("fs_read", "download_begin", "download_chunk"):
                assert not reply["ok"] and "not a regular file" in reply["error"]["message"], \
                    (op, special, reply)
    harness.assert_alive()


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=512),
                     st.binary(max_size=64).map(lambda b: b"{" + b),
                     st.builds(lambda v: encode(v, "msgpack"), values),
                     st.builds(lambda v: encode(v, "json"), values)),
       buffers=st.lists(st.binary(max_size=32), max_size=2))
def test_random_bytes_and_maps_never_break_the_supervisor(harness: FuzzTarget, raw: bytes,
                                                          buffers: list[bytes]) -> None:
    before = harness.supervisor.counters["requests"]
    harness.send_raw(raw, buffers, "fuzz")
    assert harness.supervisor.counters["requests"] == before + 1
    harness.assert_alive()
    harness.clear_replies()  # replies to random ids have nobody to go to


def test_oversized_envelope_and_non_bytes_are_refused(harness: FuzzTarget) -> None:
    big = wire.encode(wire.request(1, "ping", {"pad": "x" * (wire.MAX_ENVELOPE_BYTES + 10)}))
    for hostile in (big, memoryview(b"\x91\x01"), "a str", 12345, None):
        harness.send_raw(hostile, [], "fuzz")
        (reply,) = harness.replies_to(None, 5)
        assert reply["ok"] is False and reply["error"]["code"] == "malformed"
    harness.assert_alive()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), payload=st.binary(min_size=1, max_size=20_000))
def test_upload_chunks_in_any_order_with_repeats_give_the_exact_file(
        harness: FuzzTarget, data: st.DataObject, payload: bytes) -> None:
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(payload) - 1)),
                                         max_size=8))) - {len(payload)})
    bounds = list(zip([0, *cuts], [*cuts, len(payload)], strict=True))
    order = data.draw(st.permutations(bounds))
    repeats = data.draw(st.lists(st.sampled_from(bounds), max_size=3))
    target = f"uploads/{data.draw(st.from_regex(r'[a-z]{1,8}', fullmatch=True))}.bin"
    call = harness.envelope

    begun = call("upload_begin", {"path": target, "size": len(payload),
                                  "sha256": sha256(payload)})
    assert begun["ok"], begun
    transfer_id = begun["result"]["transfer_id"]
    # Out of the file's bounds: refused, and the upload is unharmed.
    outside = call("upload_chunk", {"transfer_id": transfer_id, "offset": len(payload)},
                   (b"xx",))
    assert outside["error"]["code"] == "invalid_argument"
    early = None
    for index, (start, end) in enumerate([*order, *repeats]):
        reply = call("upload_chunk", {"transfer_id": transfer_id, "offset": start},
                     (payload[start:end],))
        assert reply["ok"], reply
        if index == 0 and len(bounds) > 1:
            early = call("upload_commit", {"transfer_id": transfer_id})
    if early is not None:
        assert early["error"]["code"] == "conflict", "commit before all chunks is refused"
    committed = call("upload_commit", {"transfer_id": transfer_id})
    assert committed["ok"], committed
    assert (harness.root / target).read_bytes() == payload
    harness.assert_alive()


# --- through a real kernel ------------------------------------------------------------------


@pytest.mark.anyio
async def test_garbage_and_fifty_rpcs_during_twenty_chatty_jobs_keep_supervisor_serving(
        jupyter_server: LocalJupyterServer) -> None:
    lines = 20_000
    chatty = f"python3 -c \"import sys\nfor i in range({lines}): print('chatty', i)\""
    async with AsyncTether(jupyter_server.url, jupyter_server.token,
                           options=fast_options()) as t:
        link = t.link
        pid = link.facts["pid"]
        jobs = [await t.jobs.start(chatty) for _ in range(20)]
        sock = link._sock
        assert sock is not None
        garbage = [b"\xc1garbage", b"{not json", b"[1,2]", b"\x81\xa2id\xc0",
                   wire.encode({"type": "request", "id": 1, "op": 7, "args": []}),
                   wire.encode(wire.request(2**62, "upload_chunk", {"offset": -5})),
                   wire.encode(wire.request(3, "fs_read", {"path": 42, "offset": 2**63 - 1}))]
        for payload in garbage:
            await sock.send(sock.build("comm_msg", {"comm_id": link.comm_id,
                                                    "data": {"tether": 1}}), [payload])
        await sock.send(sock.build("comm_msg", {"comm_id": link.comm_id, "data": {}}))
        await sock.send(sock.build("comm_msg", {"comm_id": "no-such-comm",
                                                "data": {"tether": 1}}), [b"\x00"])
        rtts: list[float] = []

        async def ping() -> None:
            started = anyio.current_time()
            reply = await link.call("ping", timeout=30)
            assert reply.result["pong"] is True
            rtts.append(anyio.current_time() - started)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(ping)
            follow = b"".join([chunk async for chunk in jobs[-1].follow()])
            for job in jobs:
                assert (await job.wait(60)).exit_code == 0
        rtts.sort()
        print(f"\n[fuzz] 50 pings during 20 chatty jobs: median {rtts[25] * 1000:.1f} ms, "
              f"max {rtts[-1] * 1000:.1f} ms")
        assert len(rtts) == 50
        assert follow.decode().splitlines() == [f"chatty {i}" for i in range(lines)]
        assert (await link.call("ping")).result["pong"]
        assert link.facts["pid"] == pid and link.connected
        assert link.reconnects == 0, "garbage must not have cost us the connection"
