"""``python -m jupyter_tether.mcp_server``: run the MCP server (the CLI's ``mcp`` command)."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from .server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jupyter_tether.mcp_server",
                                     description=__doc__)
    parser.add_argument("--stdio", action="store_true", help="serve over stdin/stdout")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8009)
    parser.add_argument("--path", default="/mcp")
    parser.add_argument("--url", help="Jupyter server URL (default: REMOTE_JUPYTER_URL)")
    parser.add_argument("--token", help="Jupyter token (default: REMOTE_JUPYTER_TOKEN)")
    parser.add_argument("--auth-token", help="bearer token clients must send (required to "
                                             "bind a non-loopback host)")
    parser.add_argument("--embedded-root", help="root directory of the embedded local server")
    parser.add_argument("--output-dir", help="where exec images are saved")
    args = parser.parse_args(argv)
    try:
        serve(transport="stdio" if args.stdio else "streamable-http", host=args.host,
              port=args.port, path=args.path, url=args.url, token=args.token,
              auth_token=args.auth_token, embedded_root=args.embedded_root,
              output_dir=args.output_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
