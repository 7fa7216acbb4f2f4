"""Build the MCP server and serve it over streamable HTTP (loopback by default) or stdio."""

from __future__ import annotations

import errno
import hmac
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.resources import TextResource
from mcp.server.transport_security import TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import LinkOptions, __version__
from ..config import AUTH_TOKEN_ENV, default_root
from ..credentials import URL_ENV, redact
from ..errors import ConfigError
from .calllog import ToolCallLog, route_to_stderr
from .local_roots import server_roots
from .pool import DEFAULT_KEY, TetherPool
from .tools import register_tools

logger = logging.getLogger("jupyter_tether.mcp")

# What the tools' short parameter descriptions leave out is said here once (clients put it
# in the agent's context at initialize), and served as the resource HELP_URI.
HELP_URI = "jupyter-tether://help"
INSTRUCTIONS = """\
jupyter-tether drives a remote Jupyter server (Kaggle, a GPU box, JupyterHub) through one
persistent link to a supervisor running in its own kernel there.

Quick start: jupyter_ping; jupyter_exec_python for short Python (variables persist between
calls); jupyter_job_start or jupyter_job_submit for anything long (they return a job_id at
once), then jupyter_job_follow(job_id, offset=next_offset) until eof (each call gathers up
to wait_s of output) or jupyter_job_wait; move files with jupyter_upload_local_file,
jupyter_sync_dir, jupyter_download_to_local; jupyter_job_collect fetches a submitted job's
artifacts; jupyter_status shows where things stand.

Arguments every tool shares:
- server_url: which Jupyter server. Omit it for this MCP server's own target (its --url, or
  REMOTE_JUPYTER_URL with the token in REMOTE_JUPYTER_TOKEN, else an embedded local Jupyter
  server). Or give the name of a target in jupyter-tether's config file (targets.toml;
  jupyter_status lists them), which brings its own token, or the URL of one of these (a
  token may ride in ?token=); other URLs only with the server's --allow-any-server.
- timeout_s: seconds this call may take. When it runs out, work already sent may go on:
  check with jupyter_status or jupyter_job_list before retrying.
- Arguments described as "Ignored (compatibility)" (kernel_id on tools that run no user code,
  archive_remote_path, keep_archive) are accepted for agents written for the reference
  Jupyter MCP server: jupyter-tether works through its supervisor, not a user kernel, and
  stages no archives.

Paths and results:
- Relative remote paths start at the Jupyter server's root ('' is the root). Results give
  remote paths under the root relative to it.
- Local paths (local_path, local_dir, a job spec's sync local_dir) are on this MCP server's
  machine and must lie inside the allowed local roots: your MCP roots, within this server's
  cwd or its --local-root dirs. A relative local path starts at the first root.
- Results are compact JSON; times are ISO-8601 UTC, durations in seconds (seconds, *_s).
  Long outputs are capped with a marker that says where the rest is.

This text is also the resource jupyter-tether://help."""

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


class _CallTargets:
    """Where a tool call goes, for the call log: the default target's label, a named target,
    or the redacted URL (see ``calllog.TargetNames``)."""

    def __init__(self, pool: TetherPool, default_label: str) -> None:
        self._pool = pool
        self._default = default_label

    def target_label(self, server_url: str | None, job_id: str | None) -> str:
        if server_url and server_url.strip():
            key = self._pool.key_for(server_url)
            named = "/" not in server_url and ":" not in server_url
            label = server_url.strip() if named and key != DEFAULT_KEY else key
        else:
            key = self._pool.job_targets.get(job_id, DEFAULT_KEY) if job_id else DEFAULT_KEY
            label = key
        return self._default if key == DEFAULT_KEY else label

    def scrub(self, text: str) -> str:
        return self._pool.scrub(text)


def default_target_label(url: str | None) -> str:
    """How logs and banners name the default target (never with its credential)."""
    url = url or os.environ.get(URL_ENV) or None
    return redact(url) if url else "embedded"


def build_server(*, url: str | None = None, token: str | None = None,
                 options: LinkOptions | None = None,
                 output_dir: str | os.PathLike[str] | None = None,
                 embedded_root: str | os.PathLike[str] | None = None,
                 local_roots: Sequence[str | os.PathLike[str]] | None = None,
                 allow_any_server: bool = False, log_arguments: bool = False,
                 stop_report: Callable[[str], None] | None = None,
                 cli_args: str = "") -> MCPServer[Any]:
    """The MCP server with every tool; its lifespan opens (lazily) and closes the tethers.

    A tool's ``server_url`` may name the default server or a named target; any other URL is
    refused unless ``allow_any_server`` (``--allow-any-server``), and then gets no token
    but the one in the URL itself.

    ``local_roots`` (``--local-root``) are the directories the local-file tools may use,
    default the cwd; a client's MCP roots narrow them, never widen (see local_roots.py).

    Every tool call is logged (``calllog``; ``log_arguments`` adds its arguments, scrubbed).
    ``stop_report``, when given, is told at shutdown which jobs are still running and how
    to reach them (``cli_args``: the ``jupyter-tether`` options that select the default
    target again).
    """
    own_roots = server_roots(local_roots)  # a bad --local-root fails here, at start
    state = _State()
    default_label = default_target_label(url)

    @asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[_State]:
        async with TetherPool(url, token, options=options, output_dir=output_dir,
                              embedded_root=embedded_root,
                              allow_any_server=allow_any_server) as pool:
            state._pool = pool
            try:
                yield state
            finally:
                if stop_report is not None:
                    stop_report(await running_jobs_report(pool, cli_args))
                state._pool = None

    def call_targets() -> _CallTargets | None:
        return _CallTargets(state._pool, default_label) if state._pool is not None else None

    server: MCPServer[Any] = MCPServer(
        name="jupyter-tether", title="jupyter-tether", version=__version__,
        instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING",
        middleware=[ToolCallLog(call_targets, with_arguments=log_arguments)])
    register_tools(server, state, own_roots)
    server.add_resource(TextResource(uri=HELP_URI, name="help", title="jupyter-tether help",
                                     mime_type="text/plain", text=INSTRUCTIONS))
    return server


