"""jupyter-tether's test suite (README: how to run it; docs/architecture.md: how it is laid out)."""

import sys

# Bytecode caching on for this run, whatever PYTHONDONTWRITEBYTECODE says (some CI images set
# it): with it off every xdist worker compiles the package and rewrites the test modules'
# asserts anew, ~6 CPU-s each, and every CLI, MCP server and kernel process a test starts
# compiles the package again. Those inherit the variable but read the caches written here.
sys.dont_write_bytecode = False
