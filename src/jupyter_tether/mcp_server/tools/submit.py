"""Job spec tools: submit (sync, bootstrap, start the run) and collect its artifacts."""
# No ``from __future__ import annotations``: the SDK reads these signatures at runtime.

from typing import Annotated, Any

from mcp.server.mcpserver import Context
from pydantic import Field

from ...controller import submit as submit_mod
from ..helpers import activity, bounded, cap_value, mib
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
        "server_url (a URL or a target name), kernel_id, idempotency_key}."))],
    timeout_s: Annotated[float, timeout_arg(
        "Bound on this call: sync, bootstrap commands and starting the run (not the run "
        "itself, which goes on in the background).")] = 600.0,
    dry_run: Annotated[bool, Field(
        description="Change nothing and run nothing: report what each sync would upload "
                    "and delete, and why a real submit would refuse (would_refuse).")] = False,
    client_roots: ClientRoots = None,
) -> dict[str, Any]:
    """Sync local directories, run bootstrap commands, then start `run` as a background
    job and return at once with its job_id. The artifact list is stored on the remote
    with the job, so jupyter_job_collect works even after this MCP server restarts.
    A retried submit (same spec, same local files, within 10 minutes or while the job
    runs) returns the same job instead of starting it twice; set spec.idempotency_key to
    force a new run. If a bootstrap command fails, the run is not started (ok=false).
    Sends progress notifications through the sync, bootstrap and start phases. Each
    sync local_dir must lie inside the allowed local roots (your MCP roots, within the
    server's cwd or --local-root dirs)."""
    spec = tc.confine_spec(spec, client_roots)
    norm = submit_mod.validate_spec(spec)
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
        result = await submit_mod.submit(tether, spec, progress=on_progress,
                                         dry_run=dry_run)
    if result.get("job_id"):
        tc.pool.remember_job(result["job_id"], server_url)
    return dict(cap_value(result))


@TOOLS.tool(hints(False, idempotent=True, title="Collect job artifacts"))
async def jupyter_job_collect(
    tc: ToolContext,
    ctx: Context,
    job_id: JobId,
    local_dir: Annotated[str, Field(description="Local directory to download into.",
                                    min_length=1)],
    require_done: Annotated[bool, Field(
        description="Refuse while the job is still running.")] = True,
    timeout_s: Annotated[float, timeout_arg()] = 120.0,
    server_url: ServerUrl = None,
    client_roots: ClientRoots = None,
) -> dict[str, Any]:
    """Download the artifacts listed when the job was submitted (files and directories)
    into local_dir. Works after an MCP server restart. A missing artifact is reported in
    `missing` without stopping the others. local_dir must lie inside the allowed local
    roots (your MCP roots, within the server's cwd or --local-root dirs)."""
    local_dir = tc.confine(local_dir, client_roots)
    async with bounded(timeout_s, "collect"), activity(ctx, f"collect {job_id}") as act:
        tether = await tc.pool.for_job(job_id, server_url)

        # Bytes so far over all artifacts, so progress only ever grows.
        seen: dict[str, int] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            seen[phase] = done
            act.progress = float(sum(seen.values()))
            act.message = f"{phase}: {mib(done)} of {mib(total)} MiB"

        result = await submit_mod.collect(tether, job_id, local_dir,
                                          require_done=require_done, progress=on_progress)
    return dict(cap_value(result))
