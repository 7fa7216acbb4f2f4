"""Build the MCP server and serve it over streamable HTTP (loopback by default) or stdio."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..controller.link import LinkOptions
from ..controller.target import redact
from ..errors import ConfigError
from .pool import TetherPool
from .tools import register_tools

logger = logging.getLogger("jupyter_tether.mcp")

INSTRUCTIONS = """\
jupyter-tether drives a remote Jupyter server (Kaggle, a GPU box, JupyterHub) through one
persistent link. Quick start: jupyter_ping; jupyter_exec_python for short Python (variables
persist between calls); jupyter_job_start or jupyter_job_submit for anything long (they
return a job_id at once), then loop on jupyter_job_follow(job_id, offset=next_offset) until
eof, or jupyter_job_wait; move files with jupyter_upload_local_file, jupyter_sync_dir,
jupyter_download_to_local; jupyter_job_collect downloads a submitted job's artifacts.
Relative remote paths are relative to the Jupyter server's root directory."""

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class _State:
    """Holds the pool while the server runs (tools look it up here on every call)."""

    def __init__(self) -> None:
        self._pool: TetherPool | None = None

    @property
    def pool(self) -> TetherPool:
        if self._pool is None:
            raise ConfigError("the MCP server is not running (no lifespan)")
        return self._pool


def build_server(*, url: str | None = None, token: str | None = None,
                 options: LinkOptions | None = None,
                 output_dir: str | os.PathLike[str] | None = None,
                 embedded_root: str | os.PathLike[str] | None = None) -> MCPServer[Any]:
    """The MCP server with every tool; its lifespan opens (lazily) and closes the tethers."""
    state = _State()

    @asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[_State]:
        async with TetherPool(url, token, options=options, output_dir=output_dir,
                              embedded_root=embedded_root) as pool:
            state._pool = pool
            try:
                yield state
            finally:
                state._pool = None

    server: MCPServer[Any] = MCPServer(
        name="jupyter-tether", title="jupyter-tether", version=__version__,
        instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING")
    register_tools(server, state)
    return server


# --- HTTP security ----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_names(host: str) -> list[str]:
    """Names a client may put in the Host header to reach a server bound to ``host``."""
    names = list(LOOPBACK_NAMES)
    if host in ("0.0.0.0", "::", ""):
        # Bound everywhere: accept this machine's own names and addresses.
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.append(name)
            try:
                names.extend(str(info[4][0]) for info in socket.getaddrinfo(name, None))
            except OSError:
                pass
    else:
        names.append(host)
    return list(dict.fromkeys(names))


def security_settings(host: str, port: int,
                      extra_hosts: list[str] | None = None) -> TransportSecuritySettings:
    """Host and Origin allow-lists (DNS rebinding protection): this server's names only."""
    hosts: list[str] = []
    origins: list[str] = []
    for name in [*_host_names(host), *(extra_hosts or [])]:
        shown = f"[{name}]" if ":" in name and not name.startswith("[") else name
        hosts.append(f"{shown}:{port}")
        origins += [f"http://{shown}:{port}", f"https://{shown}:{port}"]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True,
                                     allowed_hosts=hosts, allowed_origins=origins)


class BearerAuth:
    """Refuse any HTTP request without ``Authorization: Bearer <token>`` (constant-time check)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scheme, _, value = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    value.strip().encode(), self._expected):
                response = JSONResponse(
                    {"error": "unauthorized",
                     "error_description": "send Authorization: Bearer <the server's auth token>"},
                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="jupyter-tether"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def http_app(server: MCPServer[Any], *, host: str = "127.0.0.1", port: int = 8009,
             path: str = "/mcp", auth_token: str | None = None,
             allowed_hosts: list[str] | None = None) -> ASGIApp:
    """The ASGI app for streamable HTTP, with Host/Origin checks and optional bearer auth."""
    if not is_loopback(host) and not auth_token:
        raise ConfigError(
            f"binding the MCP server to {host} would expose a remote shell to the network; "
            "pass an auth token (--auth-token / auth_token=...) that clients must send as "
            "'Authorization: Bearer <token>', or bind 127.0.0.1")
    app: ASGIApp = server.streamable_http_app(
        streamable_http_path=path, host=host,
        transport_security=security_settings(host, port, allowed_hosts))
    if auth_token:
        app = BearerAuth(app, auth_token)
    return app


# --- serve ------------------------------------------------------------------------------------


def serve(*, transport: str = "streamable-http", host: str = "127.0.0.1", port: int = 8009,
          path: str = "/mcp", url: str | None = None, token: str | None = None,
          auth_token: str | None = None, allowed_hosts: list[str] | None = None,
          output_dir: str | os.PathLike[str] | None = None,
          embedded_root: str | os.PathLike[str] | None = None,
          log_level: str = "warning") -> None:
    """Run the MCP server until interrupted (blocking).

    ``transport`` is ``"streamable-http"`` (at ``http://host:port/path``) or ``"stdio"``.
    The target is ``url``/``token``, else ``REMOTE_JUPYTER_URL``/``REMOTE_JUPYTER_TOKEN``,
    else an embedded local Jupyter server; a tool's ``server_url`` picks another one.
    Binding a non-loopback ``host`` requires ``auth_token``.
    """
    if not path.startswith("/"):
        path = "/" + path
    server = build_server(url=url, token=token, output_dir=output_dir,
                          embedded_root=embedded_root)
    if transport == "stdio":
        # SIGTERM would skip cleanup (the embedded Jupyter server, the kernels' websockets).
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            anyio.run(server.run_stdio_async)
        except KeyboardInterrupt:
            pass
        return
    if transport not in ("streamable-http", "http"):
        raise ConfigError(f"unknown transport {transport!r}: use 'streamable-http' or 'stdio'")
    app = http_app(server, host=host, port=port, path=path, auth_token=auth_token,
                   allowed_hosts=allowed_hosts)
    import uvicorn

    target = redact(url) if url else (redact(os.environ["REMOTE_JUPYTER_URL"])
                                      if os.environ.get("REMOTE_JUPYTER_URL") else
                                      "an embedded local Jupyter server (started on first use)")
    shown = f"[{host}]" if ":" in host else host
    print(f"jupyter-tether MCP server on http://{shown}:{port}{path} -> {target}",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=10)
    uvicorn.Server(config).run()


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

