"""Shell command and background job tools: run commands, start a job, and its status, log,
kill, list, follow and wait."""
# No ``from __future__ import annotations``: the SDK reads these signatures at runtime.

from typing import Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import Context
from pydantic import Field

from ... import AsyncJob, JobInfo
from ..limits import bounded, cap_tail, utf8_prefix
from ..progress import activity
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


async def _follow_once(job: AsyncJob, offset: int, wait_s: float,
                       max_chars: int) -> FollowResult:
    """The log from ``offset``, gathered for up to ``wait_s``; sooner only when the job has
    ended and all of it is read (eof on the call that carries the last bytes) or when
    ``max_chars`` bytes are there. Returning at the first new line would cost an agent a
    call (and a turn) per line.

    Ends on a UTF-8 character boundary and, when the chunk is full, after the last complete
    line, so concatenating the texts of successive calls gives the log exactly once.
    """
    # One round trip: the supervisor gathers (holding no thread) and says the job's state
    # as of just before its read, so once ended that read has all it wrote.
    data, after = await job.read(offset, max_chars, wait=wait_s)
    start = after - len(data) if data else offset
    info = job.info if job.info is not None else await job.status()
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
    result = FollowResult(job_id=job.job_id, text=text, offset=start, next_offset=next_offset,
                          eof=eof, state=info.state, exit_code=info.exit_code,
                          remaining_bytes=remaining, log_path=info.log_path, hint=hint)
    if info.reason:
        result["hint"] = f"{hint}; {info.reason['kind']}: {info.reason['message']}"
    if info.warnings:
        result["warnings"] = info.warnings
    return result


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
    """Run shell commands in order; returns each one's returncode, stdout, stderr,
    duration_s, timed_out, and ok (all succeeded). Long work: jupyter_job_start."""
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
    command: Annotated[str, Field(description="Shell command.", min_length=1)],
    kernel_id: KernelCompat = None,
    cwd: Annotated[str, Field(description="Remote working directory ('' = root).")] = "",
    env_overrides: EnvOverrides = None,
    log_path: Annotated[str | None, Field(
        description="Remote log file (default: under logs/).")] = None,
    timeout_s: Annotated[float, timeout_arg("Bound on starting it (not its run).")] = 60.0,
    server_url: ServerUrl = None,
    name: Annotated[str | None, Field(description="A label for jupyter_job_list.")] = None,
    idempotency_key: Annotated[str | None, Field(
        description="A retry with the same key returns the same job.")] = None,
) -> JobStatusResult:
    """Start a shell command as a background job; returns at once with job_id, pid and
    log_path. It survives kernel restarts, network drops and MCP server restarts. Then
    jupyter_job_follow, jupyter_job_wait, jupyter_job_kill."""
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
    """A job's state (running, exited, killed, lost), exit code, times, log path and size;
    known across MCP server restarts."""
    async with bounded(timeout_s, "job status"):
        tether = await tc.job_tether(job_id, server_url)
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
    """The last lines of a job's log, with its state. To read all of it exactly once:
    jupyter_job_follow."""
    async with bounded(timeout_s, "job tail"):
        tether = await tc.job_tether(job_id, server_url)
        job = tether.jobs.get(job_id)
        text = await job.tail(lines)  # the job's state comes with it
        info = job.info if job.info is not None else await job.status()
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
        description="KILL after TERM if still alive after this long.",
        ge=0, le=600)] = 5.0,
) -> JobStatusResult:
    """Signal a job's process group (TERM escalates to KILL after grace_s); returns its
    status."""
    async with bounded(timeout_s + grace_s, "job kill"):
        tether = await tc.job_tether(job_id, server_url)
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
    """Jobs in the remote registry (also those from before an MCP server restart), newest
    first."""
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
    offset: Annotated[int, Field(description="0, then the last call's next_offset.",
                                 ge=0)] = 0,
    wait_s: Annotated[float, Field(
        description="Gather output this long, unless the job ends or max_chars fill.",
        ge=0, le=MAX_FOLLOW_WAIT_S)] = 10.0,
    max_chars: Annotated[int, Field(description="Most bytes per call.",
                                    ge=256, le=1_000_000)] = 20000,
    server_url: ServerUrl = None,
) -> FollowResult:
    """Follow a job's log: the text written since offset, gathered for up to wait_s (less
    if the job ends: eof comes with its last bytes), and next_offset. Call again with
    offset=next_offset until eof: every byte arrives once, in order, across reconnects
    and restarts."""
    async with bounded(wait_s + 60, "job follow"):
        tether = await tc.job_tether(job_id, server_url)
        return await _follow_once(tether.jobs.get(job_id), offset, wait_s, max_chars)


@TOOLS.tool(hints(True, title="Wait for a job to end"))
async def jupyter_job_wait(
    tc: ToolContext,
    ctx: Context,
    job_id: JobId,
    timeout_s: Annotated[float, Field(
        description="Call again if the job still runs.", gt=0, le=MAX_WAIT_S)] = 30.0,
    server_url: ServerUrl = None,
) -> WaitResult:
    """Wait up to timeout_s for a job to end (sends progress meanwhile); done=false, not
    an error, if it still runs."""
    started = anyio.current_time()
    info: JobInfo | None = None
    async with bounded(timeout_s + 30, "job wait"), \
            activity(ctx, f"waiting for job {job_id}") as act:
        tether = await tc.job_tether(job_id, server_url)
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
