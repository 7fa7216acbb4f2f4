"""Time from heal to the first successful RPC after a clean close, a reset and a blackhole.

    python bench/bench_reconnect.py [--trials 5] [--down 1.0] [--profile fast|default|both]

A local Jupyter server behind the cuttable proxy of ``tests/netfault.py``; for each fault
the link is broken while idle, kept down ``--down`` seconds after the link noticed (so that
reconnect attempts fail and back off meanwhile), then healed, and a ``ping`` is sent at once.
Prints the median over ``--trials`` of heal -> first successful RPC (and, for blackholes,
how long keepalive took to notice). ``close, server up`` is a clean close with the path
still working: drop -> first RPC. Profiles: ``fast`` is the tests' LinkOptions (ping 1 s,
ping timeout 2 s, backoff max 0.5 s); ``default`` is ``LinkOptions()``.

Blackholes come in two kinds: ``drop`` never forwards a connection opened during the outage
(a dead middlebox); ``hold`` forwards it once healed (what a client's SYN retransmit sees
when a route comes back). Goal: <= 2 s after a blackhole, <= 0.5 s after a clean close.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from _common import local_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jupyter_tether import AsyncTether, LinkOptions
from tests.netfault import FaultProxy

PROFILES = {
    "fast": dict(ping_interval=1.0, ping_timeout=2.0, reconnect_wait=60.0, backoff_max=0.5),
    "default": {},
}


async def wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    started = anyio.current_time()
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)
    return anyio.current_time() - started


async def trial(t: AsyncTether, proxy: FaultProxy, fault: str, down: float) -> tuple[float, float]:
    """One fault; returns (heal -> first RPC, time for the link to notice the fault)."""
    await t.link.call("ping")
    if fault == "close, server up":
        started = anyio.current_time()
        proxy.cut(stay_down=False)
        await t.link.call("ping", timeout=120)
        return anyio.current_time() - started, 0.0
    if fault == "cut":
        proxy.cut()
    elif fault == "reset":
        proxy.reset()
    else:
        proxy.blackhole(new="hold" if fault.endswith("hold") else "drop")
    noticed = await wait_for(lambda: not t.link.connected, 120)
    await anyio.sleep(down)
    proxy.heal()
    healed = anyio.current_time()
    await t.link.call("ping", timeout=120)
    return anyio.current_time() - healed, noticed


async def run_profile(name: str, trials: int, down: float) -> None:
    options = LinkOptions(**PROFILES[name])  # type: ignore[arg-type]
    print(f"\nprofile {name}: ping_interval {options.ping_interval}s, ping_timeout "
          f"{options.ping_timeout}s, backoff {options.backoff_initial}-{options.backoff_max}s, "
          f"down {down}s after the link noticed, {trials} trials")
    faults = ["close, server up", "cut", "reset", "blackhole drop", "blackhole hold"]
    goals = {"close, server up": 0.5, "cut": 0.5, "reset": 0.5}
    with local_server() as server, FaultProxy.for_url(server.url) as proxy:
        async with AsyncTether(proxy.url_for(server.url), server.token, options=options) as t:
            for fault in faults:
                heals, notices = [], []
                for _ in range(trials):
                    heal, noticed = await trial(t, proxy, fault, down)
                    heals.append(heal)
                    notices.append(noticed)
                median = statistics.median(heals)
                goal = goals.get(fault, 2.0)
                line = (f"  {fault:<17} heal -> first RPC median {median:6.3f}s  "
                        f"max {max(heals):6.3f}s  (goal <= {goal}s: "
                        f"{'PASS' if median <= goal else 'MISS'})")
                if fault.startswith("blackhole"):
                    line += f"  noticed after {statistics.median(notices):.2f}s"
                print(line, flush=True)
            print(f"  reconnects {t.link.reconnects}, proxy {proxy.counters.snapshot()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--down", type=float, default=1.0,
                        help="seconds the path stays broken after the link noticed")
    parser.add_argument("--profile", choices=["fast", "default", "both"], default="both")
    args = parser.parse_args()
    started = time.monotonic()
    for name in (["fast", "default"] if args.profile == "both" else [args.profile]):
        anyio.run(run_profile, name, args.trials, args.down)
    print(f"\ntotal {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
