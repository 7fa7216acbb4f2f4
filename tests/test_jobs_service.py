"""``AsyncJobs`` against a real supervisor in this process: real processes, no Jupyter
server (what only a server and its kernels show is in test_jobs)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

from jupyter_tether import InvalidArgument, JobError, NotFound
from jupyter_tether.controller.jobs import AsyncJob, JobInfo

from .conftest import follow_all
from .inprocess import Services, services_fixture  # noqa: F401 (the ``services`` fixture)


def start(services: Services, command: str, **kwargs: object) -> AsyncJob:
    return services.run(services.jobs.start, command, **kwargs)


def wait(services: Services, job: AsyncJob, timeout: float = 60) -> JobInfo:
    return services.run(job.wait, timeout)



def test_job_log_defaults_under_logs_in_the_remote_root(services: Services) -> None:
    job = start(services, "echo to the log")
    wait(services, job)
    info = services.portal.call(job.status)
    assert Path(info.log_path).parent == services.root / "logs"
    assert Path(info.log_path).read_text() == "to the log\n"


def test_follow_from_an_offset_resumes_exactly(services: Services) -> None:
    job = start(services, "for i in 1 2 3 4 5; do echo n$i; done")
    wait(services, job)
    whole = follow_all(services.portal, job)
    assert follow_all(services.portal, job, offset=6) == whole[6:]


def test_retried_start_with_same_key_returns_the_same_job(services: Services) -> None:
    marker = services.root / "started-count.txt"
    first = start(services, f"echo x >> {marker}; sleep 1", idempotency_key="retry-key-1")
    second = start(services, f"echo x >> {marker}; sleep 1", idempotency_key="retry-key-1")
    assert first.job_id == second.job_id
    wait(services, first)
    assert marker.read_text() == "x\n"


def test_kill_ends_the_whole_group_even_children_ignoring_term(services: Services) -> None:
    pid_file = services.root / "child.pid"
    script = ("import os, signal, subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', "
              "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "time.sleep(300)\n")
    (services.root / "stubborn.py").write_text(script)
    job = start(services, "python3 stubborn.py")
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    info = services.portal.call(lambda: job.kill(15, 1.0))
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


def test_tail_handles_partial_last_line_and_non_utf8(services: Services) -> None:
    job = start(services, r"printf 'one\ntwo\n\377\376bad\nlast-without-newline'")
    wait(services, job)
    tail = services.portal.call(lambda: job.tail(2))
    assert tail == "\ufffd\ufffdbad\nlast-without-newline"
    raw, _ = services.portal.call(lambda: job.read(0))
    assert raw.endswith(b"\xff\xfebad\nlast-without-newline")


def test_run_commands_fail_fast_with_returncodes(services: Services) -> None:
    result = services.portal.call(lambda: services.jobs.run_commands(
        ["echo first", "exit 3", "echo never"], fail_fast=True))
    assert [r["returncode"] for r in result["results"]] == [0, 3]
    assert result["results"][0]["stdout"] == "first\n"
    assert result["ok"] is False


def test_list_includes_started_jobs(services: Services) -> None:
    job = start(services, "true", name="listed")
    wait(services, job)
    assert job.job_id in {j.job_id for j in services.portal.call(services.jobs.list)}


def test_bad_ids_and_arguments_give_clear_errors(services: Services) -> None:
    with pytest.raises(NotFound, match="jnosuchjob"):
        services.portal.call(services.jobs.get("jnosuchjob").status)
    with pytest.raises(JobError, match="cwd"):
        start(services, "true", cwd="no/such/dir")

    async def bad_type() -> None:
        await services.remote.call("job_start", {"command": 42})

    with pytest.raises(InvalidArgument, match="command"):
        services.portal.call(bad_type)


def test_two_followers_of_one_job_each_get_every_line(services: Services) -> None:
    job = start(services, "python3 -c \"import time\nfor i in range(3000): print('n', i)\ntime.sleep(0.5)\"")

    async def both() -> tuple[bytes, bytes]:
        results: dict[int, bytes] = {}

        async def one(index: int) -> None:
            results[index] = b"".join([chunk async for chunk in job.follow()])

        async with anyio.create_task_group() as group:
            group.start_soon(one, 0)
            group.start_soon(one, 1)
        return results[0], results[1]

    first, second = services.portal.call(both)
    expected = [f"n {i}" for i in range(3000)]
    assert first.decode().splitlines() == expected
    assert second.decode().splitlines() == expected


def test_follow_gives_every_line_once_across_a_supervisor_restart(services: Services) -> None:
    # The new supervisor re-adopts the job from its registry; the follow's re-attach hook
    # subscribes again from its offset, and what the old one still sent is not repeated.
    script = "import time\nfor i in range(60):\n    print('n', i, flush=True)\n    time.sleep(0.02)"
    job = start(services, f"python3 -c \"{script}\"")
    first = services.remote.supervisor

    async def follow_through_restart() -> bytes:
        got = bytearray()
        async for chunk in job.follow():
            got += chunk
            if services.remote.supervisor is first and len(got) > 40:
                await services.remote.restart()
        return bytes(got)

    data = services.portal.call(follow_through_restart)
    assert services.remote.supervisor is not first
    assert data.decode().splitlines() == [f"n {i}" for i in range(60)]
    assert wait(services, job).exit_code == 0
