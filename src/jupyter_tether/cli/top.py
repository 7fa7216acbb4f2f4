"""``top``: the remote box's GPUs, RAM and disks and what each running job uses, live."""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..formatting import human
from .context import EXIT_OK, Ctx, UsageError, add_command
from .output import escape, new_table


def add_top(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "top", cmd_top,
                    "show GPUs, RAM, disks and each running job's usage, refreshing", """
        jupyter-tether top                  # live, every second; Ctrl-C quits
        jupyter-tether top --once           # one table (also what a pipe gets)
        jupyter-tether --json top | jq '.gpus.devices[] | {name, util}'
        Sampling runs on the remote only while something asks (here: while top runs).
        """, common)
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("-n", "--interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default: %(default)s)")


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}%"


def host_line(res: dict[str, Any]) -> str:
    host = res.get("host") or {}
    bits = [f"{host.get('cpu_usable') or host.get('cpu_count') or '?'} CPUs"]
    if host.get("load"):
        bits.append("load " + " ".join(f"{x:.2f}" for x in host["load"]))
    total, available = host.get("mem_total"), host.get("mem_available")
    if total:
        limited = " (cgroup limit)" if host.get("mem_limited_by") == "cgroup" else ""
        bits.append(f"RAM {human(available)} free of {human(total)}{limited}")
    if host.get("swap_total"):
        bits.append(f"swap {human(host.get('swap_free'))} free of {human(host['swap_total'])}")
    for disk in host.get("disks") or []:
        bits.append(f"disk {disk['path']} {human(disk['free'])} free")
    return " · ".join(bits)


def gpu_table(ctx: Ctx, res: dict[str, Any]) -> RenderableType:
    gpus = res.get("gpus") or {}
    devices = gpus.get("devices") or []
    if not devices:
        said = gpus.get("error") or gpus.get("note") or "no GPU figures"
        return Text(f"GPUs: {said}", style="yellow" if gpus.get("error") else "dim")
    table = new_table(ctx, "GPU", "NAME", "UTIL", "MEMORY", "TEMP", "POWER")
    for device in devices:
        power = device.get("power_w")
        limit = device.get("power_limit_w")
        table.add_row(
            str(device.get("index")), escape(device.get("name") or "?"), _pct(device.get("util")),
            f"{human(device.get('mem_used'))} / {human(device.get('mem_total'))}",
            "-" if device.get("temp_c") is None else f"{device['temp_c']:.0f}C",
            "-" if power is None else f"{power:.0f}W" + (f" / {limit:.0f}W" if limit else ""))
    return table


def job_table(ctx: Ctx, res: dict[str, Any]) -> RenderableType:
    jobs = res.get("jobs") or []
    if not jobs:
        return Text("no running jobs", style="dim")
    table = new_table(ctx, "JOB", "CPU", "RSS", "PEAK", "THREADS", "FILES", "GPU MEM", "COMMAND")
    for job in jobs:
        usage = job.get("usage") or {}
        gpu = usage.get("gpu_mem")
        command = job.get("name") or job.get("command") or ""
        command = command if len(command) <= 50 else command[:47] + "..."
        table.add_row(
            job.get("job_id") or "?", _pct(usage.get("cpu_percent")), human(usage.get("rss")),
            human(usage.get("rss_peak")), str(usage.get("threads", "-")),
            str(usage.get("open_files", "-")),
            human(gpu) if gpu is not None else ("in use" if usage.get("gpu_open") else "-"),
            escape(command))
    return table


def render(ctx: Ctx, res: dict[str, Any]) -> RenderableType:
    parts: list[RenderableType] = [Text(host_line(res))]
    for warning in res.get("warnings") or []:
        parts.append(Text(f"warning: {warning}", style="bold red"))
    parts.append(gpu_table(ctx, res))
    others = [p for p in (res.get("gpus") or {}).get("processes") or [] if not p.get("job_id")]
    if others:
        parts.append(Text("other GPU processes: " + ", ".join(
            f"pid {p.get('pid')} {human(p.get('mem_used'))}" for p in others[:8]), style="dim"))
    parts.append(job_table(ctx, res))
    sampler = res.get("sampler") or {}
    if sampler.get("samples"):
        per = 1000 * sampler["cpu_s"] / sampler["samples"]
        parts.append(Text(f"sampler: {sampler['samples']} samples, {per:.1f} ms CPU each "
                          f"(~{per / 10:.2f}% of a core at 1 Hz)", style="dim"))
    return Group(*parts)


def _plain(ctx: Ctx, renderable: RenderableType) -> None:
    """Print once: tables go through ``ctx.table`` (plain columns when piped)."""
    if isinstance(renderable, Group):
        for part in renderable.renderables:
            _plain(ctx, part)
    elif isinstance(renderable, Table):
        ctx.table(renderable)
    else:
        ctx.out.print(renderable, markup=False, highlight=False)


def cmd_top(ctx: Ctx) -> int:
    interval = ctx.args.interval
    if not 0.2 <= interval <= 3600:
        raise UsageError("--interval wants seconds between 0.2 and 3600")
    tether = ctx.connect()
    lease = interval * 3 + 5  # sampling stops on the remote soon after top does
    if ctx.json:
        ctx.emit_json(tether.resources(watch_s=0))
        return EXIT_OK
    if ctx.args.once or not ctx.tty:
        _plain(ctx, render(ctx, tether.resources(watch_s=0)))
        return EXIT_OK
    try:
        with Live(render(ctx, tether.resources(watch_s=lease)), console=ctx.out,
                  auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(ctx, tether.resources(watch_s=lease)), refresh=True)
    except KeyboardInterrupt:
        return EXIT_OK  # quitting is how top ends
