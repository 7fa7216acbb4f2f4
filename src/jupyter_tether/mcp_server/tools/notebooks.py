"""Notebook tools: read, edit (revision-checked) and run cells of a remote .ipynb, or run a
whole notebook as a job. Descriptions stay short: every tool's schema is in every agent's
context."""
# No ``from __future__ import annotations``: the SDK reads these signatures at runtime.

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from pydantic import Field

from ...agent_payload.wire import ErrorCode
from ...errors import InvalidArgument
from ..limits import bounded
from ..progress import activity
from .common import ServerUrl, ToolContext, ToolTable, hints, job_dict, timeout_arg

TOOLS = ToolTable()

NbPath = Annotated[str, Field(description="Notebook path (.ipynb).", min_length=1)]
Force = Annotated[bool, Field(description="Write despite real-time collaboration.")]


@TOOLS.tool(hints(True, title="Read a notebook"))
async def jupyter_nb_read(
    tc: ToolContext,
    path: NbPath,
    start: Annotated[int, Field(ge=0)] = 0,
    limit: Annotated[int, Field(ge=0, le=200)] = 20,
    outputs: Literal["brief", "full", "none"] = "brief",
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 60.0,
) -> dict[str, Any]:
    """Cells (index, id, type, source, execution_count, bounded outputs; images saved to
    local files) and the revision that jupyter_nb_edit needs."""
    async with bounded(timeout_s, "notebook read"):
        tether = await tc.tether(server_url)
        return await tether.notebooks.read(path, start=start, limit=limit, outputs=outputs)


@TOOLS.tool(hints(False, destructive=True, title="Edit a notebook"))
async def jupyter_nb_edit(
    tc: ToolContext,
    path: NbPath,
    ops: Annotated[list[dict[str, Any]], Field(description=(
        'All or none, in order: {op:insert,source,cell_type?,index?|after?}, '
        '{op:replace,cell,source?,cell_type?}, {op:delete,cell}, {op:move,cell,to}, '
        '{op:clear_outputs,cell?}. cell: id or index.'))],
    expected_revision: Annotated[str, Field(
        description='From jupyter_nb_read; refused if the file changed since ("" to create).')],
    create: bool = False,
    force: Force = False,
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 60.0,
) -> dict[str, Any]:
    """Edit cells atomically; the result is validated by nbformat. Returns the new
    revision and the id of each inserted cell."""
    if not expected_revision and not create:
        raise InvalidArgument(ErrorCode.INVALID_ARGUMENT, "read the notebook first "
                              "(jupyter_nb_read) and pass its revision as expected_revision")
    async with bounded(timeout_s, "notebook edit"):
        tether = await tc.tether(server_url)
        return await tether.notebooks.edit(path, ops, expected_revision=expected_revision or None,
                                           create=create, force=force)


@TOOLS.tool(hints(False, destructive=True, title="Run notebook cells"))
async def jupyter_nb_run(
    tc: ToolContext,
    ctx: Context,
    path: NbPath,
    cells: Annotated[str | list[str | int], Field(description='"all" or cell ids/indexes.')] = "all",
    kernel: Annotated[str | None, Field(description=(
        "auto (its open session, else work), session, notebook, work or a kernel id."))] = None,
    wait_s: Annotated[float, Field(ge=0, le=600)] = 60.0,
    run_id: Annotated[str | None, Field(description="Follow an earlier run instead.")] = None,
    force: Force = False,
    server_url: ServerUrl = None,
) -> dict[str, Any]:
    """Run code cells in order (stops at an error); outputs and execution counts are
    written into the file. Past wait_s it returns status "running" and a run_id to
    call again with."""
    async with bounded(wait_s + 60, "notebook run"), activity(ctx, "notebook run") as act:
        tether = await tc.tether(server_url)

        def progress(done: int, total: int, label: str) -> None:
            act.phase(done, total, label)

        if run_id:
            return await tether.notebooks.wait(run_id, timeout=wait_s, progress=progress)
        return await tether.notebooks.run(path, cells, kernel=kernel, timeout=wait_s,
                                          force=force, progress=progress)


@TOOLS.tool(hints(False, destructive=True, title="Run a notebook as a job"))
async def jupyter_nb_start(
    tc: ToolContext,
    path: NbPath,
    parameters: Annotated[dict[str, Any] | None, Field(
        description="Injected after the cell tagged 'parameters'.")] = None,
    output: Annotated[str | None, Field(description="Output notebook (default: path).")] = None,
    force: Force = False,
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 60.0,
) -> dict[str, Any]:
    """Run the whole notebook detached in its own kernel, writing it back after each
    cell. Follow with jupyter_job_follow: a line per cell, errors with tracebacks."""
    async with bounded(timeout_s, "notebook start"):
        tether = await tc.tether(server_url)
        job = await tether.notebooks.start(path, parameters=parameters, output=output,
                                           force=force)
    assert job.info is not None
    return {**job_dict(job.info), "output": output or path}
