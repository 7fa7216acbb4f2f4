"""The MCP server as an agent sees it: tool latency, first call, and files moved through its tools.

    python bench/bench_mcp.py [--n 300] [--sizes 64,256,1024] [--rounds 3] [--upload-mib 256]

Starts a fresh local Jupyter server and a fresh ``python -m jupyter_tether mcp`` on loopback
and talks to it through the real ``mcp`` client over streamable HTTP:

1. The first tool call (``jupyter_ping``: connect, start the supervisor kernel, inject,
   hello) on the fresh pair.
2. ``jupyter_ping`` and ``jupyter_job_status`` N times each (median, p99, max).
3. For each size, ``--rounds`` rounds of: a plain streamed ``GET /files/<path>`` to disk in a
   separate process (the same-run baseline: the server's single-threaded file handler is the
   ceiling), and ``jupyter_download_to_local`` of the same file (sha256-verified, resumable).
   The order alternates by round. Round 1 is the first time the supervisor sees the file
   (it hashes it); later rounds may use its hash cache (inode/size/mtime/ctime), unless
   ``--cold`` touches the file before every download.
4. ``jupyter_upload_local_file`` of ``--upload-mib`` MiB, ``--rounds`` times (the local file
   is touched first, so it is hashed again as a new one would be).

All the while a second MCP client calls ``jupyter_ping`` every 50 ms; its latencies are
reported per kind of transfer, and the MCP server's peak RSS growth (psutil) and the CPU
seconds of the MCP server, the Jupyter server and the supervisor kernel are sampled.
Goals (issue 14): downloads >= 0.9x the plain GET, uploads >= 400 MiB/s, pings during either
max < 50 ms and p99 < 20 ms, MCP server peak RSS growth < 64 MiB, first call < 1 s.
Prints a table; asserts nothing but the bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import httpx2
import psutil
from _common import PeakRss, fmt, summary
from mcp import Client

from jupyter_tether.controller.embedded import LocalJupyterServer, free_port

MiB = 1024 * 1024
PING_EVERY_S = 0.05

# The baseline: a plain streamed GET to disk, timed inside its own process (after imports).
# The standard library's client reads the body straight into 1 MiB buffers: as fast as curl
# here, and about 2x httpx2's iter_bytes (which parses in Python, 64 KiB at a time).
GET_SCRIPT = r"""
import json, shutil, sys, time, urllib.request
url, token, dest = sys.argv[1:4]
request = urllib.request.Request(url, headers={"Authorization": "token " + token})
started, cpu = time.perf_counter(), time.process_time()
with urllib.request.urlopen(request, timeout=600) as response, open(dest, "wb") as handle:
    shutil.copyfileobj(response, handle, 1 << 20)
print(json.dumps({"seconds": time.perf_counter() - started,
                  "cpu": time.process_time() - cpu}))
"""


def start_mcp(server: LocalJupyterServer, state_dir: Path,
              local_root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "REMOTE_JUPYTER_URL": server.url, "REMOTE_JUPYTER_TOKEN": server.token,
           "JUPYTER_TETHER_STATE_DIR": str(state_dir)}
    process = subprocess.Popen([sys.executable, "-m", "jupyter_tether", "mcp", "--port",
                                str(port), "--local-root", str(local_root), "-q"],
                               env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx2.get(f"http://127.0.0.1:{port}/", timeout=1)
            return process, f"http://127.0.0.1:{port}/mcp"
        except httpx2.HTTPError:
            time.sleep(0.02)
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


def write_random(path: Path, size: int) -> str:
    """Write ``size`` random bytes; returns their sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            digest.update(block)
            handle.write(block)
            left -= len(block)
    return digest.hexdigest()


def cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system + times.children_user + times.children_system)
    except psutil.Error:
        return 0.0


