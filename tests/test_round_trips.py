"""Small job calls cost one round trip: the calls each one makes (counted, not timed), and
the supervisor's replies that carry what used to take a second call or a stream of events.

A real supervisor in this process (``InProcess``) with real job processes; ``mangle``
records every op the controller sends.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_tether.controller.jobs import AsyncJob
from jupyter_tether.controller.rpc import Event
from jupyter_tether.mcp_server.tools.jobs import _follow_once

from .conftest import follow_all
from .inprocess import InProcess, Services, services_fixture  # noqa: F401 (``services``)

PY = shlex.quote(sys.executable)


def counting(services: Services) -> list[str]:
    ops: list[str] = []

    def record(op: str, reply: Any) -> Any:
        ops.append(op)
        return reply

    services.remote.mangle = record
    return ops


def ended_job(services: Services, command: str) -> AsyncJob:
    job: AsyncJob = services.run(services.jobs.start, command)
    assert services.run(job.wait, 30).done
    return services.jobs.get(job.job_id)  # a fresh handle: nothing known yet



# --- the controller's calls -----------------------------------------------------------------


def test_follow_of_an_ended_job_is_one_call_with_its_end(services: Services) -> None:
    job = ended_job(services, "printf 'a\\nb\\n'; exit 3")
    ops = counting(services)
    assert follow_all(services.portal, job) == b"a\nb\n"
    services.run(job.status)  # one more round trip: a background unfollow would show by now
    assert ops == ["job_follow", "job_status"], "no events to wait for, no gap reads, no unfollow"
    assert job.info is not None and (job.info.state, job.info.exit_code) == ("exited", 3)
    assert follow_all(services.portal, job, offset=2) == b"b\n"


def test_follow_of_a_running_job_needs_no_unfollow_when_it_ends(services: Services) -> None:
    job: AsyncJob = services.run(
        services.jobs.start, "for i in 1 2 3; do echo n$i; sleep 0.2; done")
    ops = counting(services)
    assert follow_all(services.portal, job) == b"n1\nn2\nn3\n"
    # An unfollow would go in the background: one more round trip gives it time to show.
    services.run(job.status)
    assert "job_unfollow" not in ops, ops  # the supervisor ended the subscription itself
    assert services.remote.ok("job_follow_ack", {"job_id": job.job_id, "offset": 9})[
        "followed"] is False


def test_a_follow_left_early_lets_its_subscription_go(services: Services) -> None:
    job: AsyncJob = services.run(services.jobs.start, "echo first; sleep 30")
    ops = counting(services)

    async def first_chunk() -> bytes:
        async for chunk in job.follow():
            return chunk
        return b""

    assert services.portal.call(first_chunk) == b"first\n"
    deadline = time.monotonic() + 10
    while "job_unfollow" not in ops:  # sent in the background, not awaited
        assert time.monotonic() < deadline, ops
        time.sleep(0.02)
    assert services.remote.ok("job_follow_ack", {"job_id": job.job_id, "offset": 6})[
        "followed"] is False
    services.run(job.kill, 9)


def test_tail_brings_the_job_state_in_the_same_call(services: Services) -> None:
    job = ended_job(services, "printf 'a\\nb\\nc\\n'; exit 2")
    ops = counting(services)
    assert services.run(job.tail, 2) == "b\nc\n"
    assert ops == ["job_tail"]
    assert job.info is not None and job.info.exit_code == 2 and job.info.bytes_written == 6


def test_the_follow_tool_is_one_call_even_when_it_waits_for_the_end(
        services: Services) -> None:
    ended = ended_job(services, "printf 'done\\n'")
    ops = counting(services)
    result = services.run(_follow_once, ended, 0, 10.0, 20000)
    assert (result["text"], result["eof"], result["exit_code"]) == ("done\n", True, 0)
    assert ops == ["job_tail"]
    running: AsyncJob = services.run(services.jobs.start, "sleep 0.5; printf 'late\\n'")
    ops.clear()
    # The supervisor holds the call until the job ends (well within wait_s): one call.
    result = services.run(_follow_once, services.jobs.get(running.job_id), 0, 20.0, 20000)
    assert (result["text"], result["eof"], result["state"]) == ("late\n", True, "exited")
    assert ops == ["job_tail"]


# --- the supervisor's replies -----------------------------------------------------------------


@pytest.fixture
def h(tmp_path: Path) -> Iterator[InProcess]:
    harness = InProcess(tmp_path)
    yield harness
    harness.close()


def start(h: InProcess, command: str, **args: Any) -> dict[str, Any]:
    result: dict[str, Any] = h.ok("job_start", {"command": command, **args})
    return result


def log_events(h: InProcess, job_id: str) -> list[tuple[dict[str, Any], bytes]]:
    return [(c, b) for e, bs in h.events if e["event"] == "log"
            for c, b in zip(e["body"]["chunks"], bs, strict=True) if c["job_id"] == job_id]


def test_follow_inline_of_an_ended_job_is_the_whole_answer(h: InProcess) -> None:
    job_id = start(h, "printf 'x%.0s' $(seq 1 1000); exit 4")["job_id"]
    h.ok("job_wait", {"job_id": job_id, "timeout": 10})
    result, blobs = h.ok_full("job_follow", {"job_id": job_id, "offset": 10,
                                             "inline": 1 << 20})
    assert result["complete"] is True and blobs == [b"x" * 990]
    assert (result["job"]["state"], result["job"]["exit_code"]) == ("exited", 4)
    time.sleep(0.1)  # the pump had its chance: it has nothing to send
    assert log_events(h, job_id) == []
    assert h.ok("job_follow_ack", {"job_id": job_id, "offset": 1000})["followed"] is False
    # Without inline (older controllers) the log still comes as events.
    h.ok("job_follow", {"job_id": job_id, "offset": 995})
    h.wait_event(lambda e: e["event"] == "job_exit" and e["body"].get("subscriber") == "")
    assert [b for _, b in log_events(h, job_id)] == [b"x" * 5]


def test_follow_inline_of_a_running_job_gives_what_is_there_and_the_pump_goes_on(
        h: InProcess, tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = (f"import os, sys, time\nprint('before', flush=True)\n"
              f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\nprint('after')")
    job_id = start(h, f"{PY} -c {shlex.quote(script)}")["job_id"]
    deadline = time.monotonic() + 10
    while h.ok("job_status", {"job_id": job_id})["bytes_written"] < 7:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    result, blobs = h.ok_full("job_follow", {"job_id": job_id, "inline": 1 << 20})
    assert blobs == [b"before\n"] and result["sent"] == 7 and "complete" not in result
    go.touch()
    exit_event = h.wait_event(lambda e: e["event"] == "job_exit"
                              and e["body"].get("subscriber") == "")
    assert exit_event["body"]["size"] == 13
    assert [(c["offset"], b) for c, b in log_events(h, job_id)] == [(7, b"after\n")]


def test_tail_waits_for_bytes_or_the_end_holding_no_thread(h: InProcess, tmp_path: Path) -> None:
    job_id = start(h, "sleep 0.3; printf 'abcdef'; sleep 30")["job_id"]
    # Held until 4 bytes are there (not answered at once with nothing).
    result, blobs = h.ok_full("job_tail", {"job_id": job_id, "offset": 0, "max_bytes": 4,
                                           "wait": 20})
    assert blobs == [b"abcd"] and result["job"]["state"] == "running"
    h.ok("job_kill", {"job_id": job_id, "signal": 9})
    # An ended job answers at once, with its end state taken before the read.
    result, blobs = h.ok_full("job_tail", {"job_id": job_id, "offset": 2, "max_bytes": 100,
                                           "wait": 20})
    assert blobs == [b"cdef"] and result["job"]["state"] == "killed"

    # Forty held waits on a running job (more than the supervisor's 32 workers): a blocking
    # op still gets a worker at once.
    other = start(h, "sleep 30")["job_id"]
    waits = [h.submit("job_tail", {"job_id": other, "offset": 0, "max_bytes": 10,
                                   "wait": 60}) for _ in range(40)]
    assert h.ok("job_tail", {"job_id": job_id, "lines": 1}, timeout=10)["job"]["state"] == \
        "killed"
    h.ok("job_kill", {"job_id": other, "signal": 9})
    assert all(h.wait(w)[0]["ok"] for w in waits)


def standby_pids(jobs_dir: Path) -> list[int]:
    """The wrappers waiting for a job under ``jobs_dir`` (their command line says so)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--standby" in args and any(a.startswith(bytes(jobs_dir)) for a in args):
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_starts_after_the_first_take_a_warm_wrapper_with_their_own_cwd_env_and_log(
        h: InProcess, tmp_path: Path) -> None:
    jobs_dir = tmp_path / ".jupyter_tether" / "jobs"
    for i in range(3):
        folder = tmp_path / f"dir{i}"
        folder.mkdir()
        waiting = standby_pids(jobs_dir)
        deadline = time.monotonic() + 10
        while len(waiting) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the wrapper that ran the last job may still be exiting
            waiting = standby_pids(jobs_dir)
        assert len(waiting) == (0 if i == 0 else 1), waiting  # one made after the first start
        job = start(h, "pwd; echo $TETHER_N; yes | head -1", cwd=f"dir{i}",
                    env_overrides={"TETHER_N": str(i)}, log_path=f"logs/j{i}.log")
        meta = json.loads((jobs_dir / job["job_id"] / "job.json").read_text())
        assert meta["wrapper_pid"] in (waiting or [meta["wrapper_pid"]])  # it took the job
        assert isinstance(job["pid"], int) and job["pid"] != meta["wrapper_pid"]
        status = h.ok("job_wait", {"job_id": job["job_id"], "timeout": 20})
        assert (status["state"], status["exit_code"]) == ("exited", 0)
        # SIGPIPE is back to its default for the job: `yes` ends quietly when head exits.
        assert (tmp_path / f"logs/j{i}.log").read_text() == f"{tmp_path}/dir{i}\n{i}\ny\n"
        deadline = time.monotonic() + 20
        while not standby_pids(jobs_dir):
            assert time.monotonic() < deadline, "no wrapper was started ahead"
            time.sleep(0.02)
    h.close()  # the waiting one goes with the supervisor
    deadline = time.monotonic() + 10
    while standby_pids(jobs_dir):
        assert time.monotonic() < deadline, "the waiting wrapper outlived its supervisor"
        time.sleep(0.02)


def test_an_exit_announced_during_the_follow_call_costs_no_extra_read(
        services: Services) -> None:
    # The supervisor announces a job's end to everyone on its own schedule: under load that
    # may come while a follow's first call is in flight, just before its reply.
    job = ended_job(services, "printf 'a\\nb\\n'; exit 3")
    ops: list[str] = []

    def record(op: str, reply: Any) -> Any:
        ops.append(op)
        if op == "job_follow":
            services.remote._dispatch(Event(0, "job_exit", {
                "job_id": job.job_id, "state": "exited", "exit_code": 3, "size": 4}))
        return reply

    services.remote.mangle = record
    assert follow_all(services.portal, job) == b"a\nb\n"
    assert ops == ["job_follow"], "the reply carried the log and its end: nothing to read"
