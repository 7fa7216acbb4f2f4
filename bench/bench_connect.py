"""What a new controller's connect costs, on a fresh supervisor and on one with a full event ring.

    python bench/bench_connect.py [--n 7] [--mib 30]

Every ``jupyter-tether`` command, and every MCP server or notebook that starts, connects a new
controller to the long-lived supervisor. Its event ring keeps up to 32 MiB of recent events
(job log pushes, exec outputs) for controllers that come back after a drop. This times a
connect and its first ``ping`` (median of ``--n``) and sums the CPU every process spends on it
(this one, the Jupyter server, the kernels), first with an empty ring (the baseline, measured
in the same run), then after a followed job has pushed ``--mib`` MiB of log through the ring,
with another controller attached the whole time (iopub goes to every attached client). Goal:
the full ring costs a connect no more than 1.5x the baseline in time and in CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio
import psutil
from _common import local_server

from jupyter_tether import AsyncTether
from jupyter_tether.controller.embedded import LocalJupyterServer


def tree_cpu() -> float:
    """CPU seconds of this process and all its children (the server and its kernels)."""
    total = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


async def connects(server: LocalJupyterServer, n: int) -> tuple[float, float]:
    """Median seconds to connect and ping, and median CPU seconds per connect."""
    took, cpu = [], []
    for _ in range(n):
        cpu0, started = tree_cpu(), time.perf_counter()
        async with AsyncTether(server.url, server.token) as tether:
            await tether.ping()
            took.append(time.perf_counter() - started)
            await anyio.sleep(1.0)  # whatever is sent after the connect arrives meanwhile
        cpu.append(tree_cpu() - cpu0)
    return statistics.median(took), statistics.median(cpu)


async def main(n: int, mib: int) -> None:
    with local_server() as server:
        async with AsyncTether(server.url, server.token) as attached:
            empty = await connects(server, n)
            lines = mib * 16  # 64 KiB lines
            job = await attached.jobs.start(
                f"python3 -c \"import sys\nfor _ in range({lines}): "
                "sys.stdout.write('x' * 65535 + '\\n')\"")
            followed = 0
            async for chunk in job.follow(0):
                followed += len(chunk)
            assert followed == lines * 65536, followed
            full = await connects(server, n)
    print(f"connect + first ping, median of {n}; CPU of all processes per connect")
    print(f"{'ring empty (baseline)':<34} {empty[0] * 1000:8.1f} ms {empty[1]:7.2f} CPU-s")
    print(f"{f'ring after {mib} MiB of log events':<34} {full[0] * 1000:8.1f} ms "
          f"{full[1]:7.2f} CPU-s")
    time_ratio, cpu_ratio = full[0] / empty[0], full[1] / max(empty[1], 1e-3)
    verdict = "met" if time_ratio <= 1.5 and cpu_ratio <= 1.5 else "NOT met"
    print(f"full / empty: {time_ratio:.2f}x time, {cpu_ratio:.2f}x CPU (goal <= 1.5x): {verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=7, help="connects per ring state")
    parser.add_argument("--mib", type=int, default=30, help="MiB of log pushed through the ring")
    args = parser.parse_args()
    anyio.run(main, args.n, args.mib)
