"""Shell command and background job tools: run commands, start a job, and its status, log,
kill, list, follow and wait."""
# No ``from __future__ import annotations``: the SDK reads these signatures at runtime.

from typing import Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import Context
from pydantic import Field

from ... import AsyncJob, JobInfo
from ..helpers import activity, bounded, cap_tail, utf8_prefix
from .common import (
    EnvOverrides,
    FollowResult,
    JobId,
    JobStatusResult,
    KernelCompat,
    ServerUrl,
    ToolContext,
    ToolTable,
    WaitResult,
    env_strings,
    hints,
    job_dict,
    timeout_arg,
)

MAX_WAIT_S = 300.0
MAX_FOLLOW_WAIT_S = 30.0
FOLLOW_POLL_S = 0.2

async def _follow_once(job: AsyncJob, offset: int, wait_s: float,
                       max_chars: int) -> FollowResult:
    """New log text from ``offset``: waits up to ``wait_s`` for some, returns the next offset.

    Ends on a UTF-8 character boundary and, when the chunk is full, after the last complete
    line, so concatenating the texts of successive calls gives the log exactly once.
    """
    deadline = anyio.current_time() + wait_s
    data, start = b"", offset
    info = await job.status()
    while True:
        chunk, after = await job.read(offset, max_chars)
        if chunk:
            data, start = chunk, after - len(chunk)
            info = await job.status() if info.state == "running" else info
            break
        if info.done:
            break
        if anyio.current_time() >= deadline:
            break
        await anyio.sleep(min(FOLLOW_POLL_S, max(0.0, deadline - anyio.current_time())))
        info = await job.status()
        if info.done:  # read once more: output written just before the exit
            chunk, after = await job.read(offset, max_chars)
            data, start = chunk, after - len(chunk)
            break
    size = max(info.bytes_written, start + len(data))
    at_end = info.done and start + len(data) >= size
    used = utf8_prefix(data, final=at_end)
    if len(data) >= max_chars and not at_end:
        newline = data.rfind(b"\n", 0, used)
        if newline >= 0:
            used = newline + 1
    text = data[:used].decode("utf-8", errors="replace")
    next_offset = start + used
    remaining = max(0, size - next_offset)
    eof = info.done and remaining == 0
    if eof:
        hint = f"job {info.state} (exit code {info.exit_code}); the whole log has been read"
    elif remaining:
        hint = f"{remaining} more bytes are ready: call again with offset={next_offset}"
    else:
        hint = f"job still running: call again with offset={next_offset} for more"
    return FollowResult(job_id=job.job_id, text=text, offset=start, next_offset=next_offset,
                        eof=eof, state=info.state, exit_code=info.exit_code,
                        remaining_bytes=remaining, log_path=info.log_path, hint=hint)


TOOLS = ToolTable()



@TOOLS.tool(hints(False, destructive=True, title="Run shell commands"))
async def jupyter_run_commands(
    tc: ToolContext,
    ctx: Context,
    commands: Annotated[list[str], Field(description="Shell commands, run in order.",
                                         min_length=1)],
    cwd: Annotated[str, Field(description="Remote working directory ('' = root).")] = "",
    env_overrides: EnvOverrides = None,
    timeout_s_per_command: Annotated[float, Field(
        description="Each command is killed past this many seconds.", gt=0)] = 600.0,
    fail_fast: Annotated[bool, Field(description="Stop at the first failing command.")] = True,
    max_output_chars: Annotated[int, Field(
        description="Cap on each command's stdout and stderr.", ge=100)] = 20000,
    kernel_id: KernelCompat = None,
    server_url: ServerUrl = None,
) -> dict[str, Any]:
    """Run shell commands one after another and return each one's returncode, stdout,
    stderr, duration and timed_out; ok is true when all succeeded. For long work use
    jupyter_job_start, which returns at once."""
    limit = timeout_s_per_command * len(commands) + 60
    async with bounded(limit, "run_commands"), \
            activity(ctx, f"running {len(commands)} command(s)"):
        tether = await tc.tether(server_url)
        return await tether.jobs.run_commands(
            commands, cwd=cwd, env=env_strings(env_overrides),
            timeout_per_command=timeout_s_per_command, fail_fast=fail_fast,
            max_output_chars=max_output_chars)


