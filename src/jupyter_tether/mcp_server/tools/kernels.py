"""Server and kernel tools: ping, the environment snapshot, kernels and sessions, and running
Python in a kernel."""
# No ``from __future__ import annotations``: the SDK reads these signatures at runtime.

from typing import Annotated, Any

from mcp.server.mcpserver import Context
from pydantic import Field

from ..limits import bounded, cap_value
from ..progress import activity
from .common import KernelCompat, PingResult, ServerUrl, ToolContext, ToolTable, hints, timeout_arg

TOOLS = ToolTable()


@TOOLS.tool(hints(True, title="Ping the Jupyter server"))
async def jupyter_ping(
    tc: ToolContext,
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
) -> PingResult:
    """Check the Jupyter server and jupyter-tether's supervisor answer: the round trip
    time over the link (rtt_s) and the server's version."""
    async with bounded(timeout_s, "ping"):
        tether = await tc.tether(server_url)
        result = await tether.ping(timeout=timeout_s)
    return PingResult(ok=bool(result.get("ok")), base_url=tether.target.display_url,
                      rtt_s=round(float(result["rtt_ms"]) / 1000, 4),
                      server_version=result.get("server_version"),
                      supervisor_pid=result.get("supervisor_pid"))


@TOOLS.tool(hints(True, title="Remote environment snapshot"))
async def jupyter_env_snapshot(
    tc: ToolContext,
    ctx: Context,
    kernel_id: KernelCompat = None,
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 120.0,
) -> dict[str, Any]:
    """Reproducibility snapshot of the remote: python, platform, cwd, CUDA env vars,
    nvidia-smi (-L), nvcc, pip freeze, torch version/CUDA/devices. Long outputs are capped."""
    tc.relative_paths = False  # a snapshot keeps the remote's own view: its absolute cwd
    async with bounded(timeout_s + 10, "env snapshot"), activity(ctx, "env snapshot"):
        tether = await tc.tether(server_url)
        snapshot = await tether.env_snapshot(timeout=timeout_s)
    return dict(cap_value(snapshot))


@TOOLS.tool(hints(True, title="List kernels"))
async def jupyter_list_kernels(
    tc: ToolContext,
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
) -> dict[str, Any]:
    """Running kernels. role="supervisor" marks jupyter-tether's own (never run code
    there), role="work" its default work kernel."""
    async with bounded(timeout_s, "list kernels"):
        tether = await tc.tether(server_url)
        kernels = await tether.list_kernels()
        status = await tether.status()
    for kernel in kernels:
        kid = kernel.get("id")
        kernel["role"] = ("supervisor" if kid == status.get("kernel_id") else
                          "work" if kid == status.get("work_kernel_id") else None)
    return {"kernels": kernels, "count": len(kernels)}


@TOOLS.tool(hints(True, title="List sessions"))
async def jupyter_list_sessions(
    tc: ToolContext,
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
) -> dict[str, Any]:
    """Jupyter sessions (notebooks, consoles, jupyter-tether's own)."""
    async with bounded(timeout_s, "list sessions"):
        sessions = await (await tc.tether(server_url)).list_sessions()
    return {"sessions": sessions, "count": len(sessions)}


@TOOLS.tool(hints(False, title="Start a kernel"))
async def jupyter_start_kernel(
    tc: ToolContext,
    kernel_name: Annotated[str, Field(description="Kernel spec name.")] = "python3",
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
) -> dict[str, Any]:
    """Start a kernel; returns its kernel_id for jupyter_exec_python. Rarely needed: exec
    without kernel_id runs in a persistent work kernel."""
    async with bounded(timeout_s, "start kernel"):
        model = await (await tc.tether(server_url)).start_kernel(kernel_name)
    return {**model, "kernel_id": model.get("id")}


@TOOLS.tool(hints(False, destructive=True, idempotent=True, title="Shut down a kernel"))
async def jupyter_shutdown_kernel(
    tc: ToolContext,
    kernel_id: Annotated[str, Field(description="Id of the kernel to shut down.",
                                    min_length=1)],
    now: Annotated[bool, Field(description="Shut down at once; false first interrupts "
                                           "the kernel.")] = True,
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
) -> dict[str, Any]:
    """Shut down a kernel (its variables are lost). The supervisor kernel is refused."""
    async with bounded(timeout_s, "shutdown kernel"):
        await (await tc.tether(server_url)).shutdown_kernel(kernel_id, now)
    return {"kernel_id": kernel_id, "shutdown": True, "mode": "now" if now else "graceful"}


@TOOLS.tool(hints(False, destructive=True, title="Run Python"))
async def jupyter_exec_python(
    tc: ToolContext,
    ctx: Context,
    code: Annotated[str, Field(description="Python code.")],
    kernel_id: Annotated[str | None, Field(
        description="Default: a persistent work kernel (variables persist).")] = None,
    timeout_s: Annotated[float, timeout_arg(
        "Past it the kernel is interrupted (status 'timeout').")] = 120.0,
    server_url: ServerUrl = None,
    max_output_chars: Annotated[int, Field(
        description="Cap on stdout/stderr (the tail is kept).", ge=100)] = 20000,
) -> dict[str, Any]:
    """Run Python in a remote kernel; returns status, stdout, stderr, results (display
    data by MIME type), error with traceback. Images are saved to local files (images),
    never inlined. Work over a few minutes: jupyter_job_start."""
    async with bounded(timeout_s + 30, "exec"), activity(ctx, "exec"):
        tether = await tc.tether(server_url)
        result = await tether.exec(code, kernel_id=kernel_id, timeout=timeout_s,
                                   max_output_chars=max_output_chars)
        used = kernel_id or await tether.work_kernel_id()
    out = result.to_dict()
    out["kernel_id"] = used
    return out
