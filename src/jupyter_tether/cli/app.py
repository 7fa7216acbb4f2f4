"""The ``jupyter-tether`` parser (global options, every command's sub-parser) and ``main``:
parse, run the command's handler with a ``Ctx``, turn what it raises into an exit code."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from rich.console import Console

from .. import AuthError, ConfigError, TetherError, __version__
from ..config import CONFIG_ENV, config_path, default_root
from ..credentials import TOKEN_ENV, URL_ENV
from ..lean_imports import skip_format_checkers
from . import files, forward, info, jobs, mcp, notebooks, submit, top
from .context import (
    DEBUG_ENV,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Ctx,
    UsageError,
    error,
    error_code,
    unwrap,
)
from .secrets import SECRETS, collect_secrets, remember_secrets, scrub, tokens_in_argv

#: Every command, in the order ``jupyter-tether --help`` lists them: each adds its sub-parser.
COMMANDS: tuple[Callable[[Any, argparse.ArgumentParser], None], ...] = (
    mcp.add_mcp, info.add_status, info.add_exec,
    jobs.add_run, jobs.add_jobs, jobs.add_logs, jobs.add_kill, top.add_top,
    files.add_put, files.add_get, files.add_sync,
    submit.add_submit, submit.add_collect, notebooks.add_nb, forward.add_forward,
    info.add_env, info.add_targets,
)


class _Parser(argparse.ArgumentParser):
    #: ``--json`` was on the command line: a usage error is JSON on stdout too (set by main)
    json_errors = False

    def error(self, message: str) -> NoReturn:
        # One line, like every other error of this command, pointing at --help.
        line = " ".join(scrub(message).split())
        if _Parser.json_errors:
            error(f"{line} (see '{self.prog} --help')", code="usage", as_json=True)
            self.exit(EXIT_USAGE)
        self.exit(EXIT_USAGE, f"error: {line} (see '{self.prog} --help')\n")


class _AppendTarget(argparse.Action):
    """``--target NAME``, repeatable; only ``submit`` accepts more than one (checked in main).

    The names gather on the action itself: ``parents=`` shares this one action between the
    top parser and every subcommand, while a subcommand parses into a fresh namespace whose
    values replace the top parser's, so ``-t a submit SPEC -t b`` would otherwise lose ``a``.
    (``build_parser`` makes a new action for every parse.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names: list[str] = []

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        self.names.append(str(values))
        setattr(namespace, self.dest, list(self.names))


def _common_options() -> argparse.ArgumentParser:
    # SUPPRESS defaults: the options may come before or after the subcommand without the
    # subparser's defaults overwriting values given before it.
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("target and output")
    group.add_argument("--url", default=argparse.SUPPRESS,
                       help=f"Jupyter server URL (default: ${URL_ENV}); a ?token=... in it is used")
    group.add_argument("--token", default=argparse.SUPPRESS,
                       help=f"Jupyter token (default: ${TOKEN_ENV}, which is sent only to "
                       f"${URL_ENV}'s scheme, host and port); prefer the env var")
    group.add_argument("-t", "--target", default=argparse.SUPPRESS, metavar="NAME",
                       action=_AppendTarget,
                       help="a named target from the config file (see `jupyter-tether "
                       "targets`); `submit` takes several")
    group.add_argument("--root", default=argparse.SUPPRESS, metavar="DIR",
                       help="root folder of the embedded local Jupyter server, used when no "
                       f"server is selected (default: {default_root()})")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print machine-readable JSON only (errors too: "
                       '{"error": ..., "code": ...} on stdout, the message on stderr)')
    return common


_TARGETS_HELP = f"""\
which server:
  --target NAME    a [NAME] table (url, token or token_env) in {config_path()}
                   (${CONFIG_ENV} overrides the path; a top-level default = "NAME" applies
                   when nothing else is given)
                   (`status --all` shows every named target; `submit --target A
                   --target B` submits to several)
  --url/--token    a server URL, as copied from the browser or Kaggle's "VSCode URL"
  ${URL_ENV} / ${TOKEN_ENV}   (that token goes only to that URL's scheme, host and port)
  nothing          a local Jupyter server is started for the command, its root a
                   workspace folder ({default_root()}) or --root DIR

exit codes: 0 ok; `run` exits with the job's exit code (128+N if killed by signal N);
  1 remote/connection error or failed exec; 2 usage/config error; 130 Ctrl-C (detached)
"""


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(
        prog="jupyter-tether", parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run work on a remote Jupyter server: code, jobs with live logs, files.",
        epilog="examples:\n"
               "  export REMOTE_JUPYTER_URL='https://host/k/123/eyJ.../proxy'\n"
               "  jupyter-tether status\n"
               "  jupyter-tether run 'python train.py --epochs 3'\n"
               "  jupyter-tether --target kaggle sync ./src work/src --exclude '*.pyc'\n"
               "  jupyter-tether mcp\n\n" + _TARGETS_HELP)
    parser.add_argument("--version", action="version", version=f"jupyter-tether {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(subparsers, common)
    return parser


def _interrupted(as_json: bool) -> None:
    if as_json:
        sys.stdout.write('{"error": "interrupted", "code": "interrupted"}\n')
        sys.stdout.flush()
    sys.stderr.write("interrupted\n")


def main(argv: Sequence[str] | None = None) -> int:
    skip_format_checkers()  # ~1 CPU-s off each `nb edit` (nbformat's validation)
    argv = list(sys.argv[1:] if argv is None else argv)
    SECRETS.clear()
    remember_secrets(*tokens_in_argv(argv))
    _Parser.json_errors = "--json" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("url", "token"):
        setattr(args, name, getattr(args, name, None))
    collect_secrets(args)
    args.targets = list(dict.fromkeys(getattr(args, "target", None) or []))
    args.target = args.targets[0] if len(args.targets) == 1 else None
    args.json = getattr(args, "json", False)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if len(args.targets) > 1 and args.func is not submit.cmd_submit:
        parser.error("--target may be given once (several only for submit)")
    as_json = bool(args.json)
    tty = sys.stdout.isatty()
    ctx = Ctx(args=args, json=args.json, tty=tty,
              out=Console(highlight=False, soft_wrap=not tty, width=None if tty else 512),
              err=Console(stderr=True, highlight=False, soft_wrap=True))
    try:
        try:
            return int(args.func(ctx))
        finally:
            ctx.close()
    except KeyboardInterrupt:
        _interrupted(as_json)
        return EXIT_INTERRUPTED
    except BaseException as raised:
        exc = unwrap(raised)
        if isinstance(exc, KeyboardInterrupt):
            _interrupted(as_json)
            return EXIT_INTERRUPTED
        if isinstance(exc, SystemExit):
            raise exc from None
        if os.environ.get(DEBUG_ENV):
            raise
        code = error_code(exc)
        if isinstance(exc, (UsageError, ConfigError)):
            error(str(exc), code=code, as_json=as_json)
            return EXIT_USAGE
        if isinstance(exc, TetherError):
            hint = ctx.selection.auth_hint() if isinstance(exc, AuthError) and ctx.selection \
                else ""
            error(str(exc) + hint, code=code, as_json=as_json)
            return EXIT_ERROR
        if isinstance(exc, BrokenPipeError):  # `| head` closed the pipe: not our failure
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the exit flush
            return EXIT_OK
        error(f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for a traceback)",
              code=code, as_json=as_json)
        return EXIT_ERROR
