"""Followed-log latency vs. polling with execute_request, and ping latency under log load.

    python bench/bench_jobs.py [--lines 200] [--chatty 20] [--rate-mb 1.0] [--seconds 10]

1. A job prints a wall-clock timestamp every 20 ms; the client measures print-to-client
   latency through ``follow`` (pushed) and through polling the log file with one
   ``execute_request`` per poll (the way existing tools follow logs), back to back.
2. ``--chatty`` jobs each write ``--rate-mb`` MB/s of log while one of them is followed and
   the client pings the supervisor; prints ping median/p99.
Goals on loopback: follow median <= 10 ms; ping p99 under load < 50 ms.
"""

from __future__ import annotations

import argparse
import time

import anyio
from _common import fmt, local_server, summary

from jupyter_tether import AsyncTether
from jupyter_tether.controller.execute import execute

TICKER = ("python3 -u -c \"import time\nfor i in range({n}):\n"
          "    print(repr(time.time()), flush=True); time.sleep(0.02)\"")
CHATTY = ("python3 -u -c \"import sys, time\nline = 'x' * 1023 + chr(10)\nend = time.time() + {secs}\n"
          "while time.time() < end:\n    t = time.time()\n"
          "    sys.stdout.write(line * {per_tick}); sys.stdout.flush()\n"
          "    time.sleep(max(0, 0.01 - (time.time() - t)))\"")


def latencies_from(text: str, arrivals: list[tuple[float, str]]) -> list[float]:
    return [arrived - float(line) for arrived, line in arrivals if line.strip()]


async def follow_latency(t: AsyncTether, n: int) -> list[float]:
    job = await t.jobs.start(TICKER.format(n=n))
    arrivals: list[tuple[float, str]] = []
    pending = b""
    async for chunk in job.follow():
        now = time.time()
        pending += chunk
        *lines, pending = pending.split(b"\n")
        arrivals += [(now, line.decode()) for line in lines]
    return latencies_from("", arrivals)


async def poll_latency(t: AsyncTether, n: int) -> list[float]:
    job = await t.jobs.start(TICKER.format(n=n))
    info = await job.status()
    kernel = await t.work_kernel_id()
    sock = await t._work_socket(kernel)
    offset = 0
    arrivals: list[tuple[float, str]] = []
    pending = ""
    code = ("import os\n_f = open({path!r}, 'rb'); _f.seek({off}); _d = _f.read(); _f.close()\n"
            "print(_d.decode(), end='')")
    while True:
        result = await execute(sock, code.format(path=info.log_path, off=offset),
                               store_history=False)
        now = time.time()
        offset += len(result.stdout.encode())
        pending += result.stdout
        *lines, pending = pending.split("\n")
        arrivals += [(now, line) for line in lines]
        if len(arrivals) >= n:
            break
    await job.wait(30)
    return latencies_from("", arrivals)


async def ping_under_load(t: AsyncTether, chatty: int, rate_mb: float, secs: float) -> None:
    per_tick = max(1, int(rate_mb * 1024 * 1024 / 1024 / 100))  # 1 KiB lines, 100 ticks/s
    jobs = [await t.jobs.start(CHATTY.format(secs=secs, per_tick=per_tick)) for _ in range(chatty)]
    received = 0

    async def follow_one() -> None:
        nonlocal received
        async for chunk in jobs[0].follow():
            received += len(chunk)

    pings: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(follow_one)
        started = time.monotonic()
        while time.monotonic() - started < secs:
            t0 = time.perf_counter()
            await t.link.call("ping")
            pings.append(time.perf_counter() - t0)
            await anyio.sleep(0.02)
    for job in jobs:
        await job.wait(60)
    total = 0
    for job in jobs:
        total += (await job.status()).bytes_written
    print(fmt(f"ping with {chatty} jobs x {rate_mb} MB/s logging", summary(pings)))
    print(f"  logs written {total / 2**20:.1f} MiB in {secs:.0f} s; followed one job: "
          f"{received / 2**20:.1f} MiB received")


async def main(lines: int, chatty: int, rate_mb: float, secs: float) -> None:
    with local_server() as server:
        async with AsyncTether(server.url, server.token) as t:
            await t.exec("1")
            pushed = summary(await follow_latency(t, lines))
            polled = summary(await poll_latency(t, lines))
            print(fmt("follow (pushed over the comm)", pushed))
            print(fmt("poll with one execute_request per poll", polled))
            print(f"follow vs polling: {polled['median_ms'] / pushed['median_ms']:.1f}x lower "
                  "median latency")
            await ping_under_load(t, chatty, rate_mb, secs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--chatty", type=int, default=20)
    parser.add_argument("--rate-mb", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    a = parser.parse_args()
    anyio.run(main, a.lines, a.chatty, a.rate_mb, a.seconds)
