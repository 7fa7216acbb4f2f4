"""Comm RPC round trip vs. a fresh execute_request per call vs. REST, on one local server.

    python bench/bench_rpc.py [--n 300]

Prints median and p99 for: a ``ping`` over the persistent comm; the way existing tools poll
(open a new kernel websocket, send one ``execute_request``, wait for the reply, close); and
REST ``GET /api/kernels``. Goal on loopback: comm median <= 6 ms and >= 5x faster than
execute-per-call.
"""

from __future__ import annotations

import argparse
import time

import anyio
import httpx2
from _common import fmt, local_server, summary

from jupyter_tether import AsyncTether
from jupyter_tether.controller.execute import execute
from jupyter_tether.controller.kernel_ws import KernelSocket, new_session_id


async def main(n: int) -> None:
    with local_server() as server:
        async with AsyncTether(server.url, server.token) as tether:
            for _ in range(20):  # warm up
                await tether.link.call("ping")
            comm = []
            for _ in range(n):
                started = time.perf_counter()
                await tether.link.call("ping")
                comm.append(time.perf_counter() - started)

            kernel_id = await tether.work_kernel_id()
            await tether.exec("1")
            fresh = []
            for _ in range(max(20, n // 5)):
                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    sock = KernelSocket(tether.target, kernel_id, session_id=new_session_id(),
                                        ping_interval=None)
                    await sock.open(tg)
                    await execute(sock, "1", store_history=False)
                    await sock.aclose()
                fresh.append(time.perf_counter() - started)

            rest = []
            async with httpx2.AsyncClient(headers=tether.target.auth_headers()) as client:
                for _ in range(n):
                    started = time.perf_counter()
                    (await client.get(tether.target.http_url("api/kernels"))).raise_for_status()
                    rest.append(time.perf_counter() - started)

    s_comm, s_fresh, s_rest = summary(comm), summary(fresh), summary(rest)
    print(fmt("comm RPC ping (persistent)", s_comm))
    print(fmt("execute_request over a new websocket", s_fresh))
    print(fmt("REST GET /api/kernels", s_rest))
    print(f"comm vs execute-per-call: {s_fresh['median_ms'] / s_comm['median_ms']:.1f}x faster "
          "(median)")
    print(f"comm vs REST:             {s_rest['median_ms'] / s_comm['median_ms']:.1f}x (median)")
    verdict = "PASS" if s_comm["median_ms"] <= 6 and s_fresh["median_ms"] >= 5 * s_comm[
        "median_ms"] else "MISS"
    print(f"goal (median <= 6 ms and >= 5x execute-per-call): {verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="round trips per method")
    anyio.run(main, parser.parse_args().n)