class Pinger:
    """A second MCP client calling ``jupyter_ping`` every 50 ms; samples tagged by phase."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._phase = "idle"
        self.phase_started = time.perf_counter()
        self.samples: dict[str, list[float]] = defaultdict(list)
        #: pings over 50 ms: phase, seconds into it when sent, duration, and of that the
        #: round trip to the supervisor over the link (the rest: the MCP server, /api)
        self.slow: list[tuple[str, float, float, float]] = []

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase, self.phase_started = value, time.perf_counter()

    async def run(self) -> None:
        next_at = time.perf_counter()
        while True:
            phase = self.phase
            started = time.perf_counter()
            result = await self.client.call_tool("jupyter_ping", {})
            took = time.perf_counter() - started
            assert not result.is_error, result.content
            if phase == self.phase:  # a ping that straddles two phases counts for neither
                self.samples[phase].append(took)
                if took > 0.05:
                    rtt = float((result.structured_content or {}).get("rtt_s", 0.0))
                    self.slow.append((phase, started - self.phase_started, took, rtt))
            next_at = max(next_at + PING_EVERY_S, time.perf_counter())
            await anyio.sleep(max(0.0, next_at - time.perf_counter()))


class Run:
    """One timed transfer: seconds, bytes, CPU seconds per process, MCP server RSS growth."""

    def __init__(self, seconds: float, nbytes: int, cpu: dict[str, float], rss_mib: float) -> None:
        self.seconds = seconds
        self.nbytes = nbytes
        self.cpu = cpu
        self.rss_mib = rss_mib

    @property
    def mib_s(self) -> float:
        return self.nbytes / self.seconds / MiB


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def ping_cell(samples: list[float]) -> str:
    if not samples:
        return "      -"
    return f"{pct(samples, 0.99) * 1000:5.1f}/{max(samples) * 1000:5.1f} (n={len(samples)})"


def cpu_per_gib(runs: list[Run]) -> str:
    return "/".join(f"{statistics.median(r.cpu[k] / (r.nbytes / 2**30) for r in runs):.2f}"
                    for k in ("mcp", "server", "kernel"))


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


async def bench(opts: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="tether-bench-mcp-") as tmp:
        tmp_path = Path(tmp)
        root, local = tmp_path / "server", tmp_path / "local"
        local.mkdir()
        with LocalJupyterServer(root) as server:
            process, url = start_mcp(server, tmp_path / "state", local)
            try:
                await run_all(opts, server, process, url, root, local)
            finally:
                process.terminate()
                process.wait(20)


async def run_all(opts: argparse.Namespace, server: LocalJupyterServer,
                  process: subprocess.Popen[bytes], url: str, root: Path, local: Path) -> None:
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    started = time.perf_counter()
    async with Client(url) as client:
        connect_s = time.perf_counter() - started
        started = time.perf_counter()
        first = await client.call_tool("jupyter_ping", {})
        first_s = time.perf_counter() - started
        assert not first.is_error, first.content
        kernel_pid = int((first.structured_content or {})["supervisor_pid"])
        print(f"first tool call on a fresh MCP + Jupyter server: {first_s:.2f} s "
              f"(MCP client connect before it {connect_s:.2f} s)")
        assert server.process is not None
        pids = {"mcp": process.pid, "server": server.process.pid, "kernel": kernel_pid}

        if opts.n:
            for _ in range(20):  # warm up
                await client.call_tool("jupyter_ping", {})
            ping = await timed(client, "jupyter_ping", {}, opts.n)
            job = await client.call_tool("jupyter_job_start", {"command": "sleep 600"})
            job_id = (job.structured_content or {})["job_id"]
            status = await timed(client, "jupyter_job_status", {"job_id": job_id}, opts.n)
            await client.call_tool("jupyter_job_kill", {"job_id": job_id, "sig": 9})
            print(fmt("jupyter_ping (MCP, HTTP)", summary(ping)), f"  max {max(ping)*1000:.1f} ms")
            print(fmt("jupyter_job_status (MCP, HTTP)", summary(status)),
                  f"  max {max(status)*1000:.1f} ms")

        async with Client(url) as ping_client, anyio.create_task_group() as group:
            pinger = Pinger(ping_client)
            if not opts.no_pinger:
                group.start_soon(pinger.run)
            await anyio.sleep(1.0)  # idle pings first

            async def measure(phase: str, nbytes: int, action: Any) -> Run:
                # No writeback of the last run's file going on meanwhile: both start equal.
                await anyio.to_thread.run_sync(os.sync)
                pinger.phase = phase
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                with PeakRss(process.pid) as rss:
                    started = time.perf_counter()
                    own = await action()
                    seconds = own[0] if own is not None else time.perf_counter() - started
                pinger.phase = "between"
                cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
                if own is not None:
                    cpu["mcp"] = own[1]  # the GET process stands where the MCP server would
                return Run(seconds, nbytes, cpu, rss.growth_mib)

            rows = []
            for mib in opts.sizes:
                size = mib * MiB
                rel = f"bench/data-{mib}.bin"
                digest = write_random(root / rel, size)
                # A VM backs memory its guest never used lazily: writing a file there is
                # slow the first time. Recycle pages first, so the first round is not
                # penalised for that.
                write_random(local / "scratch.bin", 2 * size)
                (local / "scratch.bin").unlink()
                gets: list[Run] = []
                downs: list[Run] = []
                for index in range(opts.rounds):
                    dest_get = local / f"get-{mib}-{index}.bin"
                    dest = local / f"down-{mib}-{index}.bin"

                    async def get(dest_get: Path = dest_get,
                                  rel: str = rel) -> tuple[float, float]:
                        done = await anyio.run_process(
                            [sys.executable, "-c", GET_SCRIPT, f"{server.url}files/{rel}",
                             server.token, str(dest_get)])
                        own = json.loads(done.stdout)
                        return float(own["seconds"]), float(own["cpu"])

                    async def down(dest: Path = dest, rel: str = rel,
                                   digest: str = digest) -> None:
                        if opts.cold:
                            os.utime(root / rel)
                        result = await client.call_tool("jupyter_download_to_local", {
                            "remote_path": rel, "local_path": str(dest), "timeout_s": 3600})
                        assert not result.is_error, result.content
                        assert (result.structured_content or {})["sha256"] == digest

                    for which in (("get", "mcp") if index % 2 == 0 else ("mcp", "get")):
                        if which == "get":
                            gets.append(await measure(f"get {mib}", size, get))
                            dest_get.unlink()
                        else:
                            downs.append(await measure(f"download {mib}", size, down))
                            if index == 0:
                                assert sha256(dest) == digest, "the download differs"
                            dest.unlink()
                (root / rel).unlink()
                rows.append((f"download {mib} MiB", gets, downs, f"download {mib}"))

            source = local / "upload.bin"
            up_size = opts.upload_mib * MiB
            up_digest = write_random(source, up_size)
            ups: list[Run] = []
            for index in range(opts.rounds):
                rel = f"bench/up-{index}.bin"
                # New to the uploader (a changed ctime: no cached hash), written a minute ago
                # (settled: hashed while it is sent), as a checkpoint saved earlier would be.
                past = time.time_ns() - 60 * 10**9 - index
                os.utime(source, ns=(past, past))

                async def up(rel: str = rel) -> None:
                    result = await client.call_tool("jupyter_upload_local_file", {
                        "local_path": str(source), "remote_path": rel, "timeout_s": 3600})
                    assert not result.is_error, result.content
                    assert (result.structured_content or {})["sha256"] == up_digest

                ups.append(await measure(f"upload {opts.upload_mib}", up_size, up))
                assert sha256(root / rel) == up_digest
                (root / rel).unlink()
            rows.append((f"upload {opts.upload_mib} MiB", [], ups, f"upload {opts.upload_mib}"))
            group.cancel_scope.cancel()

    report(opts, rows, pinger.samples, first_s)
    if opts.verbose:
        for phase, at, took, rtt in pinger.slow:
            print(f"  slow ping during {phase}: sent {at:.2f} s in, took {took * 1000:.0f} ms "
                  f"(link round trip {rtt * 1000:.0f} ms)")


def report(opts: argparse.Namespace, rows: list[tuple[str, list[Run], list[Run], str]],
           pings: dict[str, list[float]], first_s: float) -> None:
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; MiB/s, median / best of "
          f"{opts.rounds}{'; --cold: every download hashes the file again' if opts.cold else ''}")
    print(f"{'':<19}{'plain GET':>15}  {'via MCP tool':>15}  {'ratio':>11}  "
          f"{'MCP rounds':<20} {'ping p99/max ms':<22} {'RSS+':>6}  CPU s mcp/server/kernel")
    ratios: list[float] = []
    mcp_pings: dict[str, list[float]] = defaultdict(list)
    worst_rss = 0.0
    upload_median = 0.0
    for name, gets, runs, phase in rows:
        med = statistics.median(r.mib_s for r in runs)
        best = max(runs, key=lambda r: r.mib_s)
        rounds = "/".join(f"{r.mib_s:.0f}" for r in runs)
        cpu = "/".join(f"{best.cpu[k]:.2f}" for k in ("mcp", "server", "kernel"))
        rss = max(r.rss_mib for r in runs)
        worst_rss = max(worst_rss, rss)
        mcp_pings[phase.split()[0]].extend(pings.get(phase, []))
        if gets:
            get_med = statistics.median(r.mib_s for r in gets)
            get_best = max(r.mib_s for r in gets)
            ratio = med / get_med
            ratios.append(ratio)
            plain = f"{get_med:6.0f} / {get_best:6.0f}"
            ratio_cell = f"{ratio:4.2f} / {best.mib_s / get_best:4.2f}"
        else:
            upload_median = med
            plain, ratio_cell = "-", "-"
        print(f"{name:<19}{plain:>15}  {f'{med:6.0f} / {best.mib_s:6.0f}':>15}  {ratio_cell:>11}  "
              f"{rounds:<20} {ping_cell(pings.get(phase, [])):<22} {rss:6.1f}  {cpu}")
    print(f"pings idle {ping_cell(pings.get('idle', []))}; during the plain GETs "
          f"{ping_cell([s for k, v in pings.items() if k.startswith('get') for s in v])}")
    # CPU time is steadier than wall time on a shared machine: it says where the time goes.
    print("\nCPU seconds per GiB, median of the rounds: the client (the GET's process, or the "
          "MCP server) / the Jupyter server / the supervisor kernel")
    for name, gets, runs, _ in rows:
        cells = [f"{label} {cpu_per_gib(group)}" for label, group in
                 (("plain GET", gets), ("via MCP", runs)) if group]
        print(f"  {name:<19}" + "    ".join(cells))

    print("\ngoals:")
    if ratios:
        print(f"  downloads >= 0.9x the plain GET (medians): "
              f"{', '.join(f'{r:.2f}x' for r in ratios)}: {verdict(min(ratios) >= 0.9)}")
    print(f"  upload {opts.upload_mib} MiB median {upload_median:.0f} MiB/s >= 400: "
          f"{verdict(upload_median >= 400)}")
    for kind in ("download", "upload"):
        samples = mcp_pings[kind]
        if samples:
            ok = max(samples) < 0.05 and pct(samples, 0.99) < 0.02
            print(f"  pings during {kind}s: p99 {pct(samples, 0.99) * 1000:.1f} ms < 20, "
                  f"max {max(samples) * 1000:.1f} ms < 50: {verdict(ok)}")
    print(f"  MCP server peak RSS growth {worst_rss:.1f} MiB < 64: {verdict(worst_rss < 64)}")
    print(f"  first tool call {first_s:.2f} s < 1: {verdict(first_s < 1)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="latency samples (0: skip)")
    parser.add_argument("--sizes", default="64,256,1024", help="download sizes in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upload-mib", type=int, default=256)
    parser.add_argument("--cold", action="store_true",
                        help="touch the remote file before every download (no hash cache)")
    parser.add_argument("-v", "--verbose", action="store_true", help="list the slow pings")
    parser.add_argument("--no-pinger", action="store_true",
                        help="no second client (to see what the pings cost the transfers)")
    options = parser.parse_args()
    options.sizes = [int(v) for v in options.sizes.split(",") if v]
    anyio.run(bench, options)
