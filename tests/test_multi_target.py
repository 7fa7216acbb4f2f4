"""Several targets at once: two Jupyter servers, a supervisor and a job on each, followed together."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_tether import AsyncTether, Tether
from jupyter_tether.controller.embedded import LocalJupyterServer
from jupyter_tether.controller.jobs import AsyncJob
from jupyter_tether.controller.state import TargetState

from .conftest import fast_options
from .remote_checks import expected_job_output


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalJupyterServer]]:
    servers = []
    try:
        for name in ("east", "west"):
            root = tmp_path_factory.mktemp(f"server-{name}")
            servers.append(LocalJupyterServer(root, log_path=root.parent / f"{name}.log").start())
        yield servers
    finally:
        for server in servers:
            server.stop()


def _job(tag: str, lines: int) -> str:
    # Different output per target, with a pause in the middle: both follows are live at once.
    return (f"python3 -c \"import sys, time\nfor i in range({lines}):\n"
            f"    print('{tag}', i)\n    if i == {lines // 2}: sys.stdout.flush(); time.sleep(0.5)\n"
            f"sys.exit({len(tag)})\"")


@pytest.mark.anyio
async def test_a_job_on_each_of_two_targets_followed_at_once(
        two_servers: list[LocalJupyterServer]) -> None:
    east, west = two_servers
    assert east.target.key != west.target.key
    async with AsyncTether(target=east.target, options=fast_options()) as t_east, \
            AsyncTether(target=west.target, options=fast_options()) as t_west:
        # Two supervisors, each in its own server and root.
        assert t_east.link.facts["root_dir"] == str(east.root_dir)
        assert t_west.link.facts["root_dir"] == str(west.root_dir)
        assert t_east.link.facts["pid"] != t_west.link.facts["pid"]

        lines = 30_000
        jobs = await asyncio.gather(t_east.jobs.start(_job("east", lines)),
                                    t_west.jobs.start(_job("west-side", lines)))
        finished: set[str] = set()
        overlapped: list[bool] = []

        async def follow(name: str, job: AsyncJob) -> bytes:
            chunks: list[bytes] = []
            async for chunk in job.follow():
                if not chunks:
                    # The other follow must still be running when this one gets its first bytes.
                    overlapped.append(not finished)
                chunks.append(chunk)
            finished.add(name)
            return b"".join(chunks)

        east_out, west_out = await asyncio.gather(follow("east", jobs[0]),
                                                  follow("west", jobs[1]))
        assert overlapped == [True, True]
        assert east_out == "".join(f"east {i}\n" for i in range(lines)).encode()
        assert west_out == "".join(f"west-side {i}\n" for i in range(lines)).encode()
        east_info, west_info = await asyncio.gather(jobs[0].wait(30), jobs[1].wait(30))
        assert (east_info.exit_code, west_info.exit_code) == (4, 9)
        # Each job ran on its own server: its log lies under that server's root.
        assert Path(east_info.log_path).is_relative_to(east.root_dir)
        assert Path(west_info.log_path).is_relative_to(west.root_dir)
        # Each job id is known to its own supervisor only.
        assert jobs[0].job_id in {j.job_id for j in await t_east.jobs.list()}
        assert jobs[0].job_id not in {j.job_id for j in await t_west.jobs.list()}
    # Local state does not collide: one file per target, each naming its own supervisor.
    east_state = TargetState(east.target.key).load()
    west_state = TargetState(west.target.key).load()
    assert TargetState(east.target.key).path != TargetState(west.target.key).path
    assert east_state["kernel:jupyter-tether-supervisor"] != \
        west_state["kernel:jupyter-tether-supervisor"]


def test_blocking_tethers_on_two_targets_from_two_threads(
        two_servers: list[LocalJupyterServer]) -> None:
    results: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def run(server: LocalJupyterServer) -> None:
        try:
            with Tether(server.url, server.token, options=fast_options()) as t:
                job = t.jobs.start(
                    "python3 -c \"import sys\nfor i in range(20000): print('line', i)\n"
                    "print('to stderr', file=sys.stderr)\nsys.exit(3)\"")
                results[server.url] = b"".join(job.follow())
                assert job.wait(30).exit_code == 3
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(server,)) for server in two_servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert [results[s.url] for s in two_servers] == [expected_job_output(20000)] * 2
