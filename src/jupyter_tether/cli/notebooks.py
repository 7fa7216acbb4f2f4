"""``nb show``, ``nb run`` and ``nb start``: remote notebooks from the command line."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from ..formatting import strip_ansi
from .context import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, Ctx, UsageError, add_command
from .jobs import follow_job

_POLL_S = 2.0


def add_nb(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "nb", _cmd_missing, "read, run and start remote notebooks", """
        jupyter-tether nb show analysis.ipynb --limit 5
        jupyter-tether nb run analysis.ipynb                   (every code cell, in order)
        jupyter-tether nb run analysis.ipynb --cell 3 --cell a1b2c3
        jupyter-tether nb start train.ipynb -p epochs=3 -p lr=0.01 --output out.ipynb -f
        (run exits 1 when a cell fails; start -f follows the job and exits with its code)
        """, common)
    sub = p.add_subparsers(dest="nb_command", metavar="{show,run,start}")
    show = sub.add_parser("show", parents=[common], help="print a notebook's cells")
    show.add_argument("path", help="the notebook (relative to the server root)")
    show.add_argument("--start", type=int, default=0, help="first cell index (default 0)")
    show.add_argument("--limit", type=int, default=50, help="cells to show (default 50)")
    show.add_argument("--outputs", choices=("brief", "full", "none"), default="brief")
    show.set_defaults(func=cmd_show)
    run = sub.add_parser("run", parents=[common], help="run cells, writing outputs back")
    run.add_argument("path")
    run.add_argument("--cell", action="append", default=None,
                     help="a cell id or index to run (repeatable; default: every code cell)")
    run.add_argument("--kernel", default=None,
                     help="auto (default), session, notebook, work, or a kernel id")
    run.add_argument("--keep-going", action="store_true", help="do not stop at a failing cell")
    run.add_argument("--force", action="store_true",
                     help="write outputs even where real-time collaboration runs")
    run.set_defaults(func=cmd_run)
    start = sub.add_parser("start", parents=[common], help="run a whole notebook as a job")
    start.add_argument("path")
    start.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a parameter (the value is JSON when it parses, else a string)")
    start.add_argument("--output", default=None, help="output notebook (default: the notebook)")
    start.add_argument("--allow-errors", action="store_true", help="run on past failing cells")
    start.add_argument("--force", action="store_true",
                       help="write even where real-time collaboration runs")
    start.add_argument("-f", "--follow", action="store_true", help="follow the job's log")
    start.set_defaults(func=cmd_start)


def _cmd_missing(ctx: Ctx) -> int:
    raise UsageError("nb needs a subcommand: show, run or start")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """Remote text for a terminal: colour and cursor sequences dropped, a line redrawn with
    ``\\r`` (a progress bar) as it ends up, other control characters (an OSC that writes the
    clipboard or the title) shown as ``\\x1b``, never sent."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", _redrawn(strip_ansi(text)))


def _redrawn(text: str) -> str:
    """Each line as a terminal ends up showing it: what follows its last ``\\r``."""
    if "\r" not in text:
        return text
    return "\n".join(next((part for part in reversed(line.split("\r")) if part), "")
                     for line in text.split("\n"))


def _cell_lines(cell: dict[str, Any]) -> list[str]:
    """A cell (from a read or a run) as lines to print, every one safe for a terminal."""
    return [_printable(line) for line in _raw_cell_lines(cell)]


def _raw_cell_lines(cell: dict[str, Any]) -> list[str]:
    head = f"[{cell['index']}] {cell.get('cell_type', 'code')}"
    if cell.get("id"):
        head += f" id={cell['id']}"
    if cell.get("execution_count") is not None:
        head += f" In [{cell['execution_count']}]"
    if cell.get("status"):
        head += f" {cell['status']}"
        if cell.get("duration_s") is not None:
            head += f" in {cell['duration_s']:.2f}s"
    lines = [head]
    if "source" in cell:
        lines += ["    " + line for line in str(cell["source"]).splitlines()]
    for output in cell.get("outputs", []):
        lines += ["  | " + line for line in _redrawn(_output_text(output)).splitlines()]
    return lines