@TOOLS.tool(hints(False, title="Start a background job"))
async def jupyter_job_start(
    tc: ToolContext,
    command: Annotated[str, Field(description="Shell command to run in the background.",
                                  min_length=1)],
    kernel_id: KernelCompat = None,
    cwd: Annotated[str, Field(description="Remote working directory ('' = root).")] = "",
    env_overrides: EnvOverrides = None,
    log_path: Annotated[str | None, Field(
        description="Remote log file for stdout+stderr (default: under logs/).")] = None,
    timeout_s: Annotated[float, timeout_arg("Bound on starting the job (not its run).")] = 60.0,
    server_url: ServerUrl = None,
    name: Annotated[str | None, Field(description="A label for jupyter_job_list.")] = None,
    idempotency_key: Annotated[str | None, Field(
        description="Retrying with the same key returns the same job instead of starting "
                    "another.")] = None,
) -> JobStatusResult:
    """Start a shell command as a background job on the remote and return at once with
    its job_id, pid and log_path. The job runs in its own session: it survives kernel
    restarts, network drops and this MCP server restarting. Follow its log with
    jupyter_job_follow, wait with jupyter_job_wait, stop with jupyter_job_kill."""
    async with bounded(timeout_s, "job start"):
        tether = await tc.tether(server_url)
        job = await tether.jobs.start(command, cwd=cwd, env=env_strings(env_overrides),
                                      log_path=log_path, name=name,
                                      idempotency_key=idempotency_key)
        info = job.info or await job.status()
    tc.pool.remember_job(job.job_id, server_url)
    return job_dict(info)


@TOOLS.tool(hints(True, title="Job status"))
async def jupyter_job_status(
    tc: ToolContext,
    job_id: JobId,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
    server_url: ServerUrl = None,
) -> JobStatusResult:
    """A job's state (running, exited, killed, lost), exit code, start and end times, log
    path and log size. Known across MCP server restarts (the registry is on the remote)."""
    async with bounded(timeout_s, "job status"):
        tether = await tc.pool.for_job(job_id, server_url)
        return job_dict(await tether.jobs.get(job_id).status())


@TOOLS.tool(hints(True, title="Last lines of a job's log"))
async def jupyter_job_tail(
    tc: ToolContext,
    job_id: JobId,
    lines: Annotated[int, Field(description="How many lines from the end.", ge=1)] = 200,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
    server_url: ServerUrl = None,
    max_chars: Annotated[int, Field(description="Cap on returned chars (the tail is kept).",
                                    ge=100)] = 20000,
) -> dict[str, Any]:
    """The last lines of a job's log, with its state. To read everything exactly once,
    loop on jupyter_job_follow instead."""
    async with bounded(timeout_s, "job tail"):
        tether = await tc.pool.for_job(job_id, server_url)
        job = tether.jobs.get(job_id)
        text = await job.tail(lines)
        info = await job.status()
    text, truncated = cap_tail(text, max_chars, f"remote log {info.log_path}")
    return {"job_id": job_id, "text": text, "truncated": truncated, "state": info.state,
            "exit_code": info.exit_code, "log_path": info.log_path,
            "log_bytes": info.bytes_written}


@TOOLS.tool(hints(False, destructive=True, idempotent=True, title="Stop a job"))
async def jupyter_job_kill(
    tc: ToolContext,
    job_id: JobId,
    sig: Annotated[int, Field(description="Signal number (15 = TERM, 9 = KILL, 2 = INT).",
                              ge=1, le=64)] = 15,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
    server_url: ServerUrl = None,
    grace_s: Annotated[float, Field(
        description="After TERM, send KILL if still alive after this many seconds.",
        ge=0, le=600)] = 5.0,
) -> JobStatusResult:
    """Signal a job's whole process group (TERM escalates to KILL after grace_s) and
    return its resulting status."""
    async with bounded(timeout_s + grace_s, "job kill"):
        tether = await tc.pool.for_job(job_id, server_url)
        return job_dict(await tether.jobs.get(job_id).kill(sig, grace=grace_s))


