"""The MCP tools: the 23 of the reference server (same names, arguments and defaults), plus
job list/follow/wait and status.

Every tool is a thin call into the controller through the server's TetherPool; failures
become tool errors (``isError``) whose text says what went wrong and what to try next.
Each module holds one group and its ``TOOLS`` table; ``TABLE`` lists them in the order
clients see them. To add a tool, write it in its group's module (see common.py).
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

from ..local_roots import server_roots
from . import files, forward, jobs, kernels, notebooks, resources, status, submit
from .common import PoolHolder, ToolContext, ToolSpec, register

TABLE: tuple[ToolSpec, ...] = (*kernels.TOOLS, *files.TOOLS, *jobs.TOOLS, *submit.TOOLS,
                               *notebooks.TOOLS, *status.TOOLS, *forward.TOOLS, *resources.TOOLS)
TOOL_NAMES: tuple[str, ...] = tuple(spec.name for spec in TABLE)


def register_tools(server: MCPServer, holder: PoolHolder,
                   local_roots: tuple[str, ...] | None = None) -> None:
    """Register every tool on ``server``; ``holder.pool`` is valid while the server runs.

    ``local_roots`` are the server's own allowed local roots (``server_roots()``; default:
    the cwd): local-file tools refuse paths outside them (see local_roots.py).
    """
    own_roots = local_roots if local_roots is not None else server_roots()
    register(server, TABLE, ToolContext(holder, own_roots))


__all__ = ["TABLE", "TOOL_NAMES", "register_tools"]
