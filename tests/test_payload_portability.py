"""The payload runs on remotes we do not control: Python >= 3.9, standard library only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from jupyter_tether.agent_payload import bundle

# Optional speed-ups the payload uses when present and falls back from cleanly, and the
# kernel itself (only comm_binding touches it).
OPTIONAL = {"msgpack", "psutil", "zstandard", "IPython", "ipykernel",
            # pyzmq and jupyter_client (with jupyter_core) come with ipykernel: kernel_exec
            # uses them, and says "unavailable" where they are missing
            "zmq", "jupyter_client", "jupyter_core"}


@pytest.mark.parametrize("name", bundle.MODULES)
def test_payload_module_parses_as_python_3_9(name: str) -> None:
    source = bundle.sources()[name]
    tree = ast.parse(source, feature_version=(3, 9))
    for node in ast.walk(tree):
        assert not isinstance(node, ast.Match), f"{name}: match needs Python 3.10"
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations = [a.annotation for a in node.args.args + node.args.kwonlyargs]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for annotation in annotations:
            if annotation is None:
                continue
            for part in ast.walk(annotation):
                # ``X | Y`` in an annotation is evaluated at definition time before 3.10.
                assert not (isinstance(part, ast.BinOp) and isinstance(part.op, ast.BitOr)), \
                    f"{name}:{node.lineno}: use Optional/Union in payload annotations"


@pytest.mark.parametrize("name", bundle.MODULES)
def test_payload_module_imports_only_the_standard_library(name: str) -> None:
    tree = ast.parse(bundle.sources()[name])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a sibling payload module
                continue
            roots = [(node.module or "").split(".")[0]]
        else:
            continue
        for root in roots:
            assert root in sys.stdlib_module_names or root in OPTIONAL, \
                f"{name}:{node.lineno} imports {root}, which a remote kernel may not have"


def test_install_code_is_one_valid_python_3_9_program() -> None:
    code = bundle.install_code({"state_dir": "/tmp/x"})
    ast.parse(code, feature_version=(3, 9))
    assert len(code.encode()) < 10 * 1024 * 1024, "must fit one websocket frame"


def _sibling_imports(source: str) -> set[str]:
    """The payload modules a module imports (``from . import x`` and ``from .x import y``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_bundle_lists_every_module_after_the_modules_it_imports() -> None:
    # The kernel runs the modules in MODULES order: a module run before one it imports fails
    # there, and one missing from MODULES is never sent at all.
    folder = Path(bundle.__file__).parent
    on_disk = {p.stem for p in folder.glob("*.py")} - {"__init__", "bundle"}
    assert set(bundle.MODULES) == on_disk
    sources = bundle.sources()
    for index, name in enumerate(bundle.MODULES):
        earlier = set(bundle.MODULES[:index])
        assert _sibling_imports(sources[name]) <= earlier, \
            f"{name} imports {_sibling_imports(sources[name]) - earlier}, listed after it"
