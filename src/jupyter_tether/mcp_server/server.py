"""Build the MCP server and serve it over streamable HTTP (loopback by default) or stdio."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import LinkOptions, __version__
from ..config import AUTH_TOKEN_ENV
from ..controller.target import redact
from ..errors import ConfigError
from .local_roots import server_roots
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
Relative remote paths are relative to the Jupyter server's root directory. Local paths must
lie inside the allowed local roots (your MCP roots, within this server's cwd or --local-root
dirs); relative local paths start at the first root."""

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
                 embedded_root: str | os.PathLike[str] | None = None,
                 local_roots: Sequence[str | os.PathLike[str]] | None = None,
                 allow_any_server: bool = False) -> MCPServer[Any]:
    """The MCP server with every tool; its lifespan opens (lazily) and closes the tethers.

    A tool's ``server_url`` may name the default server or a named target; any other URL is
    refused unless ``allow_any_server`` (``--allow-any-server``), and then gets no token
    but the one in the URL itself.

    ``local_roots`` (``--local-root``) are the directories the local-file tools may use,
    default the cwd; a client's MCP roots narrow them, never widen (see local_roots.py).
    """
    own_roots = server_roots(local_roots)  # a bad --local-root fails here, at start
    state = _State()

    @asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[_State]:
        async with TetherPool(url, token, options=options, output_dir=output_dir,
                              embedded_root=embedded_root,
                              allow_any_server=allow_any_server) as pool:
            state._pool = pool
            try:
                yield state
            finally:
                state._pool = None

    server: MCPServer[Any] = MCPServer(
        name="jupyter-tether", title="jupyter-tether", version=__version__,
        instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING")
    register_tools(server, state, own_roots)
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


def split_allowed_host(value: str) -> tuple[str, int | None]:
    """``--allowed-host`` as ``(host, port or None)``: ``NAME``, ``NAME:PORT``, ``[v6]:PORT``."""
    name = value.strip().lower()
    if not name or any(c in name for c in "/*?#@ \t\\") or name.count("[") > 1:
        raise ConfigError(f"--allowed-host {value!r} is not a host name: give NAME or "
                          "NAME:PORT, as clients put it in the Host header")
    port: str | None = None
    if name.startswith("["):
        host, _, rest = name[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"--allowed-host {value!r}: expected [ADDRESS]:PORT")
            port = rest[1:]
    elif name.count(":") == 1:
        host, port = name.split(":")
    else:
        host = name  # a name, or a bare IPv6 address
    if not host or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ConfigError(f"--allowed-host {value!r} has no host or a bad port")
    return host, int(port) if port is not None else None


def security_settings(host: str, port: int,
                      extra_hosts: list[str] | None = None) -> TransportSecuritySettings:
    """Host and Origin allow-lists (DNS rebinding protection): this server's names, plus
    ``extra_hosts`` (``--allowed-host``): a name behind a reverse proxy may come without a
    port (or with the proxy's), so a bare NAME is accepted with no port and with ours."""
    hosts: list[str] = []
    origins: list[str] = []
    entries: list[tuple[str, int | None]] = [(name, port) for name in _host_names(host)]
    for value in extra_hosts or []:
        name, given = split_allowed_host(value)
        entries += [(name, given)] if given is not None else [(name, None), (name, port)]
    for name, at in entries:
        shown = f"[{name}]" if ":" in name and not name.startswith("[") else name
        if at is None:
            hosts.append(shown)
            origins += [f"http://{shown}", f"https://{shown}"]
            continue
        hosts.append(f"{shown}:{at}")
        origins += [f"http://{shown}:{at}", f"https://{shown}:{at}"]
        # Browsers leave a scheme's default port out of the Origin header.
        origins += [f"http://{shown}"] if at == 80 else [f"https://{shown}"] if at == 443 else []
    return TransportSecuritySettings(enable_dns_rebinding_protection=True,
                                     allowed_hosts=list(dict.fromkeys(hosts)),
                                     allowed_origins=list(dict.fromkeys(origins)))


def _exposure(host: str, allowed_hosts: list[str] | None) -> str:
    """Why clients beyond this machine may reach the server ("" when only loopback can)."""
    if not is_loopback(host):
        return f"binding the MCP server to {host}"
    for value in allowed_hosts or []:
        name, _ = split_allowed_host(value)
        if not is_loopback(name):
            return (f"--allowed-host {value} (clients reaching this server by that name, "
                    "through a LAN or a reverse proxy)")
    return ""


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
    exposure = _exposure(host, allowed_hosts)
    if exposure and not auth_token:
        raise ConfigError(
            f"{exposure} would let anyone who reaches it run code on the Jupyter server and "
            "read and write this machine's files: require a bearer token with "
            f"--auth-token-file PATH or ${AUTH_TOKEN_ENV} (clients send 'Authorization: "
            "Bearer <token>'), or serve on 127.0.0.1 only")
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
          local_roots: Sequence[str | os.PathLike[str]] | None = None,
          allow_any_server: bool = False, log_level: str = "warning") -> None:
    """Run the MCP server until interrupted (blocking).

    ``transport`` is ``"streamable-http"`` (at ``http://host:port/path``) or ``"stdio"``.
    The target is ``url``/``token``, else ``REMOTE_JUPYTER_URL``/``REMOTE_JUPYTER_TOKEN``,
    else an embedded local Jupyter server; a tool's ``server_url`` picks another one.
    Binding a non-loopback ``host`` (or allowing a non-loopback Host name in
    ``allowed_hosts``) requires ``auth_token``. The local-file tools only use
    paths inside ``local_roots`` (default: the cwd), cut down to the client's MCP roots.
    """
    if not path.startswith("/"):
        path = "/" + path
    server = build_server(url=url, token=token, output_dir=output_dir,
                          embedded_root=embedded_root, local_roots=local_roots,
                          allow_any_server=allow_any_server)
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

