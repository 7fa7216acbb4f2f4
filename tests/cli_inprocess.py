"""Run ``jupyter-tether`` inside the test process, as the console script would run it.

A subprocess costs ~0.2 CPU-s of imports before the command does anything, and the CLI tests
make ~90 calls: on this 2-core CI machine that was ~8% of the whole suite. ``cli.main`` is what
the console script calls, so here it runs with the call's own environment, working folder,
stdin (empty), stdout and stderr (binary-backed, not terminals: a pipe, as under
``subprocess.run``), and its text is decoded as ``subprocess.run(text=True)`` decodes it.

What only a real process shows stays a subprocess in the tests that check it: the console
script and ``python -m`` entry points, signals (Ctrl-C), what other processes can see in argv
and the environment, and ``jupyter-tether mcp``.
"""

from __future__ import annotations

import io
import locale
import os
import subprocess
import sys
from pathlib import Path

from jupyter_tether import cli


def _decoded(data: bytes) -> str:
    # subprocess.run(text=True): the locale's encoding, universal newlines.
    return io.TextIOWrapper(io.BytesIO(data), encoding=locale.getpreferredencoding(False)).read()


def run_cli(argv: list[str], env: dict[str, str],
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``jupyter-tether *argv`` in this process; the result reads like ``subprocess.run``'s."""
    streams = sys.stdin, sys.stdout, sys.stderr
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.BytesIO(), io.BytesIO()
    sys.stdin = io.TextIOWrapper(io.BytesIO(b""))
    sys.stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    os.environ.clear()
    os.environ.update(env)
    try:
        if cwd is not None:
            os.chdir(cwd)
        try:
            code = cli.main(argv)
        except SystemExit as exited:  # argparse's usage errors and --help
            code = exited.code if isinstance(exited.code, int) else int(exited.code is not None)
            if isinstance(exited.code, str):
                sys.stderr.write(exited.code + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        return subprocess.CompletedProcess(["jupyter-tether", *argv], code,
                                           _decoded(out.getvalue()), _decoded(err.getvalue()))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.stdin, sys.stdout, sys.stderr = streams
