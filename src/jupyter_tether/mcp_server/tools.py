"""The MCP tools: the 23 of the reference server (same names, arguments and defaults), plus
job list/follow/wait and status.

Every tool is a thin call into the controller through the server's TetherPool; failures
become tool errors (``isError``) whose text says what went wrong and what to try next.
"""
# No ``from __future__ import annotations`` here: the SDK reads these signatures at runtime
# to build the input and output schemas.

import base64
import binascii
import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, Protocol

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.resolve import ListRoots, Resolve
from mcp_types import ListRootsResult, ToolAnnotations
from pydantic import Field
from typing_extensions import TypedDict  # pydantic needs it for nested TypedDicts on 3.11

from .. import __version__
from ..controller import submit as submit_mod
from ..controller.jobs import AsyncJob, JobInfo
from ..controller.tether import AsyncTether
from .helpers import (
    activity,
    bounded,
    cap_head,
    cap_tail,
    cap_value,
    mib,
    tool_errors,
    utf8_prefix,
)
from .local_roots import AllowedRoots, roots_from_uris, server_roots
from .pool import TetherPool

MAX_WAIT_S = 300.0
MAX_FOLLOW_WAIT_S = 30.0
FOLLOW_POLL_S = 0.2
DOWNLOAD_BASE64_MAX = 16 * 1024 * 1024


class PoolHolder(Protocol):
    @property
    def pool(self) -> TetherPool: ...


# --- argument types ---------------------------------------------------------------------------

ServerUrl = Annotated[str | None, Field(
    description="Jupyter server base URL (a token may ride in ?token=), or the name of a "
                "target in jupyter-tether's config file (targets.toml; jupyter_status lists "
                "them), which brings its own token. Default: the server's --url or "
                "REMOTE_JUPYTER_URL (token from REMOTE_JUPYTER_TOKEN), else an embedded local "
                "Jupyter server.")]
KernelCompat = Annotated[str | None, Field(
    description="Accepted for compatibility and ignored: jupyter-tether does this through "
                "its persistent supervisor, never in a user kernel.")]
JobId = Annotated[str, Field(description="Job id from jupyter_job_start / jupyter_job_submit.",
                             min_length=1)]
EnvOverrides = Annotated[dict[str, str | int | float | bool] | None, Field(
    description="Environment variables to set for the command(s); numbers and booleans are "
                "turned into their text (0 -> \"0\").")]


def _ask_client_roots(ctx: Context) -> ListRoots | None:
    """Ask the client for its roots on every call (so a changed list counts at once), but
    only when it declared the roots capability; otherwise the server's own roots apply."""
    caps = ctx.client_capabilities
    return ListRoots() if caps is not None and caps.roots is not None else None


# Filled by the SDK (roots/list, either protocol era), never by the caller: not in the schema.
ClientRoots = Annotated[ListRootsResult | None, Resolve(_ask_client_roots)]


def _env(values: dict[str, str | int | float | bool] | None) -> dict[str, str] | None:
    """Environment values as the strings a process gets (as a job spec's env_overrides)."""
    return {name: str(value) for name, value in values.items()} if values else None


def _timeout(description: str = "Upper bound on this call, in seconds.") -> Any:
    return Field(description=description, gt=0)


# --- structured results -----------------------------------------------------------------------


class JobStatusResult(TypedDict):
    job_id: str
    state: str
    alive: bool
    pid: int | None
    exit_code: int | None
    signal: int | None
    started_at: float | None
    ended_at: float | None
    command: str
    cwd: str
    log_path: str
    bytes_written: int
    name: str | None


class FollowResult(TypedDict):
    job_id: str
    text: str
    offset: int
    next_offset: int
    eof: bool
    state: str
    exit_code: int | None
    remaining_bytes: int
    log_path: str
    hint: str


class WaitResult(TypedDict):
    done: bool
    waited_s: float
    job: JobStatusResult
    hint: str


class PingResult(TypedDict):
    ok: bool
    base_url: str
    rtt_ms: float
    server_version: str | None
    supervisor_pid: int | None