STOP_REPORT_S = 10.0


async def running_jobs_report(pool: TetherPool, cli_args: str = "") -> str:
    """What a stopping server says: which jobs still run on each open target (they keep
    running: they are not children of this process) and the commands that reach them."""
    lines: list[str] = []
    # Shielded: a stdio server stops by cancellation, and the answer is still wanted.
    with anyio.move_on_after(STOP_REPORT_S, shield=True) as scope:
        for key, tether in pool.opened().items():
            try:
                running = await tether.jobs.list("running")
                status = await tether.status()
            except Exception as exc:  # the link is down: say so rather than nothing
                lines.append(f"could not list the jobs on {tether.target.display_url}: "
                             f"{pool.scrub(str(exc))}")
                continue
            if not running:
                continue
            if key == DEFAULT_KEY:
                again = cli_args
            elif tether.target.name:
                again = f" --target {tether.target.name}"
            else:
                again = f" --url {tether.target.display_url}"
            where = (f"the embedded local server (root {status.get('root_dir')})"
                     if status.get("embedded") else tether.target.display_url)
            count = f"{len(running)} job" + ("s" if len(running) != 1 else "")
            lines.append(f"{count} still running on {where}; they keep running:")
            lines += [f"  {info.job_id}  {' '.join(info.command.split())[:70]}"
                      for info in sorted(running, key=lambda i: i.started_at or 0)]
            lines.append(f"  list them:  jupyter-tether{again} jobs")
            lines.append(f"  follow one: jupyter-tether{again} logs JOB_ID -f")
    if scope.cancelled_caught:
        lines.append(f"(gave up listing running jobs after {STOP_REPORT_S:g}s)")
    head = "jupyter-tether MCP server stopped" + ("" if lines else "; no jobs are running")
    return "\n".join([head, *lines])


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
          allow_any_server: bool = False, log_level: str = "warning", verbosity: int = 1,
          cli_args: str = "") -> None:
    """Run the MCP server until interrupted (blocking).

    ``transport`` is ``"streamable-http"`` (at ``http://host:port/path``) or ``"stdio"``.
    The target is ``url``/``token``, else ``REMOTE_JUPYTER_URL``/``REMOTE_JUPYTER_TOKEN``,
    else an embedded local Jupyter server; a tool's ``server_url`` picks another one.
    Binding a non-loopback ``host`` (or allowing a non-loopback Host name in
    ``allowed_hosts``) requires ``auth_token``. The local-file tools only use
    paths inside ``local_roots`` (default: the cwd), cut down to the client's MCP roots.

    Tool calls are logged on stderr, one line each (``verbosity`` 0: none, 2: with their
    arguments, scrubbed). A port already in use is a ConfigError, raised before anything
    is printed. At shutdown it says which jobs still run, and how to reach them with the
    ``jupyter-tether`` options ``cli_args``.
    """
    if not path.startswith("/"):
        path = "/" + path
    route_to_stderr(verbosity)
    server = build_server(url=url, token=token, output_dir=output_dir,
                          embedded_root=embedded_root, local_roots=local_roots,
                          allow_any_server=allow_any_server, log_arguments=verbosity > 1,
                          stop_report=_print_stderr, cli_args=cli_args)
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

    listener = listen_socket(host, port)  # before the banner: a busy port says only that
    _print_stderr(banner(host, port, path, url, embedded_root, auth_token, verbosity))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=10)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on: a normal stop
        pass


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound listening TCP socket for the server; a port in use is a ConfigError (exit 2
    in the CLI) that says what to do, rather than uvicorn's own error line."""
    # As uvicorn binds: IPv6 for an address with a colon, else IPv4 (names resolved so).
    # IPPROTO_TCP said, not left 0: asyncio turns Nagle off only on sockets that say it, and
    # with Nagle on each tool call's result waits ~40 ms for a delayed ACK over a real link.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} is in use (another jupyter-tether mcp?): "
                              "pass --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def banner(host: str, port: int, path: str, url: str | None,
           embedded_root: str | os.PathLike[str] | None, auth_token: str | None,
           verbosity: int) -> str:
    """What ``jupyter-tether mcp`` prints once it listens: where, on what, and the line that
    adds it to Claude Code."""
    shown = f"[{host}]" if ":" in host else host
    mcp_url = f"http://{shown}:{port}{path}"
    # A wildcard bind is reached through loopback from this machine.
    local_url = mcp_url if host not in ("0.0.0.0", "::", "") else \
        f"http://127.0.0.1:{port}{path}"
    if url or os.environ.get(URL_ENV):
        jupyter = default_target_label(url)
    else:
        root = os.path.abspath(os.path.expanduser(embedded_root)) if embedded_root else \
            str(default_root())
        jupyter = f"an embedded local Jupyter server (started on first use), root {root}"
    add = f"claude mcp add --transport http jupyter-tether {local_url}"
    if auth_token:
        add += f' --header "Authorization: Bearer ${AUTH_TOKEN_ENV}"'
    calls = {0: "not logged (-q)", 1: "logged here (-v adds arguments)",
             2: "logged here with their arguments"}.get(verbosity, "logged here")
    return (f"jupyter-tether MCP server on {mcp_url}\n"
            f"  Jupyter:  {jupyter}\n"
            f"  add it:   {add}\n"
            f"  tool calls {calls}; Ctrl-C stops it")


def _print_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

