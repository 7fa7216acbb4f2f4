"""``status``, ``exec``, ``env`` and ``targets``: what the server is and runs, in one go."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import anyio

from .. import AsyncTether, Target, TetherError
from ..config import config_path, describe_targets
from .context import EXIT_ERROR, EXIT_OK, Ctx, UsageError, add_command, error, one_line, unwrap
from .fanout import configured_targets, gather
from .output import escape, new_table, print_mapping, styled

# --- status -----------------------------------------------------------------------------------


def add_status(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "status", cmd_status,
                    "connect and show the server, supervisor and link", """
        jupyter-tether status
        jupyter-tether --json status | jq .rtt_ms
        jupyter-tether status --all          # every named target of the config file
        (--all exits 1 when any target fails)
        """, common)
    p.add_argument("--all", action="store_true",
                   help="connect to every named target of the config file at once and show each")
    p.add_argument("--timeout", type=float, default=20.0,
                   help="with --all: give up on a target after this many seconds "
                   "(default: %(default)s)")


async def _status_report(aio: AsyncTether, timeout: float = 30.0) -> dict[str, Any]:
    return _status_fields(await aio.ping(timeout), await aio.status(), await aio.info(),
                          await aio.jobs.list("running"))


def _status_fields(ping: dict[str, Any], status: dict[str, Any], info: dict[str, Any],
                   jobs: list[Any]) -> dict[str, Any]:
    return {
        "target": status.get("target"), "name": status.get("name") or None,
        "embedded": status.get("embedded"), "connected": status.get("connected"),
        "server_version": ping.get("server_version"), "rtt_ms": ping.get("rtt_ms"),
        "hostname": info.get("hostname"), "python": info.get("python"),
        "root_dir": status.get("root_dir"), "supervisor_kernel": status.get("kernel_id"),
        "supervisor_pid": status.get("supervisor_pid"), "protocol": status.get("protocol"),
        "codec": status.get("codec"), "install": status.get("install"),
        "reconnects": status.get("reconnects"), "running_jobs": len(jobs),
    }


def cmd_status(ctx: Ctx) -> int:
    if ctx.args.all:
        return _status_all(ctx)
    tether = ctx.connect()
    report = _status_fields(tether.ping(), tether.status(), tether.info(),
                            tether.jobs.list("running"))
    if ctx.json:
        ctx.emit_json(report)
    else:
        print_mapping(ctx, report)
    return EXIT_OK


def _status_all(ctx: Ctx) -> int:
    args = ctx.args
    if args.url or args.target:
        raise UsageError("--all shows every named target of the config file: leave out "
                         "--target and --url")
    timeout = args.timeout
    entries = configured_targets()

    async def probe(entry: tuple[str, Target | None, str | None]) -> dict[str, Any]:
        name, target, problem = entry
        row: dict[str, Any] = {"name": name, "target": target.display_url if target else None,
                               "ok": False, "error": problem}
        if target is None:
            return row
        try:
            with anyio.fail_after(timeout):
                async with AsyncTether(target=target) as aio:
                    report = await _status_report(aio, timeout)
            row.update(report, name=name, ok=True)
        except Exception as raised:
            exc = unwrap(raised)
            row["error"] = (f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError)
                            and not isinstance(exc, TetherError) else one_line(exc, target))
        return row

    rows: list[dict[str, Any]] = anyio.run(gather, entries, probe)
    failed = [row["name"] for row in rows if not row["ok"]]
    if ctx.json:
        ctx.emit_json({"config": str(config_path()), "ok": not failed, "targets": rows})
    else:
        table = new_table(ctx, "NAME", "URL", "STATUS", "RTT", "HOST", "RUNNING")
        for row in rows:
            name, url = escape(row["name"]), escape(row["target"] or "-")
            if row["ok"]:
                rtt = f"{row['rtt_ms']:.0f} ms" if row.get("rtt_ms") is not None else "-"
                table.add_row(name, url, styled(ctx, "ok", "green"), rtt,
                              escape(row.get("hostname") or "-"),
                              str(row.get("running_jobs", "-")))
            else:
                table.add_row(name, url, styled(ctx, f"error: {row['error']}", "red"),
                              "-", "-", "-")
        ctx.table(table)
    if failed:
        error(f"{len(failed)} of {len(rows)} targets failed: {', '.join(failed)}")
        return EXIT_ERROR
    return EXIT_OK


# --- exec -------------------------------------------------------------------------------------


def add_exec(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "exec", cmd_exec, "run Python code in the remote work kernel", """
        jupyter-tether exec 'import torch; print(torch.cuda.is_available())'
        jupyter-tether exec -f prepare.py
        echo 'print(1 + 1)' | jupyter-tether exec -
        jupyter-tether exec --json '6 * 7' | jq -r '.results[0].data["text/plain"]'
        (exit status 1 when the code raises)
        """, common)
    p.add_argument("code", nargs="?", help="the code ('-' reads stdin)")
    p.add_argument("-f", "--file", help="run this file's contents ('-' reads stdin)")
    p.add_argument("--kernel", default=None, help="a kernel id (default: the work kernel)")
    p.add_argument("--timeout", type=float, default=None,
                   help="interrupt the code after this many seconds (default: no limit)")


def _read_code(ctx: Ctx) -> str:
    args = ctx.args
    if args.file and args.code:
        raise UsageError("give CODE or -f FILE, not both")
    if args.file == "-" or args.code == "-":
        return sys.stdin.read()
    if args.file:
        try:
            return Path(args.file).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    if args.code is None:
        raise UsageError("nothing to run: give CODE, -f FILE, or - for stdin")
    return str(args.code)


INTERRUPT_TIMEOUT_S = 5.0


async def _interrupt_kernel(aio: AsyncTether, kernel_id: str | None) -> None:
    """Interrupt ``kernel_id``, or the work kernel if one was started (never start one)."""
    with anyio.fail_after(INTERRUPT_TIMEOUT_S):
        kernel = kernel_id or (await aio.status()).get("work_kernel_id")
        if kernel:
            await aio.rest.interrupt_kernel(kernel)


def cmd_exec(ctx: Ctx) -> int:
    code = _read_code(ctx)
    tether = ctx.connect()

    def on_output(kind: str, text: str) -> None:
        # stdout and results to stdout, stderr and tracebacks to stderr, as they arrive.
        stream = sys.stderr if kind in ("stderr", "error") else sys.stdout
        stream.write(text)
        stream.flush()

    try:
        result = tether.exec(code, kernel_id=ctx.args.kernel, timeout=ctx.args.timeout,
                             on_output=None if ctx.json else on_output)
    except KeyboardInterrupt:
        # The kernel keeps running the cell unless told otherwise.
        with contextlib.suppress(Exception):
            tether.portal.call(_interrupt_kernel, tether.aio, ctx.args.kernel)
        raise
    if ctx.json:
        ctx.emit_json(result.to_dict())
    else:
        for path in result.images:
            ctx.note(f"image saved to {path}")
        if result.status == "timeout":
            error(f"timed out after {ctx.args.timeout}s; the kernel was interrupted")
        elif result.status == "aborted":
            error("the kernel aborted the execution")
    return EXIT_OK if result.ok else EXIT_ERROR


# --- env and targets --------------------------------------------------------------------------


def add_env(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "env", cmd_env,
                    "snapshot the remote environment (python, GPUs, torch)", """
        jupyter-tether env
        jupyter-tether --json env | jq .torch
        """, common)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds (default: %(default)s)")


def cmd_env(ctx: Ctx) -> int:
    tether = ctx.connect()
    snap = tether.env_snapshot(ctx.args.timeout)
    if ctx.json:
        ctx.emit_json(snap)
        return EXIT_OK
    print_mapping(ctx, env_summary(snap))
    return EXIT_OK


def _command_text(result: Any, summary: str = "") -> str:
    """One line for a command the snapshot ran (nvidia-smi, nvcc, pip freeze)."""
    if not isinstance(result, dict):
        return "-" if result is None else str(result)
    if not result.get("available"):
        program = (str(result.get("command") or "").split() or ["the command"])[0]
        return f"not available ({program} is not on PATH)"
    if result.get("error"):
        return f"failed: {result['error']}"
    if result.get("returncode") != 0:
        last = (str(result.get("stderr") or "").strip().splitlines() or [""])[-1]
        return f"failed (exit {result.get('returncode')})" + (f": {last}" if last else "")
    return summary or "ok (--json for its output)"


def _torch_text(torch: Any) -> str:
    if not isinstance(torch, dict):
        return "-"
    if not torch.get("importable"):
        return "not importable" + (f": {torch['error']}" if torch.get("error") else "")
    devices = ", ".join(str(d) for d in torch.get("devices") or [])
    return (f"{torch.get('version')} (cuda {torch.get('cuda')}, "
            f"cuda_available={torch.get('cuda_available')}, "
            f"device_count={torch.get('device_count')}" + (f": {devices}" if devices else "")
            + ")")


def env_summary(snap: dict[str, Any]) -> dict[str, str]:
    """The snapshot as one line per field, under the same names as ``--json``: every field
    it has, the long ones (command outputs, package lists) summed up."""
    def lines(key: str) -> list[str]:
        result = snap.get(key)
        out = result.get("stdout") if isinstance(result, dict) else ""
        return str(out or "").strip().splitlines()

    smi = next((" ".join(line.strip("| ").split()) for line in lines("nvidia_smi")
                if "Driver Version" in line), "")
    nvcc = next((line.strip() for line in reversed(lines("nvcc")) if "release" in line), "")
    cuda_env = snap.get("cuda_env") or {}
    shown: dict[str, str] = {}
    for key, value in snap.items():
        if key == "python":
            text = " ".join(str(value or "").split())
        elif key == "cuda_env" and isinstance(value, dict):
            text = "; ".join(f"{k}={v}" for k, v in sorted(cuda_env.items())) or "-"
        elif key == "nvidia_smi":
            text = _command_text(value, smi)
        elif key == "nvidia_smi_list":
            text = _command_text(value, "; ".join(lines(key)) or "no GPUs listed")
        elif key == "nvcc":
            text = _command_text(value, nvcc)
        elif key == "pip_freeze":
            text = _command_text(value, f"{len(lines(key))} packages (--json for the list)")
        elif key == "torch":
            text = _torch_text(value)
        elif isinstance(value, dict | list):
            text = json.dumps(value, default=str)
        else:
            text = "-" if value is None else str(value)
        shown[key] = text
    return shown


def add_targets(subparsers: Any, common: argparse.ArgumentParser) -> None:
    add_command(subparsers, "targets", cmd_targets, "list the named targets of the config file",
                """
        jupyter-tether targets
        """, common)


def cmd_targets(ctx: Ctx) -> int:
    path = config_path()
    rows = describe_targets(path)
    if ctx.json:
        ctx.emit_json({"config": str(path), "targets": rows})
        return EXIT_OK
    ctx.note(f"config: {path}" + ("" if path.exists() else " (does not exist)"))
    if rows:
        table = new_table(ctx, "NAME", "URL", "TOKEN", "DEFAULT")
        for row in rows:
            table.add_row(row["name"], row["url"] or "-", row["token"], "*" if row["default"] else "")
        ctx.table(table)
    return EXIT_OK
