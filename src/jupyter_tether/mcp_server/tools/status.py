"""jupyter_status: where things stand, for this MCP server and one target."""
# No ``from __future__ import annotations``: the SDK reads these signatures at runtime.

import os
from typing import Annotated, Any

from ... import __version__
from ...errors import TetherError
from ...formatting import compact_resources
from ..limits import bounded
from .common import ServerUrl, ToolContext, ToolTable, hints, job_dict, timeout_arg

TOOLS = ToolTable()


@TOOLS.tool(hints(True, title="jupyter-tether status"))
async def jupyter_status(
    tc: ToolContext,
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
) -> dict[str, Any]:
    """Where things stand: target, link (connected, reconnects), supervisor, kernels, jobs
    (running, recent), RAM, disk and GPUs in brief, the config's named targets (usable as
    server_url) and the targets this MCP server has open."""
    async with bounded(timeout_s, "status"):
        tether = await tc.tether(server_url)
        link = await tether.status()
        facts = await tether.info()
        jobs = await tether.jobs.list()
        try:
            box: dict[str, Any] = compact_resources(
                await tether.resources(jobs=False, timeout=min(timeout_s, 15.0)))
        except TetherError as exc:  # an older supervisor, or nvidia-smi hung: say so
            box = {"error": str(exc)}
    jobs.sort(key=lambda i: i.started_at or 0, reverse=True)
    return {
        "mcp_server": {"version": __version__, "pid": os.getpid(),
                       "targets": tc.pool.describe()},
        "named_targets": tc.pool.configured(),
        "target": link.get("target"),
        "embedded": link.get("embedded"),
        "link": {k: link.get(k) for k in ("connected", "protocol", "codec", "reconnects",
                                            "last_error", "connected_since", "session_id",
                                            "subshell_id")},
        "reconnects": link.get("reconnects"),
        "supervisor": {"kernel_id": link.get("kernel_id"), "pid": facts.get("pid"),
                       "python": facts.get("python"), "hostname": facts.get("hostname"),
                       "root_dir": facts.get("root_dir"),
                       "payload_hash": facts.get("payload_hash"),
                       "install": link.get("install")},
        "kernel": {"supervisor_kernel_id": link.get("kernel_id"),
                   "work_kernel_id": link.get("work_kernel_id")},
        "jobs": {"total": len(jobs), "running": sum(1 for i in jobs if i.state == "running"),
                 "recent": [job_dict(i) for i in jobs[:10]]},
        "resources": box,
    }
