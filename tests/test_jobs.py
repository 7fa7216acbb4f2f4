"""Jobs through a real server and kernel: exit codes, lossless follow, kill, restarts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

from jupyter_tether import InvalidArgument, JobError, NotFound, Tether
from jupyter_tether.controller.jobs import AsyncJob, JobInfo


def start(t: Tether, command: str, **kwargs: object) -> AsyncJob:
    return t.portal.call(lambda: t.aio.jobs.start(command, **kwargs))  # type: ignore[arg-type]


def wait(t: Tether, job: AsyncJob, timeout: float = 60) -> JobInfo:
    return t.portal.call(lambda: job.wait(timeout))


def follow_all(t: Tether, job: AsyncJob, offset: int = 0) -> bytes:
    async def collect() -> bytes:
        return b"".join([chunk async for chunk in job.follow(offset)])

    return t.portal.call(collect)


def test_failing_job_reports_its_exit_code(tether: Tether) -> None:
    job = start(tether, "echo about to fail; exit 7")
    info = wait(tether, job)
    assert (info.state, info.exit_code) == ("exited", 7)
    assert info.ended_at is not None and info.ended_at >= (info.started_at or 0)


def test_job_log_defaults_under_logs_in_the_server_root(tether: Tether, server_root: Path) -> None:
    job = start(tether, "echo to the log")
    wait(tether, job)
    info = tether.portal.call(job.status)
    assert Path(info.log_path).parent == server_root / "logs"
    assert Path(info.log_path).read_text() == "to the log\n"


def test_follow_of_100k_lines_gives_every_line_once_in_order(tether: Tether) -> None:
    job = start(tether, "python3 -c \"import sys\nfor i in range(100000): print('line', i)\"")
    data = follow_all(tether, job)
    assert data.decode().splitlines() == [f"line {i}" for i in range(100000)]
    assert wait(tether, job).exit_code == 0


def test_follow_from_an_offset_resumes_exactly(tether: Tether) -> None:
    job = start(tether, "for i in 1 2 3 4 5; do echo n$i; done")
    wait(tether, job)
    whole = follow_all(tether, job)
    assert follow_all(tether, job, offset=6) == whole[6:]


def test_retried_start_with_same_key_returns_the_same_job(tether: Tether, server_root: Path) -> None:
    marker = server_root / "started-count.txt"
    first = start(tether, f"echo x >> {marker}; sleep 1", idempotency_key="retry-key-1")
    second = start(tether, f"echo x >> {marker}; sleep 1", idempotency_key="retry-key-1")
    assert first.job_id == second.job_id
    wait(tether, first)
    assert marker.read_text() == "x\n"


def test_kill_ends_the_whole_group_even_children_ignoring_term(tether: Tether,
                                                               server_root: Path) -> None:
    pid_file = server_root / "child.pid"
    script = ("import os, signal, subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', "
              "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "time.sleep(300)\n")
    (server_root / "stubborn.py").write_text(script)
    job = start(tether, "python3 stubborn.py")
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    info = tether.portal.call(lambda: job.kill(15, 1.0))
    assert info.state == "killed"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the child that ignored SIGTERM survived the kill")


def test_tail_handles_partial_last_line_and_non_utf8(tether: Tether) -> None:
    job = start(tether, r"printf 'one\ntwo\n\377\376bad\nlast-without-newline'")
    wait(tether, job)
    tail = tether.portal.call(lambda: job.tail(2))
    assert tail == "\ufffd\ufffdbad\nlast-without-newline"
    raw, _ = tether.portal.call(lambda: job.read(0))
    assert raw.endswith(b"\xff\xfebad\nlast-without-newline")


def test_job_survives_supervisor_kernel_restart_and_is_readopted(tether: Tether) -> None:
    job = start(tether, "echo before; sleep 4; echo after; exit 5")
    old_pid = tether.info()["pid"]
    kernel_id = tether.status()["kernel_id"]
    tether.portal.call(lambda: tether.aio.rest.restart_kernel(kernel_id))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if tether.status()["connected"] and tether.info()["pid"] != old_pid:
                break
        except Exception:
            pass
        time.sleep(0.2)
    assert tether.info()["pid"] != old_pid, "a new supervisor should have been injected"
    assert tether.portal.call(job.status).state == "running"
    info = wait(tether, job)
    assert (info.state, info.exit_code) == ("exited", 5)
    assert tether.portal.call(lambda: job.tail(5)) == "before\nafter\n"


def test_run_commands_fail_fast_with_returncodes(tether: Tether) -> None:
    result = tether.portal.call(lambda: tether.aio.jobs.run_commands(
        ["echo first", "exit 3", "echo never"], fail_fast=True))
    assert [r["returncode"] for r in result["results"]] == [0, 3]
    assert result["results"][0]["stdout"] == "first\n"
    assert result["ok"] is False


def test_list_includes_started_jobs(tether: Tether) -> None:
    job = start(tether, "true", name="listed")
    wait(tether, job)
    assert job.job_id in {j.job_id for j in tether.portal.call(tether.aio.jobs.list)}


def test_bad_ids_and_arguments_give_clear_errors(tether: Tether) -> None:
    with pytest.raises(NotFound, match="jnosuchjob"):
        tether.portal.call(tether.aio.jobs.get("jnosuchjob").status)
    with pytest.raises(JobError, match="cwd"):
        start(tether, "true", cwd="no/such/dir")

    async def bad_type() -> None:
        await tether.aio.link.call("job_start", {"command": 42})

    with pytest.raises(InvalidArgument, match="command"):
        tether.portal.call(bad_type)


def test_two_followers_of_one_job_each_get_every_line(tether: Tether) -> None:
    job = start(tether, "python3 -c \"import time\nfor i in range(3000): print('n', i)\ntime.sleep(0.5)\"")

    async def both() -> tuple[bytes, bytes]:
        results: dict[int, bytes] = {}

        async def one(index: int) -> None:
            results[index] = b"".join([chunk async for chunk in job.follow()])

        async with anyio.create_task_group() as group:
            group.start_soon(one, 0)
            group.start_soon(one, 1)
        return results[0], results[1]

    first, second = tether.portal.call(both)
    expected = [f"n {i}" for i in range(3000)]
    assert first.decode().splitlines() == expected
    assert second.decode().splitlines() == expected