@TOOLS.tool(hints(True, title="List jobs"))
async def jupyter_job_list(
    tc: ToolContext,
    server_url: ServerUrl = None,
    state: Annotated[Literal["running", "exited", "killed", "lost"] | None, Field(
        description="Only jobs in this state.")] = None,
    limit: Annotated[int, Field(description="Most recent jobs to return.", ge=1)] = 50,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
) -> dict[str, Any]:
    """Jobs known to the remote registry (including ones started before this MCP server
    restarted), most recent first."""
    async with bounded(timeout_s, "job list"):
        tether = await tc.tether(server_url)
        jobs = await tether.jobs.list(state)
    for info in jobs:
        tc.pool.remember_job(info.job_id, server_url)
    jobs.sort(key=lambda i: i.started_at or 0, reverse=True)
    return {"jobs": [job_dict(i) for i in jobs[:limit]], "count": len(jobs),
            "running": sum(1 for i in jobs if i.state == "running")}


@TOOLS.tool(hints(True, title="Read a job's log from an offset"))
async def jupyter_job_follow(
    tc: ToolContext,
    job_id: JobId,
    offset: Annotated[int, Field(description="Byte offset to read from: 0 at first, "
                                             "then the next_offset of the last call.",
                                 ge=0)] = 0,
    wait_s: Annotated[float, Field(
        description="If nothing new is there yet, wait up to this long for output.",
        ge=0, le=MAX_FOLLOW_WAIT_S)] = 10.0,
    max_chars: Annotated[int, Field(description="Most text to return per call.",
                                    ge=256, le=1_000_000)] = 20000,
    server_url: ServerUrl = None,
) -> FollowResult:
    """Follow a job's log: returns the text written since `offset` (waiting up to wait_s
    for some) and next_offset. Call again with offset=next_offset until eof is true:
    every line arrives exactly once, in order, even across reconnects and restarts."""
    async with bounded(wait_s + 60, "job follow"):
        tether = await tc.pool.for_job(job_id, server_url)
        return await _follow_once(tether.jobs.get(job_id), offset, wait_s, max_chars)


@TOOLS.tool(hints(True, title="Wait for a job to end"))
async def jupyter_job_wait(
    tc: ToolContext,
    ctx: Context,
    job_id: JobId,
    timeout_s: Annotated[float, Field(
        description=f"Wait at most this long (at most {MAX_WAIT_S:g} s); call again if "
                    "the job is still running.", gt=0, le=MAX_WAIT_S)] = 30.0,
    server_url: ServerUrl = None,
) -> WaitResult:
    """Wait for a job to end, up to timeout_s, sending progress notifications meanwhile.
    Returns done=false (not an error) if it is still running when the time is up."""
    started = anyio.current_time()
    info: JobInfo | None = None
    async with bounded(timeout_s + 30, "job wait"), \
            activity(ctx, f"waiting for job {job_id}") as act:
        tether = await tc.pool.for_job(job_id, server_url)
        job = tether.jobs.get(job_id)
        while True:
            left = timeout_s - (anyio.current_time() - started)
            if left <= 0:
                info = await job.status()
                break
            try:
                info = await job.wait(timeout=min(left, 5.0))
                break
            except TimeoutError:
                current = await job.status()
                act.message = f"job {job_id} running, log {current.bytes_written} bytes"
                act.progress = anyio.current_time() - started
    waited = round(anyio.current_time() - started, 3)
    done = info.done
    hint = (f"job {info.state} with exit code {info.exit_code}" if done else
            "still running: call jupyter_job_wait again, or follow the log with "
            "jupyter_job_follow")
    return WaitResult(done=done, waited_s=waited, job=job_dict(info), hint=hint)
