"""jupyter-tether's MCP server: the controller's operations as MCP tools.

``serve()`` runs it (streamable HTTP on 127.0.0.1:8009/mcp by default, or stdio);
``build_server()`` returns the ``MCPServer`` for embedding or in-process tests.
"""

from .server import build_server, http_app, serve
from .tools import TOOL_NAMES

__all__ = ["TOOL_NAMES", "build_server", "http_app", "serve"]
