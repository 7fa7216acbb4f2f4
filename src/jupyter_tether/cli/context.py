"""What every command gets: the exit codes, ``UsageError``, the ``Ctx`` it runs with (its
arguments, its consoles, one lazily opened ``Tether``), the one-line error, and
``add_command``, which registers a command's sub-parser."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .. import RemoteError, Target, Tether
from ..config import Selection, default_root, select_target
from ..credentials import URL_ENV
from .secrets import remember_secrets, scrub

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "JUPYTER_TETHER_DEBUG"


class UsageError(Exception):
    """A problem with the command line itself (exit 2)."""


@dataclass
class Ctx:
    """What a command runs with: its arguments, the two consoles, and the ``Tether`` that
    ``connect()`` opens on first use (``main`` closes it)."""

    args: argparse.Namespace
    json: bool
    out: Console
    err: Console
    tty: bool
    selection: Selection | None = None
    _tether: Tether | None = field(default=None, repr=False)

    def note(self, message: str) -> None:
        """Human progress notes: stderr, never in --json mode."""
        if not self.json:
            self.err.print(message, style="dim", markup=False, highlight=False)

    def emit_json(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, indent=2, default=json_default) + "\n")
        sys.stdout.flush()

    @property
    def root(self) -> Path | None:
        """``--root DIR``: the embedded local server's root (None: ``default_root()``)."""
        root = getattr(self.args, "root", None)
        return Path(root).expanduser().absolute() if root else None

    def connect(self) -> Tether:
        if self._tether is None:
            self.selection = select_target(self.args.url, self.args.token, self.args.target)
            target = self.selection.target
            if target is None:
                root = self.root or default_root()
                self.note(f"no --target, --url or ${URL_ENV}: starting a local Jupyter server "
                          f"(root: {root})")
                self._tether = Tether(embedded_root=root)
            else:
                if self.root is not None:
                    by = {"env": f"${URL_ENV}", "default": "the config file's default"}.get(
                        self.selection.source, "--target/--url")
                    raise UsageError(f"--root is the folder of the embedded local server, but "
                                     f"{by} selects {target.display_url}: leave out --root, "
                                     "or the remote selection")
                remember_secrets(target.token)
                self._tether = Tether(target=target)
        return self._tether

    def again(self, command: str) -> str:
        """A command line that reaches the same server (with no secret in it)."""
        extra = self.selection.cli_args() if self.selection else ""
        if self.selection is not None and self.selection.target is None and self.root:
            extra += f" --root {shlex.quote(str(self.root))}"
        return f"jupyter-tether{extra} {command}"

    def table(self, table: Table) -> None:
        if self.tty:
            self.out.print(table)
            return
        # Piped: no styling and no trailing padding, so scripts can split on whitespace.
        with self.out.capture() as captured:
            self.out.print(table)
        text = "\n".join(line.rstrip() for line in captured.get().splitlines())
        sys.stdout.write(text.strip("\n") + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        if self._tether is not None:
            tether, self._tether = self._tether, None
            tether.close()


def json_default(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Path):
        return str(value)
    return str(value)


def error(message: str, *, code: str | None = None, as_json: bool = False) -> None:
    """``error: MESSAGE`` as one line on stderr, with no credential in it; with ``as_json``
    (a ``--json`` run that fails) also ``{"error": MESSAGE, "code": CODE}`` on stdout, so a
    script reading stdout sees the failure too."""
    line = " ".join(scrub(str(message)).split()) or "unknown error"
    if as_json:
        sys.stdout.write(json.dumps({"error": line, "code": code or "error"}) + "\n")
        sys.stdout.flush()
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


def error_code(exc: BaseException) -> str:
    """A short, stable name for what failed (the ``code`` of a ``--json`` error): the
    supervisor's own code for its errors (``not_found``, ...), else one per exception class
    (``usage``, ``config``, ``auth``, ``connection_lost``, ``timeout``, ``transfer``, ...)."""
    if isinstance(exc, RemoteError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, UsageError):
        return "usage"
    name = type(exc).__name__
    if not any(base.__module__.startswith("jupyter_tether") for base in type(exc).__mro__):
        return "internal"
    name = name.removesuffix("Error") or name
    # CamelCase -> snake_case: ConnectionLost -> connection_lost, LimitExceeded -> ...
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower()
                   for i, c in enumerate(name))


def unwrap(exc: BaseException) -> BaseException:
    # Task groups wrap what failed inside them; the user wants the failure itself.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def one_line(exc: BaseException, target: Target | None = None) -> str:
    """An exception as one line with no credential in it."""
    text = str(exc) or type(exc).__name__
    return " ".join(scrub(text, target.token if target else None).split())


def add_command(subparsers: Any, name: str, func: Callable[[Ctx], int], help_text: str,
                examples: str, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register command ``name`` (handled by ``func``) with its help and examples; the
    caller adds its own arguments to the returned parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help_text, description=help_text, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "))
    parser.set_defaults(func=func)
    return parser
