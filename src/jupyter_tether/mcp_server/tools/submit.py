"""Job spec tools: submit (sync, bootstrap, start the run) and collect its artifacts."""
# No ``from __future__ import annotations``: the SDK reads these signatures at runtime.

from typing import Annotated, Any

from mcp.server.mcpserver import Context
from pydantic import Field

from ... import validate_job_spec
from ..limits import bounded, cap_value
from ..progress import activity, mib
from .common import ClientRoots, JobId, ServerUrl, ToolContext, ToolTable, hints, timeout_arg

TOOLS = ToolTable()


@TOOLS.tool(hints(False, title="Submit a job spec"))
async def jupyter_job_submit(
    tc: ToolContext,
    ctx: Context,
    spec: Annotated[dict[str, Any], Field(description=(
        "Job spec: {sync: [{local_dir, remote_dir, clean_remote, exclude_globs_csv, "
        "max_bytes, allow_root_delete}], bootstrap: {cwd, commands, fail_fast, env_overrides, "
        "timeout_s_per_command}, run: {cwd, command, log_path, env_overrides} (required), "
        "artifacts: [remote file path | {remote_path} | {remote_dir, local_subdir}], "
        "server_url, kernel_id, idempotency_key}."))],
    timeout_s: Annotated[float, timeout_arg(
        "Bound on sync, bootstrap and starting the run (not the run).")] = 600.0,
    dry_run: Annotated[bool, Field(
        description="Change and run nothing; report what each sync would upload and "
                    "delete, and would_refuse.")] = False,
    client_roots: ClientRoots = None,
) -> dict[str, Any]:
    """Sync local dirs (inside the allowed local roots), run bootstrap commands, then
    start `run` as a background job; returns at once with job_id (ok=false and no run if
    a bootstrap command fails). Artifacts are stored with the job on the remote, for
    jupyter_job_collect. A retry (same spec and files, within 10 min or while it runs)
    returns the same job; a new spec.idempotency_key forces a new run. Sends progress."""
    spec = tc.confine_spec(spec, client_roots)
    norm = validate_job_spec(spec)
    server_url = norm.get("server_url")
    async with bounded(timeout_s, "job submit"), activity(ctx, "submit: connecting") as act:
        # Phases: one per sync entry, then bootstrap, then starting the run.
        phases: dict[str, int] = {}
        count = len(norm["sync"]) + 2

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in phases:
                phases[phase] = len(phases)
                act.phase(phases[phase], count, phase)
            if phase.startswith("sync "):
                if total:
                    act.transfer(done, total)
            elif phase == "bootstrap":
                act.message = (f"bootstrap: {done} of {total} commands done" if done < total
                               else f"bootstrap: {total} commands done")
            else:
                act.message = "starting the run" if done < total else "run started"

        tether = await tc.tether(server_url)
        act.label = act.message = "submit: checking for an identical earlier submit"
        result = await tether.submit(spec, progress=on_progress, dry_run=dry_run)
    if result.get("job_id"):
        tc.pool.remember_job(result["job_id"], server_url)
    return dict(cap_value(result))


@TOOLS.tool(hints(False, idempotent=True, title="Collect job artifacts"))
async def jupyter_job_collect(
    tc: ToolContext,
    ctx: Context,
    job_id: JobId,
    local_dir: Annotated[str, Field(description="Local directory.", min_length=1)],
    require_done: Annotated[bool, Field(
        description="Refuse while the job is still running.")] = True,
    timeout_s: Annotated[float, timeout_arg()] = 120.0,
    server_url: ServerUrl = None,
    client_roots: ClientRoots = None,
) -> dict[str, Any]:
    """Download a submitted job's artifacts into local_dir (inside the allowed local
    roots), also after an MCP server restart; missing ones are listed in `missing`."""
    local_dir = tc.confine(local_dir, client_roots)
    async with bounded(timeout_s, "collect"), activity(ctx, f"collect {job_id}") as act:
        tether = await tc.job_tether(job_id, server_url)

        # Bytes so far over all artifacts, so progress only ever grows.
        seen: dict[str, int] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            seen[phase] = done
            act.progress = float(sum(seen.values()))
            act.message = f"{phase}: {mib(done)} of {mib(total)} MiB"

        result = await tether.collect(job_id, local_dir, require_done=require_done,
                                      progress=on_progress)
    return dict(cap_value(result))
