"""What every tool module shares: the context a tool gets, argument types, result shapes,
annotation hints, and the table a module's tools are registered from.

A tool is a plain async function whose first parameter is ``tc: ToolContext``; the rest of
its signature is the tool's input schema (the SDK reads it), its docstring the description.
``ToolTable.tool(hints(...))`` puts it in its module's table; ``register()`` binds ``tc``
(a fresh copy per call) and adds it to the server under the function's name. What the tool
returns is sent in the shape every tool shares (shape.py): compact JSON, UTC times,
root-relative remote paths.
"""
# No ``from __future__ import annotations`` here: the SDK reads these signatures at runtime
# to build the input schemas.

import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, NotRequired, Protocol, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resolve import ListRoots, Resolve
from mcp_types import CallToolResult, ListRootsResult, TextContent, ToolAnnotations
from pydantic import Field
from typing_extensions import TypedDict  # pydantic needs it for nested TypedDicts on 3.11

from ... import AsyncTether, JobInfo
from ...credentials import redact
from ...formatting import compact_usage
from ..local_roots import AllowedRoots, roots_from_uris
from ..pool import TetherPool
from ..tool_errors import tool_errors
from .shape import compact_schema, iso_utc, jsonable, shape, to_json_text

ToolFn = Callable[..., Awaitable[Any]]
F = TypeVar("F", bound=ToolFn)


# --- the context a tool gets ------------------------------------------------------------------


class PoolHolder(Protocol):
    @property
    def pool(self) -> TetherPool: ...


class ToolContext:
    """What a tool needs besides its arguments: the server's TetherPool (valid while the server
    runs) and the server's own allowed local roots (``server_roots()``; default: the cwd).

    Local-file tools refuse paths outside those roots, narrowed per call to the client's MCP
    roots (see local_roots.py).
    """

    def __init__(self, holder: PoolHolder, local_roots: tuple[str, ...]) -> None:
        self._holder = holder
        self.local_roots = local_roots
        # The remote root of the target this call used: results' paths are relative to it
        # (unless a tool turns relative_paths off).
        self.remote_root: str | None = None
        self.relative_paths = True

    def for_call(self) -> "ToolContext":
        """A copy for one tool call (its own remote_root)."""
        return ToolContext(self._holder, self.local_roots)

    @property
    def pool(self) -> TetherPool:
        return self._holder.pool

    async def tether(self, server_url: str | None) -> AsyncTether:
        return self._used(await self.pool.get(server_url))

    async def job_tether(self, job_id: str, server_url: str | None) -> AsyncTether:
        """The tether of the target that knows ``job_id`` (see TetherPool.for_job)."""
        return self._used(await self.pool.for_job(job_id, server_url))

    def _used(self, tether: AsyncTether) -> AsyncTether:
        self.remote_root = tether.link.facts.get("root_dir") or self.remote_root
        return tether

    def result(self, value: Any) -> CallToolResult:
        """A tool's return value as sent: the shared shape (shape.py), as compact JSON text
        and as structured content."""
        data = shape(jsonable(value), self.remote_root if self.relative_paths else None)
        return CallToolResult(content=[TextContent(type="text", text=to_json_text(data))],
                              structured_content=data)

    def confine(self, path: str, client: ListRootsResult | None) -> str:
        """The resolved local path, refused outside the allowed roots (checked per call)."""
        offered = roots_from_uris(str(r.uri) for r in client.roots) if client else None
        return AllowedRoots(self.local_roots, offered).resolve(path)

    def confine_spec(self, spec: dict[str, Any], client: ListRootsResult | None) -> dict[str, Any]:
        """The job spec with each sync local_dir confined and resolved (anything malformed is
        left for validate_spec, which lists every problem)."""
        sync = spec.get("sync")
        if not isinstance(sync, list):
            return spec
        return {**spec, "sync": [
            {**entry, "local_dir": self.confine(entry["local_dir"], client)}
            if isinstance(entry, dict) and isinstance(entry.get("local_dir"), str)
            and entry["local_dir"].strip() else entry
            for entry in sync]}

    def scrub(self, text: str) -> str:
        try:
            return self._holder.pool.scrub(text)
        except Exception:
            return redact(text)


# --- argument types ---------------------------------------------------------------------------

# Shared arguments are described in a few words: they recur in every tool, and the server's
# instructions (and the jupyter-tether://help resource) explain them once in full.
ServerUrl = Annotated[str | None, Field(
    description="URL or target name.")]
COMPAT = "Ignored (compatibility)."
KernelCompat = Annotated[str | None, Field(description=COMPAT)]
JobId = Annotated[str, Field(min_length=1)]
EnvOverrides = Annotated[dict[str, str | int | float | bool] | None, Field(
    description="Environment variables (numbers and booleans become text).")]


def _ask_client_roots(ctx: Context) -> ListRoots | None:
    """Ask the client for its roots on every call (so a changed list counts at once), but
    only when it declared the roots capability; otherwise the server's own roots apply."""
    caps = ctx.client_capabilities
    return ListRoots() if caps is not None and caps.roots is not None else None


# Filled by the SDK (roots/list, either protocol era), never by the caller: not in the schema.
ClientRoots = Annotated[ListRootsResult | None, Resolve(_ask_client_roots)]


def env_strings(values: dict[str, str | int | float | bool] | None) -> dict[str, str] | None:
    """Environment values as the strings a process gets (as a job spec's env_overrides)."""
    return {name: str(value) for name, value in values.items()} if values else None