def _job_dict(info: JobInfo) -> JobStatusResult:
    return JobStatusResult(
        job_id=info.job_id, state=info.state, alive=info.state == "running", pid=info.pid,
        exit_code=info.exit_code, signal=info.signal, started_at=info.started_at,
        ended_at=info.ended_at, command=info.command, cwd=info.cwd, log_path=info.log_path,
        bytes_written=info.bytes_written, name=info.name)


def _hints(read_only: bool, destructive: bool = False, idempotent: bool = False,
           title: str | None = None) -> ToolAnnotations:
    return ToolAnnotations(title=title, read_only_hint=read_only,
                           destructive_hint=destructive if not read_only else False,
                           idempotent_hint=idempotent or read_only, open_world_hint=True)


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


def register_tools(server: MCPServer, holder: PoolHolder,
                   local_roots: tuple[str, ...] | None = None) -> None:
    """Register every tool on ``server``; ``holder.pool`` is valid while the server runs.

    ``local_roots`` are the server's own allowed local roots (``server_roots()``; default:
    the cwd): local-file tools refuse paths outside them (see local_roots.py).
    """
    own_roots = local_roots if local_roots is not None else server_roots()

    def confine(path: str, client: ListRootsResult | None) -> str:
        """The resolved local path, refused outside the allowed roots (checked per call)."""
        offered = roots_from_uris(str(r.uri) for r in client.roots) if client else None
        return AllowedRoots(own_roots, offered).resolve(path)

    def confine_spec(spec: dict[str, Any], client: ListRootsResult | None) -> dict[str, Any]:
        """The job spec with each sync local_dir confined and resolved (anything malformed is
        left for validate_spec, which lists every problem)."""
        sync = spec.get("sync")
        if not isinstance(sync, list):
            return spec
        return {**spec, "sync": [
            {**entry, "local_dir": confine(entry["local_dir"], client)}
            if isinstance(entry, dict) and isinstance(entry.get("local_dir"), str)
            and entry["local_dir"].strip() else entry
            for entry in sync]}

    def pool() -> TetherPool:
        return holder.pool

    def scrub(text: str) -> str:
        try:
            return holder.pool.scrub(text)
        except Exception:
            from ..controller.target import redact
            return redact(text)

    def tool(name: str, annotations: ToolAnnotations,
             ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        if "_job_" in name:
            not_found = "List the jobs this server knows with jupyter_job_list."
        elif "kernel" in name:
            not_found = "List running kernels with jupyter_list_kernels."
        else:
            not_found = ("Check the path with jupyter_list_dir (relative paths start at the "
                         "Jupyter server's root).")

        def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            wrapped = tool_errors(scrub, not_found)(fn)
            server.add_tool(wrapped, name=name, description=(fn.__doc__ or "").strip(),
                            annotations=annotations)
            return wrapped

        return decorate

    async def tether_for(server_url: str | None) -> AsyncTether:
        return await pool().get(server_url)

    # --- server, kernels ----------------------------------------------------------------------

    @tool("jupyter_ping", _hints(True, title="Ping the Jupyter server"))
    async def jupyter_ping(
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 30.0,
    ) -> PingResult:
        """Check the Jupyter server and jupyter-tether's supervisor answer. Returns the round
        trip time over the persistent link and the server's version."""
        async with bounded(timeout_s, "ping"):
            tether = await tether_for(server_url)
            result = await tether.ping(timeout=timeout_s)
        return PingResult(ok=bool(result.get("ok")), base_url=tether.target.display_url,
                          rtt_ms=float(result["rtt_ms"]),
                          server_version=result.get("server_version"),
                          supervisor_pid=result.get("supervisor_pid"))

    @tool("jupyter_env_snapshot", _hints(True, title="Remote environment snapshot"))
    async def jupyter_env_snapshot(
        ctx: Context,
        kernel_id: KernelCompat = None,
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 120.0,
    ) -> dict[str, Any]:
        """Reproducibility snapshot of the remote: python, platform, cwd, CUDA env vars,
        nvidia-smi and nvidia-smi -L, nvcc, pip freeze, torch version/CUDA/devices. Long
        command outputs are capped."""
        async with bounded(timeout_s + 10, "env snapshot"), activity(ctx, "env snapshot"):
            tether = await tether_for(server_url)
            snapshot = await tether.env_snapshot(timeout=timeout_s)
        return dict(cap_value(snapshot))

    @tool("jupyter_list_kernels", _hints(True, title="List kernels"))
    async def jupyter_list_kernels(
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 30.0,
    ) -> dict[str, Any]:
        """Running kernels on the server. jupyter-tether's own supervisor kernel is marked
        role="supervisor" (never run code there); its default work kernel role="work"."""
        async with bounded(timeout_s, "list kernels"):
            tether = await tether_for(server_url)
            kernels = await tether.list_kernels()
            status = await tether.status()
        for kernel in kernels:
            kid = kernel.get("id")
            kernel["role"] = ("supervisor" if kid == status.get("kernel_id") else
                              "work" if kid == status.get("work_kernel_id") else None)
        return {"kernels": kernels, "count": len(kernels)}

    @tool("jupyter_list_sessions", _hints(True, title="List sessions"))
    async def jupyter_list_sessions(
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 30.0,
    ) -> dict[str, Any]:
        """Jupyter sessions on the server (notebooks, consoles, and jupyter-tether's own)."""
        async with bounded(timeout_s, "list sessions"):
            sessions = await (await tether_for(server_url)).list_sessions()
        return {"sessions": sessions, "count": len(sessions)}

    @tool("jupyter_start_kernel", _hints(False, title="Start a kernel"))
    async def jupyter_start_kernel(
        kernel_name: Annotated[str, Field(description="Kernel spec name.")] = "python3",
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 30.0,
    ) -> dict[str, Any]:
        """Start a new kernel and return its id (use it as kernel_id in jupyter_exec_python).
        Not needed for plain use: exec without kernel_id runs in a persistent work kernel."""
        async with bounded(timeout_s, "start kernel"):
            model = await (await tether_for(server_url)).start_kernel(kernel_name)
        return {**model, "kernel_id": model.get("id")}

    @tool("jupyter_shutdown_kernel", _hints(False, destructive=True, idempotent=True,
                                            title="Shut down a kernel"))
    async def jupyter_shutdown_kernel(
        kernel_id: Annotated[str, Field(description="Id of the kernel to shut down.",
                                        min_length=1)],
        now: Annotated[bool, Field(description="Shut down at once; false first interrupts "
                                               "the kernel.")] = True,
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 30.0,
    ) -> dict[str, Any]:
        """Shut down a kernel (its variables are lost). The supervisor kernel is refused:
        background jobs do not depend on any user kernel."""
        async with bounded(timeout_s, "shutdown kernel"):
            await (await tether_for(server_url)).shutdown_kernel(kernel_id, now)
        return {"kernel_id": kernel_id, "shutdown": True, "mode": "now" if now else "graceful"}

    # --- exec ---------------------------------------------------------------------------------

    @tool("jupyter_exec_python", _hints(False, destructive=True, title="Run Python"))
    async def jupyter_exec_python(
        ctx: Context,
        code: Annotated[str, Field(description="Python code to run in the remote kernel.")],
        kernel_id: Annotated[str | None, Field(
            description="Kernel to run in; default: a persistent work kernel whose variables "
                        "survive between calls.")] = None,
        timeout_s: Annotated[float, _timeout(
            "Run time limit; past it the kernel is interrupted and status is 'timeout'.")] = 120.0,
        server_url: ServerUrl = None,
        max_output_chars: Annotated[int, Field(
            description="Cap on stdout/stderr (the tail is kept).", ge=100)] = 20000,
    ) -> dict[str, Any]:
        """Run Python in a remote kernel and return notebook-style outputs: status, stdout,
        stderr, results (display data by MIME type), error with traceback. Images are saved
        to local files (listed in images) instead of being inlined. For work longer than a
        few minutes use jupyter_job_start."""
        async with bounded(timeout_s + 30, "exec"), activity(ctx, "exec"):
            tether = await tether_for(server_url)
            result = await tether.exec(code, kernel_id=kernel_id, timeout=timeout_s,
                                       max_output_chars=max_output_chars)
            used = kernel_id or await tether.work_kernel_id()
        out = result.to_dict()
        out["kernel_id"] = used
        return out

    # --- files --------------------------------------------------------------------------------

    @tool("jupyter_list_dir", _hints(True, title="List a remote directory"))
    async def jupyter_list_dir(
        path: Annotated[str, Field(description="Remote directory; '' is the server root.")] = "",
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 30.0,
        max_entries: Annotated[int, Field(description="Cap on entries returned.", ge=1)] = 1000,
    ) -> dict[str, Any]:
        """List a remote directory: name, type, size, modification time of each entry."""
        async with bounded(timeout_s, "list dir"):
            # One more than asked: tells whether there were more.
            entries = await (await tether_for(server_url)).files.list(
                path, max_entries=max_entries + 1)
        out: dict[str, Any] = {"path": path, "entries": entries[:max_entries],
                               "count": min(len(entries), max_entries)}
        if len(entries) > max_entries:
            out["truncated"] = (f"showing the first {max_entries} entries; raise max_entries "
                                "or list a subdirectory")
        return out

    @tool("jupyter_read_text", _hints(True, title="Read a remote text file"))
    async def jupyter_read_text(
        path: Annotated[str, Field(description="Remote file path (relative to the root).",
                                   min_length=1)],
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 30.0,
        max_chars: Annotated[int, Field(description="Cap on returned chars (the head is kept).",
                                        ge=100)] = 100_000,
    ) -> dict[str, Any]:
        """Read a remote text file. Long files are cut with a marker; fetch whole files with
        jupyter_download_to_local."""
        async with bounded(timeout_s, "read text"):
            tether = await tether_for(server_url)
            # Never more than the cap needs (UTF-8 is at most 4 bytes a char), plus one to
            # tell whether the file goes on.
            text = await tether.files.read_text(path, max_bytes=4 * max_chars + 1)
            size = None
            if len(text) > max_chars:
                size = (await tether.files.stat(path)).get("size")
        content, truncated = cap_head(text, max_chars, f"remote file {path} (of {size} bytes; "
                                      "jupyter_download_to_local fetches it whole)")
        return {"path": path, "content": content, "truncated": truncated,
                "bytes": size if size is not None else len(text.encode())}

    @tool("jupyter_write_text", _hints(False, destructive=True, idempotent=True,
                                       title="Write a remote text file"))
    async def jupyter_write_text(
        path: Annotated[str, Field(description="Remote file path; parents are created.",
                                   min_length=1)],
        content: Annotated[str, Field(description="The text to write (replaces the file).")],
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 30.0,
    ) -> dict[str, Any]:
        """Write (create or replace) a remote text file, atomically."""
        async with bounded(timeout_s, "write text"):
            result = await (await tether_for(server_url)).files.write_text(path, content)
        return {**result, "path": path, "resolved_path": result.get("path")}

    @tool("jupyter_upload_base64", _hints(False, destructive=True, idempotent=True,
                                          title="Write remote bytes"))
    async def jupyter_upload_base64(
        path: Annotated[str, Field(description="Remote file path; parents are created.",
                                   min_length=1)],
        content_base64: Annotated[str, Field(description="The file's bytes, base64-encoded.")],
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 60.0,
    ) -> dict[str, Any]:
        """Write bytes given as base64 to a remote file. For local files use
        jupyter_upload_local_file (no base64, any size)."""
        try:
            data = base64.b64decode(content_base64.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise ToolError(f"content_base64 is not valid base64 ({exc}); encode the bytes "
                            "with standard base64 (A-Z, a-z, 0-9, +, /, = padding)") from None
        async with bounded(timeout_s, "upload"):
            result = await (await tether_for(server_url)).files.write_bytes(path, data)
        return {**result, "path": path, "resolved_path": result.get("path")}

    @tool("jupyter_upload_local_file", _hints(False, destructive=True, idempotent=True,
                                              title="Upload a local file"))
    async def jupyter_upload_local_file(
        ctx: Context,
        local_path: Annotated[str, Field(description="File on the machine running this MCP "
                                                     "server.", min_length=1)],
        remote_path: Annotated[str, Field(description="Destination path on the remote.",
                                          min_length=1)],
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 120.0,
        client_roots: ClientRoots = None,
    ) -> dict[str, Any]:
        """Upload a local file to the remote in chunks, verified by SHA-256 and renamed into
        place atomically; sends progress notifications. Returns bytes, seconds and hash.
        local_path must lie inside the allowed local roots (your MCP roots, within the
        server's cwd or --local-root dirs); a relative one starts at the first root."""
        local = confine(local_path, client_roots)
        if not os.path.isfile(local):
            raise ToolError(f"local file not found: {local_path}")
        async with bounded(timeout_s, f"upload of {local_path}"), \
                activity(ctx, f"upload {os.path.basename(local)}") as act:
            tether = await tether_for(server_url)
            result = await tether.files.upload(local, remote_path, progress=act.transfer)
        return {"local_path": local, "remote_path": remote_path, **result.to_dict()}

    @tool("jupyter_download_base64", _hints(True, title="Read remote bytes as base64"))
    async def jupyter_download_base64(
        remote_path: Annotated[str, Field(description="Remote file path.", min_length=1)],
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 120.0,
        max_bytes: Annotated[int, Field(description="Refuse files larger than this.",
                                        ge=1)] = DOWNLOAD_BASE64_MAX,
    ) -> dict[str, Any]:
        """Return a remote file's bytes as base64 (small files only: base64 costs context).
        Prefer jupyter_download_to_local for anything big."""
        async with bounded(timeout_s, "download"):
            tether = await tether_for(server_url)
            data = await tether.files.read_bytes(remote_path, max_bytes=max_bytes + 1)
        if len(data) > max_bytes:
            raise ToolError(f"{remote_path} is larger than max_bytes={max_bytes}; use "
                            "jupyter_download_to_local instead (no base64, any size)")
        return {"remote_path": remote_path, "bytes": len(data),
                "content_base64": base64.b64encode(data).decode("ascii")}

    @tool("jupyter_download_to_local", _hints(False, idempotent=True,
                                              title="Download a remote file"))
    async def jupyter_download_to_local(
        ctx: Context,
        remote_path: Annotated[str, Field(description="Remote file path.", min_length=1)],
        local_path: Annotated[str, Field(description="Destination on the machine running "
                                                     "this MCP server.", min_length=1)],
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 120.0,
        client_roots: ClientRoots = None,
    ) -> dict[str, Any]:
        """Download a remote file to a local path in chunks, verified by SHA-256, written
        atomically; sends progress notifications. Returns bytes, seconds and hash.
        local_path must lie inside the allowed local roots (your MCP roots, within the
        server's cwd or --local-root dirs); a relative one starts at the first root."""
        local = confine(local_path, client_roots)
        async with bounded(timeout_s, f"download of {remote_path}"), \
                activity(ctx, f"download {os.path.basename(remote_path)}") as act:
            tether = await tether_for(server_url)
            result = await tether.files.download(remote_path, local, progress=act.transfer)
        return {"remote_path": remote_path, "local_path": local, **result.to_dict()}

    @tool("jupyter_download_dir_to_local", _hints(False, idempotent=True,
                                                  title="Download a remote directory"))
    async def jupyter_download_dir_to_local(
        ctx: Context,
        remote_dir: Annotated[str, Field(description="Remote directory.", min_length=1)],
        local_dir: Annotated[str, Field(description="Local destination directory.",
                                        min_length=1)],
        archive_remote_path: Annotated[str | None, Field(
            description="Accepted for compatibility and ignored: no archive is staged on the "
                        "remote.")] = None,
        kernel_id: KernelCompat = None,
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 600.0,
        client_roots: ClientRoots = None,
    ) -> dict[str, Any]:
        """Download a remote directory tree into a local directory. Paths that would land
        outside local_dir (absolute, '..', links, devices) are refused. local_dir must lie
        inside the allowed local roots (your MCP roots, within the server's cwd or
        --local-root dirs)."""
        local = confine(local_dir, client_roots)
        async with bounded(timeout_s, f"download of {remote_dir}"), \
                activity(ctx, f"download {remote_dir}") as act:
            tether = await tether_for(server_url)
            result = await tether.files.download_dir(remote_dir, local, progress=act.transfer)
        return dict(cap_value({"remote_dir": remote_dir, "local_dir": local, **result}))

    @tool("jupyter_sync_dir", _hints(False, destructive=True, idempotent=True,
                                     title="Sync a local directory to the remote"))
    async def jupyter_sync_dir(
        ctx: Context,
        local_dir: Annotated[str, Field(description="Local directory to send.", min_length=1)],
        remote_dir: Annotated[str, Field(description="Remote destination directory.",
                                         min_length=1)],
        exclude_globs_csv: Annotated[str, Field(
            description="Comma-separated globs to leave out.")] = submit_mod.DEFAULT_SYNC_EXCLUDES,
        clean_remote: Annotated[bool, Field(
            description="Delete remote files that are not in local_dir (the remote ends up "
                        "equal to the local tree). Refused in the server root, the home "
                        "directory, / or a directory above them unless "
                        "allow_root_delete.")] = True,
        dry_run: Annotated[bool, Field(
            description="Change nothing: report what would be uploaded (would_upload_paths) "
                        "and deleted (would_delete_paths), and why a real run would refuse "
                        "(would_refuse).")] = False,
        allow_root_delete: Annotated[bool, Field(
            description="Let clean_remote delete in the server root, the home directory, / "
                        "or a directory above them. Only when the user asked for exactly "
                        "that.")] = False,
        keep_archive: Annotated[bool, Field(
            description="Accepted for compatibility and ignored: no archive is made.")] = False,
        max_bytes: Annotated[int, Field(description="Refuse if the files to send exceed this.",
                                        ge=0)] = 200 * 1024 * 1024,
        kernel_id: KernelCompat = None,
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 600.0,
        client_roots: ClientRoots = None,
    ) -> dict[str, Any]:
        """Make a remote directory match a local one. Only changed files travel (manifests of
        size, mtime and hash are compared); sends progress notifications. local_dir must lie
        inside the allowed local roots (your MCP roots, within the server's cwd or
        --local-root dirs)."""
        local = confine(local_dir, client_roots)
        if not os.path.isdir(local):
            raise ToolError(f"local directory not found: {local_dir}")
        async with bounded(timeout_s, f"sync of {local_dir}"), \
                activity(ctx, f"sync {os.path.basename(local.rstrip('/'))}") as act:
            tether = await tether_for(server_url)
            result = await tether.files.sync(
                local, remote_dir, exclude=submit_mod.split_globs(exclude_globs_csv),
                delete=clean_remote, max_bytes=max_bytes, progress=act.transfer,
                dry_run=dry_run, allow_root_delete=allow_root_delete)
        return dict(cap_value({"local_dir": local, "remote_dir": remote_dir, **result}))

    # --- commands and jobs --------------------------------------------------------------------

    @tool("jupyter_run_commands", _hints(False, destructive=True, title="Run shell commands"))
    async def jupyter_run_commands(
        ctx: Context,
        commands: Annotated[list[str], Field(description="Shell commands, run in order.",
                                             min_length=1)],
        cwd: Annotated[str, Field(description="Remote working directory ('' = root).")] = "",
        env_overrides: EnvOverrides = None,
        timeout_s_per_command: Annotated[float, Field(
            description="Each command is killed past this many seconds.", gt=0)] = 600.0,
        fail_fast: Annotated[bool, Field(description="Stop at the first failing command.")
                             ] = True,
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
            tether = await tether_for(server_url)
            return await tether.jobs.run_commands(
                commands, cwd=cwd, env=_env(env_overrides), timeout_per_command=timeout_s_per_command,
                fail_fast=fail_fast, max_output_chars=max_output_chars)

    @tool("jupyter_job_start", _hints(False, title="Start a background job"))
    async def jupyter_job_start(
        command: Annotated[str, Field(description="Shell command to run in the background.",
                                      min_length=1)],
        kernel_id: KernelCompat = None,
        cwd: Annotated[str, Field(description="Remote working directory ('' = root).")] = "",
        env_overrides: EnvOverrides = None,
        log_path: Annotated[str | None, Field(
            description="Remote log file for stdout+stderr (default: under logs/).")] = None,
        timeout_s: Annotated[float, _timeout("Bound on starting the job (not its run).")
                             ] = 60.0,
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
            tether = await tether_for(server_url)
            job = await tether.jobs.start(command, cwd=cwd, env=_env(env_overrides),
                                          log_path=log_path, name=name,
                                          idempotency_key=idempotency_key)
            info = job.info or await job.status()
        pool().remember_job(job.job_id, server_url)
        return _job_dict(info)

    @tool("jupyter_job_status", _hints(True, title="Job status"))
    async def jupyter_job_status(
        job_id: JobId,
        timeout_s: Annotated[float, _timeout()] = 30.0,
        server_url: ServerUrl = None,
    ) -> JobStatusResult:
        """A job's state (running, exited, killed, lost), exit code, start and end times, log
        path and log size. Known across MCP server restarts (the registry is on the remote)."""
        async with bounded(timeout_s, "job status"):
            tether = await pool().for_job(job_id, server_url)
            return _job_dict(await tether.jobs.get(job_id).status())

    @tool("jupyter_job_tail", _hints(True, title="Last lines of a job's log"))
    async def jupyter_job_tail(
        job_id: JobId,
        lines: Annotated[int, Field(description="How many lines from the end.", ge=1)] = 200,
        timeout_s: Annotated[float, _timeout()] = 30.0,
        server_url: ServerUrl = None,
        max_chars: Annotated[int, Field(description="Cap on returned chars (the tail is kept).",
                                        ge=100)] = 20000,
    ) -> dict[str, Any]:
        """The last lines of a job's log, with its state. To read everything exactly once,
        loop on jupyter_job_follow instead."""
        async with bounded(timeout_s, "job tail"):
            tether = await pool().for_job(job_id, server_url)
            job = tether.jobs.get(job_id)
            text = await job.tail(lines)
            info = await job.status()
        text, truncated = cap_tail(text, max_chars, f"remote log {info.log_path}")
        return {"job_id": job_id, "text": text, "truncated": truncated, "state": info.state,
                "exit_code": info.exit_code, "log_path": info.log_path,
                "log_bytes": info.bytes_written}

    @tool("jupyter_job_kill", _hints(False, destructive=True, idempotent=True,
                                     title="Stop a job"))
    async def jupyter_job_kill(
        job_id: JobId,
        sig: Annotated[int, Field(description="Signal number (15 = TERM, 9 = KILL, 2 = INT).",
                                  ge=1, le=64)] = 15,
        timeout_s: Annotated[float, _timeout()] = 30.0,
        server_url: ServerUrl = None,
        grace_s: Annotated[float, Field(
            description="After TERM, send KILL if still alive after this many seconds.",
            ge=0, le=600)] = 5.0,
    ) -> JobStatusResult:
        """Signal a job's whole process group (TERM escalates to KILL after grace_s) and
        return its resulting status."""
        async with bounded(timeout_s + grace_s, "job kill"):
            tether = await pool().for_job(job_id, server_url)
            return _job_dict(await tether.jobs.get(job_id).kill(sig, grace=grace_s))

    @tool("jupyter_job_list", _hints(True, title="List jobs"))
    async def jupyter_job_list(
        server_url: ServerUrl = None,
        state: Annotated[Literal["running", "exited", "killed", "lost"] | None, Field(
            description="Only jobs in this state.")] = None,
        limit: Annotated[int, Field(description="Most recent jobs to return.", ge=1)] = 50,
        timeout_s: Annotated[float, _timeout()] = 30.0,
    ) -> dict[str, Any]:
        """Jobs known to the remote registry (including ones started before this MCP server
        restarted), most recent first."""
        async with bounded(timeout_s, "job list"):
            tether = await tether_for(server_url)
            jobs = await tether.jobs.list(state)
        for info in jobs:
            pool().remember_job(info.job_id, server_url)
        jobs.sort(key=lambda i: i.started_at or 0, reverse=True)
        return {"jobs": [_job_dict(i) for i in jobs[:limit]], "count": len(jobs),
                "running": sum(1 for i in jobs if i.state == "running")}

    @tool("jupyter_job_follow", _hints(True, title="Read a job's log from an offset"))
    async def jupyter_job_follow(
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
            tether = await pool().for_job(job_id, server_url)
            return await _follow_once(tether.jobs.get(job_id), offset, wait_s, max_chars)

    @tool("jupyter_job_wait", _hints(True, title="Wait for a job to end"))
    async def jupyter_job_wait(
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
            tether = await pool().for_job(job_id, server_url)
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
        return WaitResult(done=done, waited_s=waited, job=_job_dict(info), hint=hint)

    @tool("jupyter_job_submit", _hints(False, title="Submit a job spec"))
    async def jupyter_job_submit(
        ctx: Context,
        spec: Annotated[dict[str, Any], Field(description=(
            "Job spec: {sync: [{local_dir, remote_dir, clean_remote, exclude_globs_csv, "
            "max_bytes, allow_root_delete}], bootstrap: {cwd, commands, fail_fast, env_overrides, "
            "timeout_s_per_command}, run: {cwd, command, log_path, env_overrides} (required), "
            "artifacts: [remote file path | {remote_path} | {remote_dir, local_subdir}], "
            "server_url (a URL or a target name), kernel_id, idempotency_key}."))],
        timeout_s: Annotated[float, _timeout(
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
        spec = confine_spec(spec, client_roots)
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

            tether = await tether_for(server_url)
            act.label = act.message = "submit: checking for an identical earlier submit"
            result = await submit_mod.submit(tether, spec, progress=on_progress,
                                             dry_run=dry_run)
        if result.get("job_id"):
            pool().remember_job(result["job_id"], server_url)
        return dict(cap_value(result))

    @tool("jupyter_job_collect", _hints(False, idempotent=True, title="Collect job artifacts"))
    async def jupyter_job_collect(
        ctx: Context,
        job_id: JobId,
        local_dir: Annotated[str, Field(description="Local directory to download into.",
                                        min_length=1)],
        require_done: Annotated[bool, Field(
            description="Refuse while the job is still running.")] = True,
        timeout_s: Annotated[float, _timeout()] = 120.0,
        server_url: ServerUrl = None,
        client_roots: ClientRoots = None,
    ) -> dict[str, Any]:
        """Download the artifacts listed when the job was submitted (files and directories)
        into local_dir. Works after an MCP server restart. A missing artifact is reported in
        `missing` without stopping the others. local_dir must lie inside the allowed local
        roots (your MCP roots, within the server's cwd or --local-root dirs)."""
        local_dir = confine(local_dir, client_roots)
        async with bounded(timeout_s, "collect"), activity(ctx, f"collect {job_id}") as act:
            tether = await pool().for_job(job_id, server_url)

            # Bytes so far over all artifacts, so progress only ever grows.
            seen: dict[str, int] = {}

            def on_progress(phase: str, done: int, total: int) -> None:
                seen[phase] = done
                act.progress = float(sum(seen.values()))
                act.message = f"{phase}: {mib(done)} of {mib(total)} MiB"

            result = await submit_mod.collect(tether, job_id, local_dir,
                                              require_done=require_done, progress=on_progress)
        return dict(cap_value(result))

    # --- status -------------------------------------------------------------------------------

    @tool("jupyter_status", _hints(True, title="jupyter-tether status"))
    async def jupyter_status(
        server_url: ServerUrl = None,
        timeout_s: Annotated[float, _timeout()] = 30.0,
    ) -> dict[str, Any]:
        """Where things stand: the target, the link (connected, reconnect count, protocol),
        the supervisor (pid, python, host), the kernels it uses, and the jobs (running and
        recent). Also every named target of the config file (pass its name as server_url
        to any tool) and every target this MCP server has opened."""
        async with bounded(timeout_s, "status"):
            tether = await tether_for(server_url)
            link = await tether.status()
            facts = await tether.info()
            jobs = await tether.jobs.list()
        jobs.sort(key=lambda i: i.started_at or 0, reverse=True)
        return {
            "mcp_server": {"version": __version__, "pid": os.getpid(),
                           "targets": pool().describe()},
            "named_targets": pool().configured(),
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
                     "recent": [_job_dict(i) for i in jobs[:10]]},
        }


TOOL_NAMES = (
    "jupyter_ping", "jupyter_env_snapshot", "jupyter_list_kernels", "jupyter_list_sessions",
    "jupyter_start_kernel", "jupyter_shutdown_kernel", "jupyter_exec_python", "jupyter_list_dir",
    "jupyter_read_text", "jupyter_write_text", "jupyter_upload_base64",
    "jupyter_upload_local_file", "jupyter_download_base64", "jupyter_download_to_local",
    "jupyter_download_dir_to_local", "jupyter_sync_dir", "jupyter_run_commands",
    "jupyter_job_start", "jupyter_job_status", "jupyter_job_tail", "jupyter_job_kill",
    "jupyter_job_submit", "jupyter_job_collect",
    "jupyter_job_list", "jupyter_job_follow", "jupyter_job_wait", "jupyter_status",
)
