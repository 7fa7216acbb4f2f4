"""Port forwarding tools: reach a server on the remote at a local URL, list and close forwards.

Forwards live in this MCP server's process, as long as it runs (or until closed): the URL
works for any program on this machine, the agent's browser tools included.
"""
# No ``from __future__ import annotations``: the SDK reads these signatures at runtime.

import weakref
from typing import Any

from ... import AsyncTether, PortForward
from ...errors import ConfigError
from ..limits import bounded
from .common import ServerUrl, ToolContext, ToolTable, hints

TOOLS = ToolTable()

FORWARD_TIMEOUT_S = 30.0

#: the forwards this process opened, per tether, by local port (for close)
_OPENED: "weakref.WeakKeyDictionary[AsyncTether, dict[int, PortForward]]" = \
    weakref.WeakKeyDictionary()


def _row(target: str, info: dict[str, Any]) -> dict[str, Any]:
    keep = ("url", "local_port", "remote_host", "remote_port", "connections", "active",
            "failed", "bytes_up", "bytes_down", "last_error", "remote_listening", "proxy_url")
    return {"target": target, **{k: info[k] for k in keep}}


async def _tethers(tc: ToolContext, server_url: str | None) -> list[AsyncTether]:
    """That target's tether, or (no server_url) every one this server has open."""
    if server_url:
        return [await tc.tether(server_url)]
    return list(tc.pool.opened().values())


@TOOLS.tool(hints(False))
async def jupyter_port_forward(
    tc: ToolContext,
    remote_port: int,
    local_port: int = 0,
    server_url: ServerUrl = None,
) -> dict[str, Any]:
    """Serve a remote port (TensorBoard, Gradio...) at a local URL."""
    async with bounded(FORWARD_TIMEOUT_S, "port forward"):
        tether = await tc.tether(server_url)
        forward = await tether.forward(remote_port, local_port)
    _OPENED.setdefault(tether, {})[forward.local_port] = forward
    row = _row(tether.target.display_url, forward.info())
    if not forward.remote_listening:
        row["hint"] = (f"nothing listens on remote port {remote_port} yet: start the server "
                       "there (jupyter_job_start); the forward stays open")
    return row


@TOOLS.tool(hints(True))
async def jupyter_port_forward_list(tc: ToolContext, server_url: ServerUrl = None
                                    ) -> dict[str, Any]:
    """Open forwards, with byte counts."""
    rows = [_row(tether.target.display_url, info)
            for tether in await _tethers(tc, server_url) for info in tether.forwards()]
    return {"forwards": rows}


@TOOLS.tool(hints(False, destructive=True))
async def jupyter_port_forward_close(tc: ToolContext, local_port: int,
                                     server_url: ServerUrl = None) -> dict[str, Any]:
    """Close a forward."""
    for tether in await _tethers(tc, server_url):
        forward = _OPENED.get(tether, {}).pop(local_port, None)
        if forward is not None and not forward.closed:
            await forward.close()
            return {"closed": True, **_row(tether.target.display_url, forward.info())}
    raise ConfigError(f"no forward listens on local port {local_port}: see "
                      "jupyter_port_forward_list")
