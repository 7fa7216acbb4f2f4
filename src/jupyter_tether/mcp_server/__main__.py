"""``python -m jupyter_tether.mcp_server``: the same as ``jupyter-tether mcp`` (same options).

Kept as a module entry point for MCP client configs that start servers with ``python -m``;
the options are defined once, by the CLI's ``mcp`` subcommand.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(["mcp", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