def timeout_arg(description: str | None = None) -> Any:
    """``timeout_s``: described only where it means more than the instructions' "seconds
    this call may take"."""
    return Field(description=description, gt=0)


# --- structured results -----------------------------------------------------------------------


class JobStatusResult(TypedDict):
    job_id: str
    state: str
    alive: bool
    pid: int | None
    exit_code: int | None
    signal: int | None
    started_at: str | None
    ended_at: str | None
    command: str
    cwd: str
    log_path: str
    bytes_written: int
    name: str | None
    usage: NotRequired[dict[str, Any]]  # compact: cpu_pct, rss_mb, peak_mb, gpu_mb
    reason: NotRequired[dict[str, str]]  # why it ended badly: kind, message, hint
    warnings: NotRequired[list[str]]  # the box is short of RAM, disk or GPU memory


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
    warnings: NotRequired[list[str]]


class WaitResult(TypedDict):
    done: bool
    waited_s: float
    job: JobStatusResult
    hint: str


class PingResult(TypedDict):
    ok: bool
    base_url: str
    rtt_s: float
    server_version: str | None
    supervisor_pid: int | None


def job_dict(info: JobInfo) -> JobStatusResult:
    result = JobStatusResult(
        job_id=info.job_id, state=info.state, alive=info.state == "running", pid=info.pid,
        exit_code=info.exit_code, signal=info.signal, started_at=iso_utc(info.started_at),
        ended_at=iso_utc(info.ended_at), command=info.command, cwd=info.cwd, log_path=info.log_path,
        bytes_written=info.bytes_written, name=info.name)
    usage = compact_usage(info.usage)
    if usage:
        result["usage"] = usage
    if info.reason:
        result["reason"] = info.reason
    if info.warnings:
        result["warnings"] = info.warnings
    return result


# --- the table and registration ---------------------------------------------------------------


def hints(read_only: bool, destructive: bool = False, idempotent: bool = False,
          title: str | None = None) -> ToolAnnotations:
    """Only what differs from the protocol's defaults (destructive and idempotent mean
    nothing for a read-only tool; open world is the default), to keep tools/list small."""
    given: dict[str, Any] = {"title": title} if title else {}
    if not read_only:
        given["destructive_hint"] = destructive
        if idempotent:
            given["idempotent_hint"] = True
    return ToolAnnotations(read_only_hint=read_only, **given)


@dataclass(frozen=True)
class ToolSpec:
    """One tool: its function (whose name is the tool's name) and its annotation hints."""

    fn: ToolFn
    annotations: ToolAnnotations

    @property
    def name(self) -> str:
        return self.fn.__name__


class ToolTable:
    """A module's tools in registration order; ``@TOOLS.tool(hints(...))`` adds one and
    returns the function unchanged."""

    def __init__(self) -> None:
        self.specs: list[ToolSpec] = []

    def tool(self, annotations: ToolAnnotations) -> Callable[[F], F]:
        def add(fn: F) -> F:
            self.specs.append(ToolSpec(fn, annotations))
            return fn

        return add

    def __iter__(self) -> Iterator[ToolSpec]:
        return iter(self.specs)


def _not_found_hint(name: str) -> str:
    if "_job_" in name:
        return "List the jobs this server knows with jupyter_job_list."
    if "kernel" in name:
        return "List running kernels with jupyter_list_kernels."
    return ("Check the path with jupyter_list_dir (relative paths start at the "
            "Jupyter server's root).")


def bind(fn: ToolFn, tc: ToolContext) -> ToolFn:
    """``fn`` with its first parameter (``tc``) filled in, and a signature without it: the
    one the SDK turns into the input schema."""
    signature = inspect.signature(fn)
    first, *rest = signature.parameters.values()
    if first.name != "tc":
        raise TypeError(f"tool {fn.__name__} must take tc: ToolContext as its first parameter")

    async def call(*args: Any, **kwargs: Any) -> Any:
        own = tc.for_call()
        return own.result(await fn(own, *args, **kwargs))

    # Not functools.wraps: a __wrapped__ would lead the SDK's lookups back to ``fn``'s ``tc``.
    call.__name__, call.__qualname__ = fn.__name__, fn.__qualname__
    call.__module__, call.__doc__ = fn.__module__, fn.__doc__
    call.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k != "tc"}
    setattr(call, "__signature__", signature.replace(parameters=rest))  # noqa: B010
    return call


def register(server: MCPServer, specs: Iterable[ToolSpec], tc: ToolContext) -> None:
    """Add each tool to ``server``, its failures turned into tool errors that say what to try."""
    for spec in specs:
        wrapped = tool_errors(tc.scrub, _not_found_hint(spec.name))(bind(spec.fn, tc))
        # cleandoc: the same text on every Python (3.13+ dedents docstrings when compiling).
        # No output schema in tools/list (agents never see one; it cost a sixth of the
        # list): every result still comes as structured content and as compact JSON text.
        server.add_tool(wrapped, name=spec.name,
                        description=inspect.cleandoc(spec.fn.__doc__ or ""),
                        annotations=spec.annotations, structured_output=False)
        _compact_input_schema(server, spec.name)


def _compact_input_schema(server: MCPServer, name: str) -> None:
    """List the tool's input schema compactly (shape.py); arguments are still validated
    by their pydantic model, so what is accepted does not change."""
    tool = server._tool_manager.get_tool(name)  # the SDK offers no public handle on it
    if tool is not None:
        tool.parameters = compact_schema(tool.parameters)
