"""``mcp``: serve the MCP server. Its options are defined here, once (``python -m jupyter_tether
mcp`` is the same command); ``mcp_server`` never imports the CLI."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from ..config import AUTH_TOKEN_ENV, resolve_auth_token, select_target
from .context import EXIT_OK, Ctx, UsageError, add_command
from .secrets import remember_secrets


def add_mcp(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "mcp", cmd_mcp, "serve the MCP server (streamable HTTP or stdio)",
                    """
        jupyter-tether mcp                         # http://127.0.0.1:8009/mcp
        jupyter-tether mcp --root ~/tether-work     # the embedded server's root folder
        jupyter-tether mcp --stdio --target kaggle
        jupyter-tether mcp -v                      # log each tool call with its arguments
        jupyter-tether mcp --local-root ~/proj --local-root ~/data   # file tools: only these
        jupyter-tether mcp --host 0.0.0.0 --auth-token-file ~/.config/jupyter-tether/mcp-token
        JUPYTER_TETHER_AUTH_TOKEN=... jupyter-tether mcp --allowed-host mcp.example.org
        (python -m jupyter_tether mcp is the same, for configs that start servers with python -m)
        """, common)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8009, help="port (default: %(default)s)")
    p.add_argument("--path", default="/mcp", help="HTTP path (default: %(default)s)")
    p.add_argument("--stdio", action="store_true", help="speak MCP over stdin/stdout instead")
    p.add_argument("--auth-token", default=None, metavar="TOKEN",
                   help=f"bearer token clients must send (default: ${AUTH_TOKEN_ENV}; "
                   "required off loopback); other local users see argv in the process list: "
                   "prefer the env var or --auth-token-file")
    p.add_argument("--auth-token-file", default=None, metavar="PATH",
                   help="read the bearer token from this file")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a further Host name clients use (a LAN name, a reverse proxy's "
                   "public name; NAME or NAME:PORT; repeatable); a non-loopback name needs "
                   "an auth token")
    p.add_argument("--allow-any-server", action="store_true",
                   help="let tools' server_url name any Jupyter server, not only the default "
                   "and the named targets (such servers get no token unless the URL holds one)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where exec images are saved (default: the user cache dir)")
    # The old spelling of the global --root (same destination).
    p.add_argument("--embedded-root", dest="root", default=argparse.SUPPRESS, metavar="DIR",
                   help=argparse.SUPPRESS)
    p.add_argument("--local-root", action="append", default=None, metavar="DIR",
                   help="a local directory the file tools may read and write (repeatable; "
                   "default: the cwd); a client's MCP roots narrow these, never widen them")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", action="store_true",
                      help="log each tool call with its arguments (secrets scrubbed)")
    talk.add_argument("-q", "--quiet", action="store_true",
                      help="log no tool calls (only the start and stop lines, and errors)")


def cmd_mcp(ctx: Ctx) -> int:
    args = ctx.args
    # Imported here, not at the top: the MCP SDK would slow every other command's start.
    from .. import mcp_server

    selection = select_target(args.url, args.token, args.target)
    target = selection.target
    root = str(Path(args.root).expanduser().absolute()) if getattr(args, "root", None) else None
    if root and target is not None:
        raise UsageError(f"--root is the folder of the embedded local server, but "
                         f"{target.display_url} is selected: leave out one of them")
    auth_token = resolve_auth_token(args.auth_token, args.auth_token_file)
    remember_secrets(auth_token)
    mcp_server.serve(transport="stdio" if args.stdio else "streamable-http", host=args.host,
                     port=args.port, path=args.path, url=target.base_url if target else None,
                     token=target.token if target else None, auth_token=auth_token,
                     allowed_hosts=args.allowed_host, allow_any_server=args.allow_any_server,
                     output_dir=args.output_dir, embedded_root=root,
                     local_roots=args.local_root,
                     verbosity=0 if args.quiet else 2 if args.verbose else 1,
                     cli_args=selection.cli_args() + (f" --root {shlex.quote(root)}"
                                                      if root else ""))
    return EXIT_OK
