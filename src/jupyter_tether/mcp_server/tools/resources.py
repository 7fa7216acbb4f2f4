"""jupyter_resources: the remote box's GPUs, RAM and disks, and what each running job uses."""
# No ``from __future__ import annotations``: the SDK reads these signatures at runtime.

from typing import Annotated, Any

from ...formatting import readable_resources
from ..limits import bounded
from .common import ServerUrl, ToolContext, ToolTable, hints, timeout_arg

TOOLS = ToolTable()


@TOOLS.tool(hints(True, title="GPU, memory, disk and job usage"))
async def jupyter_resources(
    tc: ToolContext,
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
) -> dict[str, Any]:
    """GPUs (util, memory, temp, power, processes by job), RAM, swap, load, disk free,
    each running job's CPU %, RSS, peak, threads, open files, GPU memory; warnings."""
    async with bounded(timeout_s, "resources"):
        tether = await tc.tether(server_url)
        return readable_resources(await tether.resources(timeout=timeout_s))
