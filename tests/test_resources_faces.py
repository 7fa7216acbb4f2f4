"""Resources through the faces on a real Jupyter server: the MCP tools (jupyter_resources,
jupyter_status, jupyter_job_status, jupyter_job_wait) and ``jupyter-tether top`` / ``jobs``."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from jupyter_tether.controller.embedded import LocalJupyterServer
from jupyter_tether.mcp_server import build_server

from .conftest import fast_options
from .test_cli import tether_cli
from .test_mcp import Calls
from .test_resources import ALLOC

PY = shlex.quote(sys.executable)


@pytest.mark.anyio
async def test_mcp_resources_status_and_job_status_show_usage(
        jupyter_server: LocalJupyterServer, server_root: Path) -> None:
    (server_root / "rs_alloc.py").write_text(ALLOC.replace("'ready'", "'rs_ready'")
                                             .replace("'go'", "'rs_go'"))
    app = build_server(url=jupyter_server.url, token=jupyter_server.token,
                       options=fast_options())
    async with Client(app) as client:
        calls = Calls(client)
        job = await calls.ok("jupyter_job_start", {"command": f"{PY} rs_alloc.py"})
        with anyio.fail_after(30):
            while not (server_root / "rs_ready").exists():
                await anyio.sleep(0.05)
        try:
            # Usage is sampled at 1 Hz: the first answer may be a sample from mid-allocation.
            with anyio.fail_after(10):
                while True:
                    res = await calls.ok("jupyter_resources")
                    (row,) = [j for j in res["jobs"] if j["job_id"] == job["job_id"]]
                    # A row carries only the figures sampled so far.
                    if row.get("rss_mb", 0) >= 300:
                        break
                    await anyio.sleep(0.25)
            assert row["threads"] >= 1
            assert res["host"]["ram_total_gb"] > 0 and res["host"]["disks"]
            assert res["gpus"]["available"] in (True, False)  # whatever this box has
            status = await calls.ok("jupyter_status")
            assert status["resources"]["ram_gb"] > 0 and "gpus" in status["resources"]
            job_status = await calls.ok("jupyter_job_status", {"job_id": job["job_id"]})
            assert job_status["usage"]["rss_mb"] >= 300
        finally:
            (server_root / "rs_go").touch()
        done = await calls.ok("jupyter_job_wait", {"job_id": job["job_id"], "timeout_s": 60})
        assert done["job"]["usage"]["peak_mb"] >= 300


def test_cli_top_once_json_and_jobs_columns(jupyter_server: LocalJupyterServer,
                                           server_root: Path) -> None:
    ran = tether_cli(jupyter_server, "--json", "run", "-d", "sleep 30")
    job_id = json.loads(ran.stdout)["job_id"]
    try:
        shown = tether_cli(jupyter_server, "top", "--once")
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert "CPUs" in lines[0] and "RAM" in lines[0] and "disk" in lines[0]
        assert any(line.startswith("GPUs: ") or line.startswith("GPU ") for line in lines)
        header = next(line for line in lines if line.startswith("JOB"))
        assert header.split()[:5] == ["JOB", "CPU", "RSS", "PEAK", "THREADS"]
        assert any(line.startswith(job_id) for line in lines)
        as_json = json.loads(tether_cli(jupyter_server, "--json", "top").stdout)
        assert {"host", "gpus", "jobs", "warnings", "sampler"} <= set(as_json)
        # The listing shows the sampler's cached figures (one sample a second): the job's
        # first one may not be taken yet.
        deadline = time.monotonic() + 10
        while True:
            listed = tether_cli(jupyter_server, "jobs", "--state", "running").stdout
            assert listed.splitlines()[0].split()[6:9] == ["CPU", "RSS", "PEAK"]
            row = next(line for line in listed.splitlines() if line.startswith(job_id))
            if row.split()[7] != "-" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert row.split()[7].endswith("M")  # sleep's RSS, in MiB
    finally:
        tether_cli(jupyter_server, "kill", job_id, "--signal", "KILL")
