"""``python -m jupyter_tether``: the ``jupyter-tether`` command (``python -m jupyter_tether mcp``
serves the MCP server)."""

import sys

from .cli import main

sys.exit(main())
