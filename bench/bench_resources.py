"""What usage sampling costs the supervisor, and whether pings notice it.

    python bench/bench_resources.py [--jobs 20] [--seconds 20] [--fake-nvidia-smi]

Starts ``--jobs`` jobs (each a shell and a sleep: two processes), then for ``--seconds``
each, pinging the supervisor every 50 ms:

1. idle: nobody asks for usage, so nothing samples;
2. watched: a client asks ``resources`` once a second (what ``jupyter-tether top`` does), so
   the supervisor samples once a second (host, /proc for every job, nvidia-smi when there).

Prints the supervisor kernel's CPU (% of one core, from /proc/<pid>/stat) in both phases,
the sampler's own CPU per sample (thread time, as it reports it), and ping median/p99.
``--fake-nvidia-smi`` puts a STAND-IN nvidia-smi (a shell script printing recorded T4 output)
on the server's PATH, to count the cost of running it; it is not the real binary.
Goal: sampling under 2% of one core with 20 jobs; ping latency unchanged.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import anyio
from _common import fmt, local_server, summary

from jupyter_tether import AsyncTether

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nvidia_smi"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def fake_nvidia_smi(folder: Path) -> None:
    """A stand-in for the real binary: prints the recorded two-T4 outputs."""
    script = folder / "nvidia-smi"
    gpus, apps = FIXTURES / "t4_x2_training.gpu.csv", FIXTURES / "t4_x2_training.apps.csv"
    script.write_text("#!/bin/sh\n# STAND-IN for nvidia-smi (benchmark only)\n"
                      f'case "$1" in --query-gpu=*) cat "{gpus}";; *) cat "{apps}";; esac\n')
    script.chmod(0o755)


async def phase(t: AsyncTether, pid: int, seconds: float, watched: bool) -> dict[str, float]:
    pings: list[float] = []
    cpu_start, wall_start = cpu_seconds(pid), time.monotonic()
    next_ask = wall_start
    while time.monotonic() - wall_start < seconds:
        if watched and time.monotonic() >= next_ask:
            await t.resources(watch_s=5)
            next_ask += 1.0
        started = time.perf_counter()
        await t.link.call("ping")
        pings.append(time.perf_counter() - started)
        await anyio.sleep(0.05)
    cpu = cpu_seconds(pid) - cpu_start
    wall = time.monotonic() - wall_start
    stats = summary(pings)
    stats["cpu_pct"] = 100 * cpu / wall
    return stats


async def main(jobs: int, seconds: float, fake: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="tether-bench-bin-") as bin_dir:
        if fake:
            fake_nvidia_smi(Path(bin_dir))
            os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        with local_server() as server:
            async with AsyncTether(server.url, server.token) as t:
                pid = int(t.link.facts["pid"])
                started = [await t.jobs.start("sleep 600; true") for _ in range(jobs)]
                try:
                    await anyio.sleep(2)  # the starts' own work is done
                    idle = await phase(t, pid, seconds, watched=False)
                    before = (await t.resources(watch_s=0))["sampler"]
                    watched = await phase(t, pid, seconds, watched=True)
                    after = (await t.resources(watch_s=0))["sampler"]
                    res = await t.resources(watch_s=0)
                finally:
                    for job in started:
                        await job.kill(9, grace=0)
    samples = after["samples"] - before["samples"]
    per_sample = 1000 * (after["cpu_s"] - before["cpu_s"]) / max(1, samples)
    print(f"{jobs} jobs ({sum(j['usage']['procs'] for j in res['jobs'])} processes), "
          f"GPUs: {res['gpus'].get('note') or len(res['gpus'].get('devices') or [])}"
          f"{' (stand-in nvidia-smi)' if fake else ''}")
    print(fmt("ping, idle (no sampling)", idle))
    print(fmt("ping, watched (resources at 1 Hz)", watched))
    print(f"supervisor kernel CPU: idle {idle['cpu_pct']:.2f}% of a core, watched "
          f"{watched['cpu_pct']:.2f}% (difference {watched['cpu_pct'] - idle['cpu_pct']:.2f}%)")
    print(f"sampler: {samples} samples, {per_sample:.2f} ms CPU each "
          f"= {per_sample / 10:.2f}% of a core at 1 Hz; nvidia-smi runs: "
          f"{after['gpu_samples'] - before['gpu_samples']}, "
          f"{after['gpu_wall_s'] - before['gpu_wall_s']:.2f} s wall in all")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--fake-nvidia-smi", action="store_true")
    a = parser.parse_args()
    anyio.run(main, a.jobs, a.seconds, a.fake_nvidia_smi)
