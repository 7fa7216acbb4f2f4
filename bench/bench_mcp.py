"""The MCP server as an agent sees it: tool latency, and the server's memory while moving a file.

    python bench/bench_mcp.py [--n 300] [--size-mib 256]

Starts a local Jupyter server and ``python -m jupyter_tether mcp`` on loopback, then
through the real ``mcp`` client over streamable HTTP: ``jupyter_ping`` and
``jupyter_job_status`` N times each (median, p99, max), and one file up with
``jupyter_upload_local_file`` and back with ``jupyter_download_to_local`` while sampling the
MCP server process's RSS (psutil). Goals: median <= 10 ms, no call stalling for seconds,
peak RSS < 200 MiB for a 1 GiB file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
from _common import PeakRss, fmt, local_server, summary
from mcp import Client

from jupyter_tether.controller.embedded import LocalJupyterServer, free_port


def start_mcp(server: LocalJupyterServer, state_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "REMOTE_JUPYTER_URL": server.url, "REMOTE_JUPYTER_TOKEN": server.token,
           "JUPYTER_TETHER_STATE_DIR": str(state_dir)}
    process = subprocess.Popen([sys.executable, "-m", "jupyter_tether", "mcp", "--port",
                                str(port)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx2.get(f"http://127.0.0.1:{port}/", timeout=1)
            return process, f"http://127.0.0.1:{port}/mcp"
        except httpx2.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("the MCP server did not start")


async def timed(client: Client, name: str, args: dict[str, Any], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        result = await client.call_tool(name, args)
        samples.append(time.perf_counter() - started)
        assert not result.is_error, result.content
    return samples


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def main(n: int, size_mib: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tether-bench-mcp-") as tmp, local_server() as server:
        tmp_path = Path(tmp)
        process, url = start_mcp(server, tmp_path / "state")
        try:
            async with Client(url) as client:
                for _ in range(20):  # warm up: connect, inject, first calls
                    await client.call_tool("jupyter_ping", {})
                ping = await timed(client, "jupyter_ping", {}, n)
                job = await client.call_tool("jupyter_job_start", {"command": "sleep 600"})
                job_id = (job.structured_content or {})["job_id"]
                status = await timed(client, "jupyter_job_status", {"job_id": job_id}, n)
                await client.call_tool("jupyter_job_kill", {"job_id": job_id, "sig": 9})
                print(fmt("jupyter_ping (MCP, HTTP)", summary(ping)), f"  max {max(ping)*1000:.1f} ms")
                print(fmt("jupyter_job_status (MCP, HTTP)", summary(status)),
                      f"  max {max(status)*1000:.1f} ms")

                source = tmp_path / "payload.bin"
                with open(source, "wb") as handle:
                    for _ in range(size_mib):
                        handle.write(os.urandom(1 << 20))
                size = source.stat().st_size
                back = tmp_path / "back.bin"
                with PeakRss(process.pid) as rss:
                    started = time.perf_counter()
                    up = await client.call_tool("jupyter_upload_local_file", {
                        "local_path": str(source), "remote_path": "bench/payload.bin",
                        "timeout_s": 3600})
                    up_s = time.perf_counter() - started
                    assert not up.is_error, up.content
                    started = time.perf_counter()
                    down = await client.call_tool("jupyter_download_to_local", {
                        "remote_path": "bench/payload.bin", "local_path": str(back),
                        "timeout_s": 3600})
                    down_s = time.perf_counter() - started
                    assert not down.is_error, down.content
                assert sha256(back) == sha256(source)
                print(f"upload   {size_mib} MiB: {up_s:6.2f} s  {size / up_s / 2**20:7.1f} MiB/s")
                print(f"download {size_mib} MiB: {down_s:6.2f} s  {size / down_s / 2**20:7.1f} MiB/s")
                print(f"MCP server RSS: baseline {rss.baseline / 2**20:.1f} MiB, "
                      f"peak {rss.peak / 2**20:.1f} MiB (+{rss.growth_mib:.1f} MiB)")
        finally:
            process.terminate()
            process.wait(20)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--size-mib", type=int, default=256)
    options = parser.parse_args()
    anyio.run(main, options.n, options.size_mib)
