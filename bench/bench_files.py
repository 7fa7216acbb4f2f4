"""File transfer and sync throughput, against the REST ways of moving files, on one local server.

    python bench/bench_files.py [--mib 256] [--repeat 3] [--files 2000]
                                [--chunk-mib 2] [--window 8] [--skip-contents]

1. Upload and download of a ``--mib`` MiB random file through ``tether.files`` (chunked, over
   the comm), and, in the same run, the Jupyter contents API the way existing tools upload
   (one ``PUT /api/contents/<path>`` of ``{type: file, format: base64, content}``) and the
   fastest REST download (a streamed ``GET /files/<path>``). Each is run ``--repeat`` times;
   the best and the median rate are printed, with the largest peak RSS growth of the client,
   the Jupyter server and the supervisor kernel over the runs (sampled with psutil).
2. ``sync`` of a ``--files`` file tree: first, again with nothing changed, then with one
   file changed.

Goals on loopback: upload >= 150 MB/s and >= 5x the contents PUT; download >= 150 MB/s and
at least the streamed GET; peak RSS growth <= 64 MiB per process for a 1 GiB file
(``--mib 1024 --skip-contents``); sync <= 3 s first, <= 1 s unchanged and with one change.
Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import functools
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import anyio
import httpx2
import psutil
from _common import PeakRss, local_server

from jupyter_tether import AsyncTether
from jupyter_tether.controller.embedded import LocalJupyterServer

MiB = 1024 * 1024


class Run:
    """One timed transfer and the peak RSS growth of each process meanwhile."""

    def __init__(self, seconds: float, nbytes: int, rss_mib: dict[str, float],
                 cpu_s: dict[str, float]) -> None:
        self.seconds = seconds
        self.nbytes = nbytes
        self.rss_mib = rss_mib
        self.cpu_s = cpu_s

    @property
    def mb_s(self) -> float:
        return self.nbytes / self.seconds / 1e6


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def measured(pids: dict[str, int], nbytes: int,
                   action: Callable[[], Awaitable[object]]) -> Run:
    # No writeback of the last run's file going on meanwhile: each run starts equal.
    await anyio.to_thread.run_sync(os.sync)
    # CPU seconds per process say where the time goes, even on a loaded machine.
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    with ExitStack() as stack:
        samplers = {name: stack.enter_context(PeakRss(pid)) for name, pid in pids.items()}
        started = time.perf_counter()
        await action()
        seconds = time.perf_counter() - started
    return Run(seconds, nbytes, {name: s.growth_mib for name, s in samplers.items()},
               {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()})


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            handle.write(block)
            left -= len(block)


def make_tree(root: Path, count: int) -> None:
    rng = random.Random(1)
    for index in range(count):
        path = root / f"pkg{index // 50:03d}" / f"mod{index % 50:03d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(200, 4000)))


def report(name: str, runs: list[Run]) -> Run:
    best = max(runs, key=lambda r: r.mb_s)
    median = statistics.median(r.mb_s for r in runs)
    # The worst RSS growth of any run, not the best run's: memory must stay bounded always.
    worst = {k: max(r.rss_mib[k] for r in runs) for k in best.rss_mib}
    rss = "  ".join(f"{k} {v:+6.1f}" for k, v in worst.items())
    cpu = "  ".join(f"{k} {v:4.2f}" for k, v in best.cpu_s.items())
    print(f"{name:<31} best {best.mb_s:6.1f} MB/s  median {median:6.1f} MB/s  "
          f"({best.seconds:.2f} s)\n{'':<33}peak RSS growth MiB: {rss}\n"
          f"{'':<33}CPU s (best run): {cpu}")
    return Run(best.seconds, best.nbytes, worst, best.cpu_s)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


async def contents_put(client: httpx2.AsyncClient, server: LocalJupyterServer, path: Path,
                       remote: str) -> None:
    # The way existing tools upload: the whole file, base64, in one JSON document.
    body = {"type": "file", "format": "base64",
            "content": base64.b64encode(path.read_bytes()).decode("ascii")}
    response = await client.put(f"{server.url}api/contents/{remote}", json=body)
    response.raise_for_status()


async def files_get(client: httpx2.AsyncClient, server: LocalJupyterServer, remote: str,
                    local: Path) -> None:
    async with client.stream("GET", f"{server.url}files/{remote}") as response:
        response.raise_for_status()
        with open(local, "wb") as handle:
            async for chunk in response.aiter_bytes(1 * MiB):
                handle.write(chunk)


async def main(args: argparse.Namespace) -> None:
    size = args.mib * MiB
    with tempfile.TemporaryDirectory(prefix="tether-bench-local-") as local_tmp, \
            local_server() as server:
        work = Path(local_tmp)
        source = work / "source.bin"
        write_random(source, size)
        async with AsyncTether(server.url, server.token) as t, \
                httpx2.AsyncClient(headers={"Authorization": f"token {server.token}"},
                                   timeout=600) as client:
            info = await t.info()
            assert server.process is not None
            pids = {"client": os.getpid(), "server": server.process.pid, "kernel": info["pid"]}
            print(f"{args.mib} MiB file, chunk {args.chunk_mib} MiB, window {args.window}; "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
            chunk = int(args.chunk_mib * MiB)

            # Sync first: the contents API PUT below leaves the server process bloated.
            print("\nsync of a", args.files, "file tree:")
            tree = work / "tree"
            make_tree(tree, args.files)
            first = await t.files.sync(tree, "bench/tree")
            again = await t.files.sync(tree, "bench/tree")
            sources = sorted(tree.rglob("*.py"))
            victim = sources[len(sources) // 2]
            victim.write_bytes(victim.read_bytes() + b"# changed\n")
            changed = await t.files.sync(tree, "bench/tree")
            for name, result in (("first", first), ("unchanged", again), ("one change", changed)):
                print(f"  {name:<11} {result['seconds']:6.3f} s  uploaded {result['uploaded']:5d} "
                      f"files, {result['bytes_sent']:9d} bytes in {result['batches']} batches")
            up: list[Run] = []
            down: list[Run] = []
            down_comm: list[Run] = []
            put: list[Run] = []
            get: list[Run] = []
            for index in range(args.repeat):
                remote = f"bench/up{index}.bin"
                os.utime(source)  # a new mtime: the upload hashes the file again, as a new one would
                up.append(await measured(pids, size, functools.partial(
                    t.files.upload, source, remote, chunk_size=chunk, window=args.window)))
                back = work / f"back{index}.bin"
                down.append(await measured(pids, size, functools.partial(
                    t.files.download, remote, back, chunk_size=chunk, window=args.window)))
                back.unlink()
                down_comm.append(await measured(pids, size, functools.partial(
                    t.files.download, remote, back, chunk_size=chunk, window=args.window,
                    via="comm")))
                back.unlink()
                got = work / f"get{index}.bin"
                get.append(await measured(pids, size, functools.partial(
                    files_get, client, server, remote, got)))
                got.unlink()
                if not args.skip_contents:
                    put.append(await measured(pids, size, functools.partial(
                        contents_put, client, server, source, remote + ".put")))
                    await t.files.remove(remote + ".put")
                await t.files.remove(remote)

            print()
            best_up = report("tether upload", up)
            best_down = report("tether download (auto: ranged /files)", down)
            best_down_comm = report("tether download (comm chunks)", down_comm)
            best_put = report("contents API PUT (base64 JSON)", put) if put else None
            best_get = report("streamed GET /files/<path>", get)

            print("\ngoals:")
            print(f"  upload {best_up.mb_s:.0f} MB/s >= 150: {verdict(best_up.mb_s >= 150)}")
            if best_put is not None:
                ratio = best_up.mb_s / best_put.mb_s
                print(f"  upload / contents PUT = {ratio:.1f}x >= 5x: {verdict(ratio >= 5)}")
            print(f"  download {best_down.mb_s:.0f} MB/s >= 150: "
                  f"{verdict(best_down.mb_s >= 150)}")
            ratio = best_down.mb_s / best_get.mb_s
            print(f"  download / streamed GET = {ratio:.2f}x >= 1: {verdict(ratio >= 1)}")
            print(f"  comm-only download {best_down_comm.mb_s:.0f} MB/s >= 150: "
                  f"{verdict(best_down_comm.mb_s >= 150)} (the path gateways use)")
            worst = max(max(r.rss_mib.values()) for r in (best_up, best_down, best_down_comm))
            scaled = worst * 1024 / args.mib if args.mib < 1024 else worst
            print(f"  peak RSS growth of any process {worst:.1f} MiB (goal <= 64 MiB at 1 GiB"
                  f"{'' if args.mib >= 1024 else '; run with --mib 1024 to check it'})"
                  + ("" if args.mib < 1024 else f": {verdict(scaled <= 64)}"))
            print(f"  sync first {first['seconds']:.2f} s <= 3: {verdict(first['seconds'] <= 3)}; "
                  f"unchanged {again['seconds']:.2f} s <= 1: {verdict(again['seconds'] <= 1)} "
                  f"(bytes sent {again['bytes_sent']}); one change {changed['seconds']:.2f} s "
                  f"<= 1: {verdict(changed['seconds'] <= 1)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="file size in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--files", type=int, default=2000, help="files in the sync tree")
    parser.add_argument("--chunk-mib", type=float, default=2)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--skip-contents", action="store_true",
                        help="leave out the contents API PUT (it holds the file ~4x in memory)")
    anyio.run(main, parser.parse_args())
