"""Jobs through a real server and kernel: exit codes, lossless follow, kill, restarts."""

from __future__ import annotations

import time
from pathlib import Path

from jupyter_tether import Tether
from jupyter_tether.controller.jobs import AsyncJob, JobInfo

from .conftest import follow_all, gated


def start(t: Tether, command: str, **kwargs: object) -> AsyncJob:
    return t.portal.call(lambda: t.aio.jobs.start(command, **kwargs))  # type: ignore[arg-type]


def wait(t: Tether, job: AsyncJob, timeout: float = 60) -> JobInfo:
    return t.portal.call(lambda: job.wait(timeout))


def test_failing_job_reports_its_exit_code(tether: Tether) -> None:
    job = start(tether, "echo about to fail; exit 7")
    info = wait(tether, job)
    assert (info.state, info.exit_code) == ("exited", 7)
    assert info.ended_at is not None and info.ended_at >= (info.started_at or 0)


def test_follow_of_100k_lines_gives_every_line_once_in_order(tether: Tether) -> None:
    job = start(tether, "python3 -c \"import sys\nfor i in range(100000): print('line', i)\"")
    data = follow_all(tether.portal, job)
    assert data.decode().splitlines() == [f"line {i}" for i in range(100000)]
    assert wait(tether, job).exit_code == 0


def test_job_survives_supervisor_kernel_restart_and_is_readopted(tether: Tether,
                                                                 tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = start(tether, "echo before; " + gated(gate, "echo after; exit 5"))
    old_pid = tether.info()["pid"]
    kernel_id = tether.status()["kernel_id"]
    # What JupyterLab's "Restart kernel" sends.
    tether.portal.call(lambda: tether.aio.rest.request("POST", f"api/kernels/{kernel_id}/restart"))
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
    gate.touch()
    info = wait(tether, job)
    assert (info.state, info.exit_code) == ("exited", 5)
    assert tether.portal.call(lambda: job.tail(5)) == "before\nafter\n"

