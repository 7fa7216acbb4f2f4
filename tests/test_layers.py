"""The layers hold: imports only point down (mcp_server and cli -> controller -> payload), and
no module imports itself back through others. Read from the source with ``ast``, so an
import under ``TYPE_CHECKING`` or inside a function counts too."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

import jupyter_tether

PACKAGE = "jupyter_tether"
SOURCE = Path(jupyter_tether.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in SOURCE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The project's modules ``name`` imports (a package counts as its ``__init__``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import mod`` imports the submodule; ``from pkg import name``, ``pkg``.
            submodules = {f"{target}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(target)
    return {f for f in found if f in MODULES and f != name}


@functools.cache
def graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports. Built on first use, not at import: every
    xdist worker collects this module, one runs it."""
    return {name: imports_of(name) for name in MODULES}


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_is_read() -> None:
    # A parser that found nothing would let every check below pass.
    assert f"{PACKAGE}.controller.tether" in graph()[f"{PACKAGE}.controller.blocking"]
    assert f"{PACKAGE}.agent_payload.wire" in graph()[f"{PACKAGE}.controller.files.upload"]
    assert f"{PACKAGE}.controller.files.service" in graph()[f"{PACKAGE}.controller.files"]


def test_no_import_cycles() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for other in sorted(graph()[name]):
            if state.get(other) == 1:
                cycles.append([*path[path.index(other):], other])
            elif other not in state:
                visit(other)
        path.pop()
        state[name] = 2

    for name in sorted(graph()):
        if name not in state:
            visit(name)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(("low", "forbidden"), [
    ("agent_payload", {"controller", "mcp_server", "cli", "errors", "config", "__init__"}),
    ("controller", {"mcp_server", "cli"}),
    ("mcp_server", {"cli"}),
])
def test_layers_import_only_downwards(low: str, forbidden: set[str]) -> None:
    wrong = sorted(f"{name} -> {other}" for name, others in graph().items() if layer(name) == low
                   for other in others
                   if layer(other) in forbidden or (other == PACKAGE and "__init__" in forbidden))
    assert wrong == []


def test_the_payload_imports_only_itself_and_the_standard_library() -> None:
    # It runs in the remote kernel, where nothing of jupyter_tether is installed.
    outside: list[str] = []
    for name, path in MODULES.items():
        if layer(name) != "agent_payload":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not node.level and \
                    (node.module or "").startswith(PACKAGE):
                outside.append(f"{name}: from {node.module}")
            elif isinstance(node, ast.Import):
                outside.extend(f"{name}: import {a.name}" for a in node.names
                               if a.name.startswith(PACKAGE))
    assert outside == []


#: The only controller modules the CLI and the MCP server import directly (everything else
#: comes through ``jupyter_tether``, ``jupyter_tether.errors`` or a neutral top-level module:
#: ``config``, ``credentials``, ``formatting``), each with its reason.
FACE_TO_CONTROLLER = {
    # The pool's trust rule splits a pasted server_url into its base and its own token.
    ("mcp_server.pool", "controller.target"),
    # jupyter_sync_dir's reference-tool exclude CSV, read as job specs read it.
    ("mcp_server.tools.files", "controller.submit"),
}


def test_the_cli_and_the_mcp_server_use_the_public_face() -> None:
    def short(name: str) -> str:
        return name.removeprefix(PACKAGE + ".")

    direct = sorted(f"{short(name)} -> {short(other)}" for name, others in graph().items()
                    if layer(name) in ("cli", "mcp_server") for other in others
                    if layer(other) == "controller"
                    and (short(name), short(other)) not in FACE_TO_CONTROLLER)
    assert direct == [], "import these through jupyter_tether (or a neutral module)"


def test_starting_the_cli_or_the_mcp_server_does_not_load_heavy_modules() -> None:
    # nbformat brings jsonschema's format checkers, whose grammar takes ~1.4 s to build: a cost
    # every CLI run and MCP start would pay. Only writing a notebook needs it. jupyter_client
    # and jupyter_server (with zmq and tornado) cost ~90 ms: the controller frames kernel
    # messages itself (kernel_wire).
    import subprocess
    import sys

    probe = ("import sys, jupyter_tether.cli.app, jupyter_tether.mcp_server.server; "
             "print(sorted(m for m in ('nbformat', 'jsonschema', 'jupyter_client', "
             "'jupyter_server', 'zmq', 'tornado') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"


def test_a_notebook_write_in_the_cli_does_not_build_jsonschemas_format_checkers() -> None:
    # `nb edit` validates with nbformat, which imports jsonschema, which imported every
    # optional format checker it found (rfc3987_syntax builds a grammar: ~1 CPU-s per call).
    import subprocess
    import sys

    probe = """
import contextlib, io, sys
from jupyter_tether.cli import main
from jupyter_tether.controller.notebooks.document import validate
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["--help"])
validate({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}, "x.ipynb")
print(sorted(m for m in ("rfc3987_syntax", "webcolors", "fqdn") if sys.modules.get(m)))
"""
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"
