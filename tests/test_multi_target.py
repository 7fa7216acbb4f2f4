"""Several targets at once: two Jupyter servers, a supervisor and a job on each, followed together."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from jupyter_tether import AsyncTether, Tether, cli
from jupyter_tether.controller.embedded import LocalJupyterServer
from jupyter_tether.controller.jobs import AsyncJob
from jupyter_tether.controller.state import TargetState
from jupyter_tether.mcp_server import build_server

from .conftest import fast_options
from .remote_checks import expected_job_output
from .test_cli import SCRIPT, cli_env, one_error_line, tether_cli
from .test_mcp import Calls

# "west" speaks the kernel websocket's legacy (JSON and binary-blob) protocol, as a server
# that forwards to a gateway does; "east" the v1 protocol every recent server offers.
LEGACY_WEBSOCKET = "--ZMQChannelsWebsocketConnection.kernel_ws_protocol="


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalJupyterServer]]:
    servers = []
    try:
        for name, args in ("east", []), ("west", [LEGACY_WEBSOCKET]):
            root = tmp_path_factory.mktemp(f"server-{name}")
            servers.append(LocalJupyterServer(root, log_path=root.parent / f"{name}.log",
                                              extra_args=args).start())
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
async def test_binary_comm_traffic_round_trips_over_the_legacy_protocol(
        two_servers: list[LocalJupyterServer], tmp_path: Path) -> None:
    _, west = two_servers
    data = os.urandom(5 * 1024 * 1024 + 7)
    (tmp_path / "up.bin").write_bytes(data)
    async with AsyncTether(target=west.target, options=fast_options()) as t:
        sock = t.link._sock
        assert sock is not None and sock.protocol == "legacy"
        # Chunks travel as binary frames with buffers both ways.
        up = await t.files.upload(tmp_path / "up.bin", "legacy/up.bin")
        assert (west.root_dir / "legacy" / "up.bin").read_bytes() == data
        down = await t.files.download("legacy/up.bin", tmp_path / "down.bin", via="comm")
        assert (tmp_path / "down.bin").read_bytes() == data
        assert up.sha256 == down.sha256 == hashlib.sha256(data).hexdigest()
        assert (await t.exec("print(6 * 7)")).stdout == "42\n"


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


# --- named targets: the MCP tools and the CLI reach each server by its config-file name ------


@pytest.fixture
def targets_toml(two_servers: list[LocalJupyterServer], tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Path:
    """east and west as named targets (tokens from env vars), plus one that is down."""
    east, west = two_servers
    config = tmp_path / "targets.toml"
    config.write_text(f'[east]\nurl = "{east.url}"\ntoken_env = "EAST_TOKEN"\n\n'
                      f'[west]\nurl = "{west.url}"\ntoken_env = "WEST_TOKEN"\n\n'
                      '[down]\nurl = "http://127.0.0.1:9/"\n')
    monkeypatch.setenv("JUPYTER_TETHER_CONFIG", str(config))
    monkeypatch.setenv("EAST_TOKEN", east.token)
    monkeypatch.setenv("WEST_TOKEN", west.token)
    return config


def _value(out: dict[str, Any]) -> str:
    assert out["status"] == "ok", out
    return str(out["results"][0]["data"]["text/plain"])


@pytest.mark.anyio
async def test_mcp_server_url_takes_a_target_name(two_servers: list[LocalJupyterServer],
                                                  targets_toml: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    east, west = two_servers
    # The MCP server's own default is east; west is reached by name only (its token is
    # WEST_TOKEN, never REMOTE_JUPYTER_TOKEN, which is east's).
    monkeypatch.setenv("REMOTE_JUPYTER_TOKEN", east.token)
    async with Client(build_server(url=east.url, token=east.token,
                                   options=fast_options())) as client:
        calls = Calls(client)
        for name in ("east", "west"):
            await calls.ok("jupyter_exec_python", {"code": f"where = {name!r}",
                                                   "server_url": name})
        assert _value(await calls.ok("jupyter_exec_python",
                                     {"code": "where", "server_url": "west"})) == "'west'"
        assert _value(await calls.ok("jupyter_exec_python",
                                     {"code": "where", "server_url": "east"})) == "'east'"
        # No server_url: the default target, which is east (so the name shares its tether).
        assert _value(await calls.ok("jupyter_exec_python", {"code": "where"})) == "'east'"
        # A URL still works as before, and reaches the same kernel as the name.
        assert _value(await calls.ok("jupyter_exec_python", {
            "code": "where", "server_url": f"{west.url}?token={west.token}"})) == "'west'"

        # A job started by name is found again without server_url (with west's token).
        job = await calls.ok("jupyter_job_start", {"command": "pwd", "server_url": "west"})
        waited = await calls.ok("jupyter_job_wait", {"job_id": job["job_id"], "timeout_s": 30})
        assert waited["done"] and waited["job"]["exit_code"] == 0
        assert (await calls.follow_all(job["job_id"])).strip() == str(west.root_dir)

        status = await calls.ok("jupyter_status", {"server_url": "west"})
        assert status["supervisor"]["root_dir"] == str(west.root_dir)
        named = {row["name"]: row for row in status["named_targets"]["targets"]}
        assert set(named) == {"east", "west", "down"}
        assert named["east"]["state"] == "open" and named["east"]["mcp_default"]
        assert named["west"]["state"] == "open" and not named["west"]["mcp_default"]
        assert named["down"]["state"] == "not opened"
        assert named["west"]["token"] == "env:WEST_TOKEN"
        opened = {row["name"]: row["state"] for row in status["mcp_server"]["targets"]}
        assert opened.get("west") == "open"

        text = await calls.error("jupyter_ping", {"server_url": "north"})
        assert "north" in text and "east, west" in text.replace("down, ", "")
        assert "cannot reach" in await calls.error("jupyter_ping",
                                                   {"server_url": "down", "timeout_s": 10})
        for text in calls.texts:
            assert east.token not in text and west.token not in text


def test_cli_status_all_lists_every_named_target(two_servers: list[LocalJupyterServer],
                                                 targets_toml: Path) -> None:
    east, west = two_servers
    env = cli_env(JUPYTER_TETHER_CONFIG=str(targets_toml), EAST_TOKEN=east.token,
                  WEST_TOKEN=west.token)
    proc = tether_cli(None, "status", "--all", "--json", env=env)
    assert proc.returncode == 1, proc.stderr  # one target is down
    report = json.loads(proc.stdout)
    rows = {row["name"]: row for row in report["targets"]}
    assert [row["name"] for row in report["targets"]] == ["east", "west", "down"]
    assert rows["east"]["ok"] and rows["east"]["root_dir"] == str(east.root_dir)
    assert rows["west"]["ok"] and rows["west"]["root_dir"] == str(west.root_dir)
    assert not rows["down"]["ok"] and "cannot reach" in rows["down"]["error"]
    assert "down" in one_error_line(proc)

    # Human output: one line per target, the failed one with its one-line error.
    targets_toml.write_text(targets_toml.read_text().split("[down]")[0])
    proc = tether_cli(None, "status", "--all", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(lines) == {"east", "west"} and all(" ok " in line for line in lines.values())
    for text in (proc.stdout, proc.stderr):
        assert east.token not in text and west.token not in text


def test_cli_submits_one_spec_to_two_targets_and_collects_from_each(
        two_servers: list[LocalJupyterServer], targets_toml: Path, tmp_path: Path) -> None:
    east, west = two_servers
    env = cli_env(JUPYTER_TETHER_CONFIG=str(targets_toml), EAST_TOKEN=east.token,
                  WEST_TOKEN=west.token)
    project = tmp_path / "proj"
    project.mkdir()
    (project / "main.sh").write_text("mkdir -p out && pwd > out/where.txt && echo ran\n")
    spec = {"sync": [{"local_dir": str(project), "remote_dir": "multi/proj"}],
            "run": {"cwd": "multi/proj", "command": "sh main.sh"},
            "artifacts": ["multi/proj/out/where.txt"],
            "idempotency_key": f"multi-{time.time_ns()}"}
    (tmp_path / "job.json").write_text(json.dumps(spec))
    proc = tether_cli(None, "submit", str(tmp_path / "job.json"), "--target", "east",
                      "--target", "west", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = dict(line.split()[:2] for line in proc.stdout.splitlines()[1:])
    assert set(jobs) == {"east", "west"} and jobs["east"] != jobs["west"]
    collects = [line.strip() for line in proc.stderr.splitlines()
                if line.strip().startswith("jupyter-tether") and " collect " in line]
    follows = [line.strip() for line in proc.stderr.splitlines() if " logs " in line]
    assert collects == [f"jupyter-tether --target {name} collect {jobs[name]} results/{name}"
                        for name in ("east", "west")]
    for name, server, follow, collect in zip(("east", "west"), (east, west), follows, collects,
                                             strict=True):
        followed = subprocess.run(shlex.split(follow.replace("jupyter-tether", str(SCRIPT), 1)),
                                  capture_output=True, text=True, env=env, cwd=tmp_path,
                                  timeout=60)
        assert followed.returncode == 0 and followed.stdout == "ran\n", followed.stderr
        collected = subprocess.run(shlex.split(collect.replace("jupyter-tether", str(SCRIPT), 1)),
                                   capture_output=True, text=True, env=env, cwd=tmp_path,
                                   timeout=60)
        assert collected.returncode == 0, collected.stderr
        assert (tmp_path / "results" / name / "where.txt").read_text().strip() == \
            str(server.root_dir / "multi" / "proj")

    # --json: one entry per target, with the same commands.
    # (--target before and after the subcommand both count.)
    as_json = tether_cli(None, "--json", "-t", "west", "submit", str(tmp_path / "job.json"),
                         "-t", "east", env=env, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    submits = json.loads(as_json.stdout)["submits"]
    assert [(s["target"], s["job_id"], s["reused"]) for s in submits] == \
        [("west", jobs["west"], True), ("east", jobs["east"], True)]
    # Usage errors: an unknown name, --follow with several, several --target elsewhere.
    unknown = tether_cli(None, "submit", str(tmp_path / "job.json"), "--target", "east",
                         "--target", "nope", env=env)
    assert unknown.returncode == 2 and "nope" in one_error_line(unknown)
    follow = tether_cli(None, "submit", str(tmp_path / "job.json"), "--target", "east",
                        "--target", "west", "--follow", env=env)
    assert follow.returncode == 2 and "--follow" in one_error_line(follow)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--target", "east", "--target", "west", "status"])
    assert exited.value.code == 2