def _output_text(output: dict[str, Any]) -> str:
    kind = output.get("type")
    if kind == "stream":
        return str(output.get("text", ""))
    if kind == "error":
        return "\n".join(output.get("traceback") or []) or \
            f"{output.get('ename')}: {output.get('evalue')}"
    data = output.get("data") or {}
    parts = []
    for mime, value in data.items():
        if isinstance(value, dict) and value.get("saved_to"):
            parts.append(f"[{mime} saved to {value['saved_to']}]")
        elif mime == "text/plain":
            parts.append(str(value))
    return "\n".join(parts) or f"[{kind}]"


def cmd_show(ctx: Ctx) -> int:
    args = ctx.args
    result = ctx.connect().notebooks.read(args.path, start=args.start, limit=args.limit,
                                          outputs=args.outputs)
    if ctx.json:
        ctx.emit_json(result)
        return EXIT_OK
    shown = len(result["cells"])
    ctx.note(f"{result['path']}: {result['n_cells']} cells (showing {shown} from "
             f"{result['start']}), revision {result['revision']}")
    for cell in result["cells"]:
        ctx.out.print("\n".join(_cell_lines(cell)), markup=False, highlight=False)
    return EXIT_OK


def cmd_run(ctx: Ctx) -> int:
    args = ctx.args
    notebooks = ctx.connect().notebooks
    cells: Any = [int(c) if c.lstrip("-").isdigit() else c for c in args.cell] \
        if args.cell else "all"
    result = notebooks.run(args.path, cells, kernel=args.kernel, timeout=_POLL_S,
                           stop_on_error=not args.keep_going, force=args.force)
    printed: set[str] = set()
    try:
        while True:
            if not ctx.json:
                for cell in result["cells"]:
                    if cell["id"] not in printed and cell["status"] != "running":
                        printed.add(cell["id"])
                        ctx.out.print("\n".join(_cell_lines(cell)), markup=False,
                                      highlight=False)
            if result["status"] != "running":
                break
            result = notebooks.wait(result["run_id"], timeout=_POLL_S)
    except KeyboardInterrupt:
        notebooks.cancel(result["run_id"])
        ctx.err.print("interrupted: the kernel was interrupted and the run stopped",
                      markup=False, highlight=False)
        return EXIT_INTERRUPTED
    if ctx.json:
        ctx.emit_json(result)
    else:
        for key in ("problem", "write_error"):
            if result.get(key):
                ctx.err.print(_printable(f"{key.replace('_', ' ')}: {result[key]}"),
                              markup=False, highlight=False)
        ctx.note(f"[{result['status']}: {result['cells_done']}/{result['cells_total']} cells "
                 f"in kernel {_printable(str(result['kernel_id']))} ({result['kernel']})]")
    return EXIT_OK if result["status"] == "ok" else EXIT_ERROR


def _parameters(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip().isidentifier():
            raise UsageError(f"-p {pair!r}: give NAME=VALUE with a Python identifier as NAME")
        try:
            params[name.strip()] = json.loads(raw)
        except ValueError:
            params[name.strip()] = raw
    return params


def cmd_start(ctx: Ctx) -> int:
    args = ctx.args
    params = _parameters(args.param)
    job = ctx.connect().notebooks.start(args.path, parameters=params, output=args.output,
                                        allow_errors=args.allow_errors, force=args.force)
    if args.follow:
        return follow_job(ctx, job)
    if ctx.json:
        ctx.emit_json({"job_id": job.job_id, "output": args.output or args.path,
                       **(job.info.to_dict() if job.info else {})})
    else:
        ctx.out.print(job.job_id, markup=False, highlight=False)
        ctx.note("follow it with: " + ctx.again(f"logs {job.job_id} -f"))
    return EXIT_OK
