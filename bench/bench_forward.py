"""Port forwarding through the comm vs. the remote port directly, on one local server.

    python bench/bench_forward.py [--size-mib 64] [--rounds 3] [--n 200]

``python -m http.server`` runs as a remote job; every figure is measured against it directly
(the baseline, in the same run) and through ``t.forward``. HTTP clients run in their own
process, as a browser would. Prints:

- throughput of a GET of a ``--size-mib`` file (best of ``--rounds``), direct and forwarded;
- latency of small GETs: a new connection per request (what http.server's HTTP/1.0 does),
  and the latency the forward adds (median of forwarded minus median of direct);
- ping round trips on the link while the tunnel is saturated by downloads.

Goals on loopback: >= 100 MiB/s and >= 0.5x direct; added small-request latency median
< 3 ms; ping p99 < 20 ms while saturated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import anyio
from _common import fmt, local_server, summary

from jupyter_tether import AsyncTether
from jupyter_tether.controller.embedded import free_port

MIB = 1024 * 1024

# One GET per connection, timed in a separate process so the controller has its own GIL.
CLIENT = r"""
import json, socket, sys, time
port, path, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
times, sizes = [], []
buf = bytearray(4 * 1024 * 1024)
for _ in range(count):
    started = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(("GET /%s HTTP/1.0\r\nHost: x\r\n\r\n" % path).encode())
    size = 0
    while True:
        n = s.recv_into(buf)
        if not n:
            break
        size += n
    s.close()
    times.append(time.perf_counter() - started)
    sizes.append(size)
print(json.dumps({"times": times, "sizes": sizes}))
"""


async def run_client(port: int, path: str, count: int) -> dict[str, list[float]]:
    result = await anyio.run_process([sys.executable, "-c", CLIENT, str(port), path, str(count)])
    data: dict[str, list[float]] = json.loads(result.stdout)
    return data


async def throughput(port: int, size: int, rounds: int) -> float:
    best = 0.0
    for _ in range(rounds):
        data = await run_client(port, "big.bin", 1)
        assert data["sizes"][0] > size, data["sizes"]
        best = max(best, size / MIB / data["times"][0])
    return best


async def main(size_mib: int, rounds: int, n: int) -> None:
    with local_server() as server:
        root = Path(server.root_dir)
        with open(root / "big.bin", "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(MIB))
        (root / "small.txt").write_text("hello\n" * 20)
        size = size_mib * MIB
        async with AsyncTether(server.url, server.token) as t:
            port = free_port()
            job = await t.jobs.start(f"{sys.executable} -m http.server {port} --bind 127.0.0.1")
            fwd = await t.forward(port)
            while not await fwd.probe():
                await anyio.sleep(0.2)
            local = fwd.local_port
            await run_client(port, "small.txt", 20)  # warm up both paths
            await run_client(local, "small.txt", 20)

            direct_bw = await throughput(port, size, rounds)
            forward_bw = await throughput(local, size, rounds)

            idle_pings = []
            for _ in range(n):
                started = time.perf_counter()
                await t.link.call("ping")
                idle_pings.append(time.perf_counter() - started)

            direct_small = (await run_client(port, "small.txt", n))["times"]
            forward_small = (await run_client(local, "small.txt", n))["times"]

            # Pings on the link while clients keep the tunnel saturated.
            pings: list[float] = []
            saturating = True

            async def saturate() -> None:
                while saturating:
                    await run_client(local, "big.bin", 1)

            async with anyio.create_task_group() as tg:
                tg.start_soon(saturate)
                tg.start_soon(saturate)
                await anyio.sleep(0.5)
                for _ in range(n):
                    started = time.perf_counter()
                    await t.link.call("ping")
                    pings.append(time.perf_counter() - started)
                    await anyio.sleep(0.01)
                saturating = False
            info = fwd.info()
            await fwd.close()
            await job.kill(grace=1)

    s_direct, s_forward, s_ping = summary(direct_small), summary(forward_small), summary(pings)
    added = s_forward["median_ms"] - s_direct["median_ms"]
    print(f"GET {size_mib} MiB direct:          {direct_bw:8.1f} MiB/s")
    print(f"GET {size_mib} MiB through forward: {forward_bw:8.1f} MiB/s "
          f"({forward_bw / direct_bw:.2f}x direct; goal >= 100 MiB/s and >= 0.5x)")
    print(fmt("small GET, direct (new connection)", s_direct))
    print(fmt("small GET, through forward (new connection)", s_forward))
    print(f"latency added by the forward: median {added:.2f} ms (goal < 3 ms)")
    print(fmt("ping on the link, idle", summary(idle_pings)))
    print(fmt("ping on the link, tunnel saturated", s_ping) + "  (goal p99 < 20 ms)")
    print(f"forward counters: {info['connections']} connections, "
          f"{info['bytes_down'] / MIB:.0f} MiB down, {info['failed']} failed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    anyio.run(main, args.size_mib, args.rounds, args.n)
