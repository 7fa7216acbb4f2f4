"""How sizes, durations and results read on every face: the CLI's tables, MCP results and a
notebook's repr. Pure functions of plain values (memory is in bytes on the wire).

A job's status carries its ``usage`` and, when it ended badly, a ``reason``; the
supervisor's ``resources`` op returns the whole box (host, GPUs with their processes mapped
to jobs, each running job's usage, warnings, the sampler's own cost). The helpers here shrink
both to the few numbers each face shows.
"""

from __future__ import annotations

import re
import time
from typing import Any, Protocol


class _Timed(Protocol):
    """What ``job_duration`` reads (``JobInfo`` has it)."""

    started_at: float | None
    ended_at: float | None


MIB = 1024 * 1024
GIB = 1024 * MIB


def human(value: float | None) -> str:
    """``312 MiB``, ``14.2 GiB``; ``-`` when unknown."""
    if value is None:
        return "-"
    if value >= GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / MIB:.0f} MiB"


def short_bytes(value: float | None) -> str:
    """One word for a table cell: ``312M``, ``14.2G``; ``-`` when unknown."""
    if not value:
        return "-"
    if value >= GIB:
        return f"{value / GIB:.1f}G"
    return f"{value / MIB:.0f}M"


def _mib(value: Any) -> int | None:
    return round(value / MIB) if isinstance(value, (int, float)) else None


def compact_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's usage in a few numbers: CPU %, RSS and its peak (MiB), GPU memory (MiB)."""
    if not usage:
        return None
    out = {"cpu_pct": usage.get("cpu_percent"), "rss_mb": _mib(usage.get("rss")),
           "peak_mb": _mib(usage.get("rss_peak")),
           "gpu_mb": _mib(usage.get("gpu_mem", usage.get("gpu_mem_peak"))),
           "cpu_s": usage.get("cpu_s") if usage.get("cpu_percent") is None else None}
    if usage.get("gpu_open") and out["gpu_mb"] is None:
        out["gpu"] = "in use"  # an NVIDIA device is open, nvidia-smi shows no pid of ours
    return {k: v for k, v in out.items() if v is not None}


def usage_line(usage: dict[str, Any] | None, reason: dict[str, Any] | None = None) -> str:
    """One line for people: ``CPU 98% · RSS 312 MiB (peak 320 MiB) · GPU 1.0 GiB``, and why
    it ended badly."""
    parts = []
    if usage:
        if usage.get("cpu_percent") is not None:
            parts.append(f"CPU {usage['cpu_percent']:.0f}%")
        elif usage.get("cpu_s") is not None:
            parts.append(f"CPU {usage['cpu_s']:.1f}s")
        if usage.get("rss") is not None:
            peak = usage.get("rss_peak")
            parts.append(f"RSS {human(usage['rss'])}"
                         + (f" (peak {human(peak)})" if peak and peak > usage["rss"] else ""))
        elif usage.get("rss_peak"):
            parts.append(f"peak RSS {human(usage['rss_peak'])}")
        gpu = usage.get("gpu_mem", usage.get("gpu_mem_peak"))
        if gpu:
            parts.append(f"GPU {human(gpu)}")
        elif usage.get("gpu_open"):
            parts.append("GPU in use")
    if reason:
        parts.append(f"{reason.get('kind')}: {reason.get('message')}")
    return " · ".join(parts)


def compact_resources(res: dict[str, Any]) -> dict[str, Any]:
    """The host and GPUs in a few numbers (for ``jupyter_status``), with the warnings."""
    host = res.get("host") or {}
    total, available = host.get("mem_total"), host.get("mem_available")
    out: dict[str, Any] = {
        "ram_gb": round(total / GIB, 1) if total else None,
        "ram_available_pct": round(100 * available / total, 1) if total and available
        is not None else None,
        "load1": (host.get("load") or [None])[0], "cpus": host.get("cpu_usable")
        or host.get("cpu_count"),
        "disk_free_gb": {d["path"]: round(d["free"] / GIB, 1) for d in host.get("disks") or []},
    }
    gpus = res.get("gpus") or {}
    if gpus.get("devices"):
        out["gpus"] = [{"index": d.get("index"), "name": d.get("name"), "util": d.get("util"),
                        "mem_used_mb": _mib(d.get("mem_used")),
                        "mem_total_mb": _mib(d.get("mem_total"))} for d in gpus["devices"]]
    else:
        out["gpus"] = gpus.get("error") or gpus.get("note") or "none"
    if res.get("warnings"):
        out["warnings"] = res["warnings"]
    return out


def _gb(value: Any) -> float | None:
    return round(value / GIB, 2) if isinstance(value, (int, float)) else None


def readable_resources(res: dict[str, Any]) -> dict[str, Any]:
    """The whole ``resources`` result in units an agent reads at a glance (GB, MB, %)."""
    host = res.get("host") or {}
    out: dict[str, Any] = {"host": {
        "cpus": host.get("cpu_usable") or host.get("cpu_count"), "load": host.get("load"),
        "ram_total_gb": _gb(host.get("mem_total")),
        "ram_available_gb": _gb(host.get("mem_available")),
        "ram_limited_by": host.get("mem_limited_by"),
        "swap_total_gb": _gb(host.get("swap_total")), "swap_free_gb": _gb(host.get("swap_free")),
        "disks": [{"path": d["path"], "free_gb": _gb(d["free"]), "total_gb": _gb(d["total"])}
                  for d in host.get("disks") or []]}}
    gpus = res.get("gpus") or {}
    listed: dict[str, Any] = {"available": gpus.get("available")}
    for key in ("note", "error", "processes_error"):
        if gpus.get(key):
            listed[key] = gpus[key]
    if gpus.get("devices"):
        listed["devices"] = [
            {"index": d.get("index"), "name": d.get("name"), "util_pct": d.get("util"),
             "mem_used_mb": _mib(d.get("mem_used")), "mem_total_mb": _mib(d.get("mem_total")),
             "temp_c": d.get("temp_c"), "power_w": d.get("power_w"),
             "power_limit_w": d.get("power_limit_w")} for d in gpus["devices"]]
        listed["processes"] = [
            {"pid": p.get("pid"), "gpu": p.get("gpu_index"), "mem_mb": _mib(p.get("mem_used")),
             "name": p.get("process_name"), "job_id": p.get("job_id")}
            for p in gpus.get("processes") or []]
    out["gpus"] = listed
    if "jobs" in res:
        out["jobs"] = []
        for job in res["jobs"]:
            usage = job.get("usage") or {}
            row = {"job_id": job.get("job_id"), "name": job.get("name"),
                   "command": (job.get("command") or "")[:120],
                   **(compact_usage(usage) or {}),
                   **{k: usage[k] for k in ("threads", "procs", "open_files") if k in usage}}
            out["jobs"].append({k: v for k, v in row.items() if v is not None})
    out["warnings"] = res.get("warnings") or []
    sampler = res.get("sampler") or {}
    out["sampler"] = {k: sampler.get(k) for k in ("active", "samples", "cpu_s",
                                                  "last_sample_ms")}
    return out


def human_bytes(value: float) -> str:
    """``512 B``, ``1.5 MiB``, ... (binary units up to TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def job_duration(info: _Timed) -> str:
    """How long a job ran (or has been running): ``4.2s``, ``3m05s``, ``1h02m``; '' if unknown."""
    if not info.started_at:
        return ""
    seconds = max(0.0, (info.ended_at or time.time()) - info.started_at)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without its terminal colour and cursor sequences (CSI), as a reader sees it."""
    return _ANSI.sub("", text)
