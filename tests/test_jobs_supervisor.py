"""The jobs service driven in-process through the Supervisor: no kernel, real processes."""

from __future__ import annotations

import functools
import json
import os
import resource
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jupyter_tether.agent_payload import follow, procs

from .conftest import gated
from .inprocess import InProcess

PY = shlex.quote(sys.executable)


def start(h: InProcess, command: str, **args: Any) -> dict[str, Any]:
    result: dict[str, Any] = h.ok("job_start", {"command": command, **args})
    return result


@pytest.fixture
def h(tmp_path: Path) -> Any:
    harness = InProcess(tmp_path)
    yield harness
    harness.close()


def _alive(pid: int) -> bool:
    """Alive and not a zombie (an orphan may wait a while for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:].split()[0] not in (b"Z", b"X")


def _until(pred: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_failing_job_exit_code_log_and_exit_event(h: InProcess, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    job = start(h, "echo out; echo err >&2; echo $FOO; pwd; exit 7", cwd="sub",
                  env_overrides={"FOO": "bar"}, name="failing")
    assert job["state"] in ("running", "exited") and job["reused"] is False
    assert job["log_path"] == str(tmp_path / "logs" / f"job-{job['job_id']}.log")
    assert job["job_id"].startswith("j") and len(job["job_id"]) == 11
    done = h.ok("job_wait", {"job_id": job["job_id"], "timeout": 10})
    assert done["timed_out"] is False
    assert (done["state"], done["exit_code"]) == ("exited", 7)
    assert done["ended_at"] >= done["started_at"] and done["name"] == "failing"
    log = (tmp_path / "logs" / f"job-{job['job_id']}.log").read_text()
    assert log == f"out\nerr\nbar\n{tmp_path / 'sub'}\n"
    assert done["bytes_written"] == len(log)
    event = h.wait_event(lambda e: e["event"] == "job_exit")
    assert event["body"] == {"job_id": job["job_id"], "state": "exited", "exit_code": 7,
                             "ended_at": done["ended_at"], "size": len(log)}
    time.sleep(0.2)  # announced once only
    assert sum(e["event"] == "job_exit" for e, _ in h.events) == 1
    listed = h.ok("job_list")
    assert [j["job_id"] for j in listed["jobs"]] == [job["job_id"]]
    ok = start(h, "true", log_path="custom/out.log")
    assert ok["log_path"] == str(tmp_path / "custom" / "out.log")
    assert h.ok("job_wait", {"job_id": ok["job_id"], "timeout": 10})["exit_code"] == 0
    assert [j["job_id"] for j in h.ok("job_list")["jobs"]] == [ok["job_id"], job["job_id"]]


def test_jobs_start_in_a_supervisor_holding_more_than_1024_fds(h: InProcess) -> None:
    # A long-lived supervisor (forwarded connections, work kernels' ports) can pass 1024 open
    # fds; the wrapper's pipe then gets a number that select() refuses ("filedescriptor out
    # of range"), and every job_start failed. The in-process supervisor shares our fds.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"the hard fd limit here is {hard}; this test holds 1,100 fds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(4096, hard)), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        job = start(h, "echo many")
        done = h.ok("job_wait", {"job_id": job["job_id"], "timeout": 10})
        assert (done["state"], done["exit_code"]) == ("exited", 0)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idempotent_start_runs_once_even_across_supervisors(h: InProcess, tmp_path: Path) -> None:
    command = "echo ran >> counter.txt; sleep 0.3"
    first = start(h, command, idempotency_key="key-1")
    second = start(h, command, idempotency_key="key-1")
    assert second["job_id"] == first["job_id"] and second["reused"] is True
    h.ok("job_wait", {"job_id": first["job_id"], "timeout": 10})
    other = InProcess(tmp_path)  # a later supervisor on the same state dir
    try:
        third = start(other, command, idempotency_key="key-1")
        assert third["job_id"] == first["job_id"] and third["state"] == "exited"
        conflict = other.err("job_start", {"command": "echo else", "idempotency_key": "key-1"})
        assert conflict["code"] == "conflict"
    finally:
        other.close()
    assert (tmp_path / "counter.txt").read_text() == "ran\n"
    fresh = start(h, command, idempotency_key="key-2")
    assert fresh["job_id"] != first["job_id"]


def test_follow_100k_lines_every_line_once_in_order(h: InProcess) -> None:
    script = "import sys\nfor i in range(100000): sys.stdout.write('%d\\n' % i)"
    job = start(h, f"{PY} -c {shlex.quote(script)}")
    job_id = job["job_id"]
    sub = h.ok("job_follow", {"job_id": job_id, "offset": 0, "window": 64 * 1024})
    assert sub["window"] == 64 * 1024
    received = bytearray()
    seen = 0
    exit_body = None
    deadline = time.monotonic() + 20
    while exit_body is None:
        assert time.monotonic() < deadline, "follow did not finish"
        h.wait_for(functools.partial(_more_than, h.events, seen), 1.0)
        batch = h.events[seen:]
        seen += len(batch)
        for envelope, blobs in batch:
            body = envelope["body"]
            if envelope["event"] == "log":
                assert len(blobs) == len(body["chunks"])
                for chunk, blob in zip(body["chunks"], blobs, strict=True):
                    assert chunk["job_id"] == job_id
                    assert chunk["offset"] == len(received), "gap or duplicate"
                    assert chunk["length"] == len(blob) <= follow.CHUNK_BYTES
                    received += blob
                h.ok("job_follow_ack", {"job_id": job_id, "offset": len(received)})
            elif envelope["event"] == "job_exit" and body["job_id"] == job_id:
                exit_body = body
    # Seen once in ~20 whole-suite runs under load: a job_exit with size 0 before the bytes
    # (unexplained); the events say which announcement it was if it comes back.
    assert exit_body["exit_code"] == 0 and exit_body["size"] == len(received), \
        [e for e, _ in h.events if e["event"] == "job_exit"]
    assert received.decode().splitlines() == [str(i) for i in range(100000)]
    seqs = [e["seq"] for e, _ in h.events]
    assert seqs == sorted(seqs)
    # the subscription is gone; a fresh follow from an offset replays from the file
    assert h.ok("job_follow_ack", {"job_id": job_id, "offset": 5})["followed"] is False
    mark = h.events[-1][0]["seq"]
    h.ok("job_follow", {"job_id": job_id, "offset": len(received) - 6})
    again = h.wait_event(lambda e: e["event"] == "job_exit" and e["seq"] > mark)
    assert again["body"]["size"] == len(received)
    replayed = [(c["offset"], b) for e, bs in h.events if e["event"] == "log" and e["seq"] > mark
                for c, b in zip(e["body"]["chunks"], bs, strict=True)]
    assert replayed == [(len(received) - 6, b"99999\n")]


def _more_than(items: list[Any], count: int) -> bool:
    return len(items) > count


def test_follow_window_bounds_what_is_in_flight(h: InProcess) -> None:
    job = start(h, f"{PY} -c {shlex.quote('import sys; sys.stdout.write(chr(120) * 300000)')}")
    job_id = job["job_id"]
    h.ok("job_wait", {"job_id": job_id, "timeout": 10})
    h.ok("job_follow", {"job_id": job_id, "offset": 1000, "window": 1})  # clamped to 64 KiB
    time.sleep(0.3)  # many ticks, no ack: one window and no more
    sent = sum(c["length"] for e, _ in h.events if e["event"] == "log"
               for c in e["body"]["chunks"])
    assert sent == follow.MIN_WINDOW
    h.ok("job_unfollow", {"job_id": job_id})
    assert h.ok("job_unfollow", {"job_id": job_id})["followed"] is False


def test_tail_lines_offsets_partial_line_and_binary(h: InProcess, tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(b"first\nsecond\n\xff\xfe raw \x00\nno newline")
    job = start(h, "cat data.bin")
    job_id = job["job_id"]
    h.ok("job_wait", {"job_id": job_id, "timeout": 10})

    def tail(**args: Any) -> tuple[dict[str, Any], bytes]:
        envelope, blobs = h.request("job_tail", {"job_id": job_id, **args})
        assert envelope["ok"], envelope
        assert len(blobs) == 1
        return envelope["result"], blobs[0]

    meta, data = tail(lines=1)
    assert data == b"no newline"
    assert (meta["offset_end"], meta["size"]) == (meta["offset_start"] + 10, 32)
    assert tail(lines=2)[1] == b"\xff\xfe raw \x00\nno newline"
    assert tail()[1] == b"first\nsecond\n\xff\xfe raw \x00\nno newline"
    assert tail(lines=0)[1] == b""
    meta, data = tail(offset=6, max_bytes=7)
    assert data == b"second\n" and meta["offset_start"] == 6 and meta["truncated"] is True
    meta, data = tail(offset=100)
    assert data == b"" and meta["offset_start"] == 32

    big = b"".join(b"line %06d\n" % i for i in range(30000))  # several scan blocks
    (tmp_path / "big.txt").write_bytes(big)
    job2 = start(h, "cat big.txt")["job_id"]
    h.ok("job_wait", {"job_id": job2, "timeout": 10})
    envelope, blobs = h.request("job_tail", {"job_id": job2, "lines": 3})
    assert blobs[0] == b"line 029997\nline 029998\nline 029999\n"
    envelope, blobs = h.request("job_tail", {"job_id": job2, "lines": 20000, "max_bytes": 100})
    assert envelope["result"]["truncated"] is True and blobs[0] == big[-100:]
    envelope, blobs = h.request("job_tail", {"job_id": job2, "lines": 29999})
    assert blobs[0] == big[len(b"line 000000\n"):]


@pytest.mark.parametrize("command", [
    # the shell and its child both ignore TERM
    "trap '' TERM; sleep 100 & echo $! > child.pid; wait",
    # the shell dies of TERM, its Python child ignores it and lives on in the group
    f"{PY} -c \"import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open('child.pid', 'w').write(str(os.getpid())); time.sleep(100)\" & wait",
])
def test_kill_ends_the_whole_group(h: InProcess, tmp_path: Path, command: str) -> None:
    job = start(h, command)
    child = int(_until(lambda: (tmp_path / "child.pid").exists()
                       and (tmp_path / "child.pid").read_text().strip()))
    time.sleep(0.1)  # let the child install its handler
    assert _alive(child)
    started = time.monotonic()
    killed = h.ok("job_kill", {"job_id": job["job_id"], "grace": 0.5})
    assert time.monotonic() - started < 5
    assert killed["state"] == "killed" and killed["signalled"] is True
    assert killed["escalated"] is True
    _until(lambda: not _alive(child), 5)
    again = h.ok("job_kill", {"job_id": job["job_id"]})
    assert again["state"] == "killed" and again["signalled"] is False
    event = h.wait_event(lambda e: e["event"] == "job_exit")
    assert event["body"]["state"] == "killed"


def test_kill_plain_job_with_term(h: InProcess) -> None:
    job = start(h, "sleep 100")
    killed = h.ok("job_kill", {"job_id": job["job_id"]})
    assert killed["state"] == "killed" and killed["escalated"] is False
    assert killed["exit_code"] in (-signal.SIGTERM, 128 + signal.SIGTERM)
    assert not _alive(job["pid"])

    # a non-fatal signal is delivered, but the job is not marked killed for it
    job = start(h, "trap 'echo got usr1' USR1; for i in 1 2 3 4 5 6; do sleep 0.1; done")
    time.sleep(0.15)
    sent = h.ok("job_kill", {"job_id": job["job_id"], "signal": int(signal.SIGUSR1)})
    assert sent["signalled"] is True and sent["state"] == "running"
    done = h.ok("job_wait", {"job_id": job["job_id"], "timeout": 10})
    assert (done["state"], done["exit_code"]) == ("exited", 0)
    assert "got usr1" in Path(done["log_path"]).read_text()


def test_new_supervisor_re_adopts_a_running_job(tmp_path: Path) -> None:
    first = InProcess(tmp_path)
    gate = tmp_path / "gate"
    job = start(first, gated(gate, "exit 3"))
    first.close()
    second = InProcess(tmp_path)
    try:
        hello = second.ok("hello")
        assert [j["job_id"] for j in hello["jobs"]] == [job["job_id"]]
        status = second.ok("job_status", {"job_id": job["job_id"]})
        assert status["state"] == "running" and status["pid"] == job["pid"]
        gate.touch()
        done = second.ok("job_wait", {"job_id": job["job_id"], "timeout": 10})
        assert (done["state"], done["exit_code"]) == ("exited", 3)
        event = second.wait_event(lambda e: e["event"] == "job_exit")
        assert event["body"]["exit_code"] == 3
        assert second.ok("hello")["jobs"] == []
    finally:
        second.close()


def _fake_job(state_dir: Path, job_id: str, **meta: Any) -> None:
    job_dir = state_dir / "jobs" / job_id
    job_dir.mkdir(parents=True)
    record = {"job_id": job_id, "command": "x", "cwd": str(state_dir),
              "log_path": str(state_dir / f"{job_id}.log"), "started_at": time.time(),
              "wrapper_pid": None, "wrapper_start": None}
    record.update(meta)
    (job_dir / "job.json").write_text(json.dumps(record))


def test_recycled_pid_is_not_our_job(tmp_path: Path) -> None:
    state = tmp_path / ".jupyter_tether"
    me = os.getpid()
    _fake_job(state, "jrecycled01", pid=me, pid_start="proc:1")
    _fake_job(state, "jgenuine001", pid=me, pid_start=procs.start_token(me))
    _fake_job(state, "jfinished01", pid=me, pid_start="proc:1")
    (state / "jobs" / "jfinished01" / "exit.json").write_text(
        json.dumps({"exit_code": 4, "signal": None, "ended_at": 1.0}))
    h = InProcess(tmp_path)
    try:
        states = {j["job_id"]: (j["state"], j["exit_code"]) for j in h.ok("job_list")["jobs"]}
        assert states == {"jrecycled01": ("lost", None), "jgenuine001": ("running", None),
                          "jfinished01": ("exited", 4)}
        assert h.ok("job_status", {"job_id": "jfinished01"})["ended_at"] == 1.0
        assert h.err("job_tail", {"job_id": "jrecycled01"})["code"] == "not_found"
        assert h.ok("job_kill", {"job_id": "jrecycled01"})["signalled"] is False
    finally:
        h.close()


def test_run_commands_fail_fast_truncation_timeout(h: InProcess, tmp_path: Path) -> None:
    res = h.ok("run_commands", {"commands": ["echo one; echo two >&2", "exit 3", "echo never"]})
    assert res["ok"] is False and len(res["results"]) == 2 and res["skipped"] == 1
    first, second = res["results"]
    assert (first["stdout"], first["stderr"], first["returncode"]) == ("one\n", "two\n", 0)
    assert second["returncode"] == 3 and second["timed_out"] is False

    res = h.ok("run_commands", {"commands": ["exit 3", "echo ran"], "fail_fast": False})
    assert [r["returncode"] for r in res["results"]] == [3, 0] and res["ok"] is False

    res = h.ok("run_commands", {"commands": [f"{PY} -c 'print(\"x\" * 50000 + \"END\")'"],
                                "max_output_chars": 1000})
    out = res["results"][0]["stdout"]
    assert res["ok"] is True
    assert out.startswith("[... 49004 chars truncated ...]\n") and out.endswith("xEND\n")
    assert len(out.split("\n", 1)[1]) == 1000

    (tmp_path / "d").mkdir()
    started = time.monotonic()
    res = h.ok("run_commands", {"commands": ["sleep 30 & sleep 30", "echo skipped"],
                                "timeout_s_per_command": 0.5})
    assert time.monotonic() - started < 10
    only = res["results"]
    assert len(only) == 1 and only[0]["timed_out"] is True and res["ok"] is False
    res = h.ok("run_commands", {"commands": ["pwd; echo $V"], "cwd": "d",
                                "env_overrides": {"V": "v1"}})
    assert res["results"][0]["stdout"] == f"{tmp_path / 'd'}\nv1\n"


def test_bad_arguments_get_clear_errors(h: InProcess) -> None:
    def code(op: str, args: dict[str, Any]) -> str:
        return h.err(op, args)["code"]

    error = h.err("job_status", {"job_id": "jdeadbeef00"})
    assert error["code"] == "not_found" and "jdeadbeef00" in error["message"]
    assert code("job_status", {"job_id": "../../etc"}) == "not_found"
    assert code("job_status", {"job_id": 5}) == "invalid_argument"
    assert code("job_status", {}) == "invalid_argument"
    assert code("job_start", {}) == "invalid_argument"
    assert code("job_start", {"command": "  "}) == "invalid_argument"
    assert code("job_start", {"command": ["ls"]}) == "invalid_argument"
    assert code("job_start", {"command": "true", "cwd": "missing"}) == "not_found"
    assert code("job_start", {"command": "true", "env_overrides": "A=1"}) == "invalid_argument"
    assert code("job_start", {"command": "true", "env_overrides": {"A": 1}}) == "invalid_argument"
    assert code("job_start", {"command": "true", "idempotency_key": 7}) == "invalid_argument"
    assert code("run_commands", {"commands": "echo"}) == "invalid_argument"
    assert code("run_commands", {"commands": ["echo", 3]}) == "invalid_argument"
    assert code("run_commands", {"commands": [], "timeout_s_per_command": -1}) == (
        "invalid_argument")
    job = start(h, "sleep 0.1")["job_id"]
    assert code("job_tail", {"job_id": job, "lines": -1}) == "invalid_argument"
    assert code("job_tail", {"job_id": job, "lines": 1, "offset": 0}) == "invalid_argument"
    assert code("job_tail", {"job_id": job, "lines": True}) == "invalid_argument"
    assert code("job_kill", {"job_id": job, "signal": 0}) == "invalid_argument"
    assert code("job_kill", {"job_id": job, "signal": 9999}) == "invalid_argument"
    assert code("job_kill", {"job_id": job, "grace": "soon"}) == "invalid_argument"
    assert code("job_wait", {"job_id": job, "timeout": "x"}) == "invalid_argument"
    assert code("job_wait", {"job_id": job, "timeout": -1}) == "invalid_argument"
    assert code("job_follow", {"job_id": job, "offset": -1}) == "invalid_argument"
    assert code("job_follow_ack", {"job_id": job}) == "invalid_argument"
    assert code("job_list", {"state": "weird"}) == "invalid_argument"
    assert h.ok("ping")["pong"] is True
    assert h.ok("job_wait", {"job_id": job, "timeout": 10})["exit_code"] == 0
    assert {"job_start", "job_follow", "run_commands"} <= set(h.ok("ops"))


def test_wait_times_out_and_close_leaves_jobs_running(tmp_path: Path) -> None:
    h = InProcess(tmp_path)
    job = start(h, "sleep 30")
    started = time.monotonic()
    waited = h.ok("job_wait", {"job_id": job["job_id"], "timeout": 0.2})
    assert waited["timed_out"] is True and waited["state"] == "running"
    assert time.monotonic() - started < 2
    h.close()
    assert _alive(job["pid"])
    os.killpg(job["pid"], signal.SIGKILL)


# --- idempotency keys left behind by a crash -------------------------------------------------


def _key_file(root: Path, key: str) -> Path:
    import hashlib

    keys = root / ".jupyter_tether" / "jobs" / "_keys"
    keys.mkdir(parents=True, exist_ok=True)
    return keys / hashlib.sha256(key.encode()).hexdigest()[:40]


@pytest.mark.parametrize("leftover", [b"", b"\x00\x00 half-written"])
def test_a_key_file_left_empty_by_a_crash_is_reclaimed_once_stale(
        h: InProcess, tmp_path: Path, leftover: bytes) -> None:
    key_file = _key_file(tmp_path, "crashed")
    key_file.write_bytes(leftover)  # a start died between creating the key and writing it
    # Fresh, it may be another supervisor's claim in progress: busy, retry.
    assert h.err("job_start", {"command": "echo once", "idempotency_key": "crashed"})[
        "code"] == "busy"
    old = time.time() - 3600  # far beyond any claim in progress
    os.utime(key_file, (old, old))
    first = start(h, "echo once", idempotency_key="crashed")
    assert first["reused"] is False
    assert key_file.read_text() == first["job_id"]
    again = start(h, "echo once", idempotency_key="crashed")
    assert again["job_id"] == first["job_id"] and again["reused"] is True
    assert sorted(p.name for p in key_file.parent.iterdir()) == [key_file.name]


def test_a_failed_key_claim_leaves_no_key_behind(h: InProcess, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full_disk(src: Any, dst: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full_disk)
    assert h.err("job_start", {"command": "echo once", "idempotency_key": "full"})
    monkeypatch.undo()
    key_file = _key_file(tmp_path, "full")
    assert list(key_file.parent.iterdir()) == [], "no key, no temp file"
    job = start(h, "echo once", idempotency_key="full")  # the retry is not stuck on busy
    assert job["reused"] is False and key_file.read_text() == job["job_id"]


def test_keys_are_claimed_without_hard_links_too(h: InProcess, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def no_links(src: Any, dst: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    first = start(h, "echo once", idempotency_key="fat")
    again = start(h, "echo once", idempotency_key="fat")
    assert again["job_id"] == first["job_id"] and again["reused"] is True
    assert _key_file(tmp_path, "fat").read_text() == first["job_id"]


# --- follow: one subscription per (job, subscriber) ------------------------------------------


def test_two_subscribers_of_one_job_each_get_every_byte_with_their_own_window(
        h: InProcess) -> None:
    script = "import sys\nfor i in range(60000): sys.stdout.write('%d\\n' % i)"
    expected = "".join(f"{i}\n" for i in range(60000)).encode()
    job = start(h, f"{PY} -c {shlex.quote(script)}")
    job_id = job["job_id"]
    assert h.ok("job_wait", {"job_id": job_id, "timeout": 10})["bytes_written"] == len(expected)
    got: dict[str, bytearray] = {"a": bytearray(), "b": bytearray()}
    exits: dict[Any, dict[str, Any]] = {}
    seen = 0

    def drive(done: Callable[[], bool], acking: set[str]) -> None:
        nonlocal seen
        deadline = time.monotonic() + 20
        while not done():
            assert time.monotonic() < deadline, "follow did not finish"
            h.wait_for(functools.partial(_more_than, h.events, seen), 0.2)
            batch = h.events[seen:]
            seen += len(batch)
            for envelope, blobs in batch:
                body = envelope["body"]
                if envelope["event"] == "log":
                    for chunk, blob in zip(body["chunks"], blobs, strict=True):
                        assert chunk["job_id"] == job_id
                        who = chunk["subscriber"]
                        if who in got:
                            assert chunk["offset"] == len(got[who]), "gap or duplicate"
                            got[who] += blob
                    for who in acking:
                        h.ok("job_follow_ack", {"job_id": job_id, "subscriber": who,
                                                "offset": len(got[who])})
                elif envelope["event"] == "job_exit" and body["job_id"] == job_id:
                    exits[body.get("subscriber")] = body

    window = follow.MIN_WINDOW
    for who in ("a", "b"):
        sub = h.ok("job_follow", {"job_id": job_id, "subscriber": who, "offset": 0,
                                  "window": window})
        assert sub["subscriber"] == who and sub["offset"] == 0
    drive(lambda: "a" in exits, acking={"a"})  # b never acks: it stops at its window
    assert bytes(got["a"]) == expected and exits["a"]["size"] == len(expected)
    time.sleep(0.1)
    rounds = iter([False])
    drive(lambda: next(rounds, True), acking=set())  # take in whatever else came
    assert len(got["b"]) == window
    # A third follower's follow and unfollow leave b's subscription alone.
    h.ok("job_follow", {"job_id": job_id, "subscriber": "c", "offset": 1000, "window": 1})
    assert h.ok("job_unfollow", {"job_id": job_id, "subscriber": "c"})["followed"] is True
    state = h.ok("job_follow_ack", {"job_id": job_id, "subscriber": "b",
                                    "offset": len(got["b"])})
    assert state["followed"] is True and state["sent"] == state["acked"] == window
    drive(lambda: "b" in exits, acking={"b"})
    assert bytes(got["b"]) == expected and exits["b"]["size"] == len(expected)
    # The controller's old calls (no subscriber) are the "" subscription, unchanged.
    assert h.ok("job_unfollow", {"job_id": job_id})["followed"] is False
    mark = h.events[-1][0]["seq"]
    h.ok("job_follow", {"job_id": job_id, "offset": len(expected) - 6})
    h.wait_event(lambda e: e["event"] == "job_exit" and e["seq"] > mark)
    replayed = [(c["subscriber"], c["offset"], b) for e, bs in h.events
                if e["event"] == "log" and e["seq"] > mark
                for c, b in zip(e["body"]["chunks"], bs, strict=True)]
    assert replayed == [("", len(expected) - 6, b"59999\n")]
    h.err("job_follow", {"job_id": job_id, "subscriber": "x" * 1000})


def test_a_follow_stuck_on_a_full_window_expires(h: InProcess,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow, "FOLLOW_STALL_S", 0.3)
    script = "import sys, time; sys.stdout.write('x' * 300000); sys.stdout.flush(); time.sleep(30)"
    job = start(h, f"{PY} -c {shlex.quote(script)}")  # still running: no follow ever drains
    job_id = job["job_id"]
    try:
        _until(lambda: h.ok("job_status", {"job_id": job_id})["bytes_written"] == 300000)
        h.ok("job_follow", {"job_id": job_id, "subscriber": "gone", "window": 1})
        h.ok("job_follow", {"job_id": job_id, "subscriber": "live", "window": 1})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # "live" acks all it got, "gone" never acks
            live = h.ok("job_follow_ack", {"job_id": job_id, "subscriber": "live",
                                           "offset": 1 << 40})
            assert live["followed"] is True
            if not h.ok("job_follow_ack", {"job_id": job_id, "subscriber": "gone",
                                           "offset": 0})["followed"]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the stalled subscription never expired")
        time.sleep(0.5)  # all sent and acked: a quiet follow is not a stalled one
        live = h.ok("job_follow_ack", {"job_id": job_id, "subscriber": "live", "offset": 1 << 40})
        assert live["followed"] is True and live["acked"] == 300000
    finally:
        os.killpg(job["pid"], signal.SIGKILL)


# --- wait: no worker held ----------------------------------------------------------------------


def test_many_long_waits_hold_no_worker_and_all_get_answered(h: InProcess) -> None:
    job = start(h, "sleep 60")
    count = 48  # more than the supervisor's 32 workers
    ids = [f"wait-{index}" for index in range(count)]
    try:
        for rid in ids:
            h.submit("job_wait", {"job_id": job["job_id"], "timeout": 60}, request_id=rid)
        time.sleep(0.2)
        started = time.monotonic()
        quick = h.ok("job_start", {"command": "echo hi"}, timeout=5)  # a blocking op
        assert h.ok("job_tail", {"job_id": quick["job_id"]}, timeout=5)
        assert time.monotonic() - started < 5
        assert not any(h.has_reply(rid) for rid in ids), "a wait answered early"
        killed = h.ok("job_kill", {"job_id": job["job_id"], "signal": 9}, timeout=10)
        assert killed["state"] == "killed"
        answers = [h.wait(rid, 5)[0] for rid in ids]
        assert all(a["ok"] and a["result"]["state"] == "killed"
                   and a["result"]["timed_out"] is False for a in answers)
    finally:
        if _alive(job["pid"]):
            os.killpg(job["pid"], signal.SIGKILL)


def test_pending_waits_are_answered_by_their_timeout_and_on_close(tmp_path: Path) -> None:
    h = InProcess(tmp_path)
    job = start(h, "sleep 30")
    try:
        started = time.monotonic()
        short = h.ok("job_wait", {"job_id": job["job_id"], "timeout": 0.3})
        assert short["timed_out"] is True and 0.25 < time.monotonic() - started < 2
        h.submit("job_wait", {"job_id": job["job_id"], "timeout": 600}, request_id="long")
        time.sleep(0.1)
        h.close()
        reply = h.wait("long", 5)[0]  # close left no wait hanging
        assert reply["ok"] and reply["result"]["timed_out"] is True
        after = h.ok("job_wait", {"job_id": job["job_id"], "timeout": 600}, timeout=5)
        assert after["timed_out"] is True and after["state"] == "running"
    finally:
        os.killpg(job["pid"], signal.SIGKILL)
