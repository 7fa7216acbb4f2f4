"""``forward``: reach servers on the remote (TensorBoard, Gradio, a model server) at
``http://127.0.0.1:PORT`` here, in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .. import BlockingPortForward, ConfigError, Tether
from ..formatting import human_bytes
from .context import EXIT_OK, Ctx, UsageError, add_command

#: how often the live line is redrawn (a terminal) or printed again when it changed (a pipe)
TTY_REFRESH_S = 0.5
PIPE_REFRESH_S = 10.0


def add_forward(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "forward", cmd_forward,
                    "forward local ports to ports on the remote (in the foreground, Ctrl-C ends)",
                    """
        jupyter-tether forward 6006             # TensorBoard at http://127.0.0.1:6006/
        jupyter-tether forward 8080:7860        # local 8080 -> remote 7860 (Gradio)
        jupyter-tether forward 0:8000 6006      # several at once; 0: any free local port
        jupyter-tether --json forward 6006      # print the URLs as JSON, then keep forwarding
        (listens on 127.0.0.1 only; each connection is carried over the tether's link)
        """, common)
    p.add_argument("ports", nargs="+", metavar="[LOCAL:]REMOTE",
                   help="remote port, with the local port before a colon (default: the same "
                   "port, or any free one when that is taken)")
    p.add_argument("--remote-host", default="127.0.0.1", metavar="HOST",
                   help="connect to HOST from the remote (default: its own loopback; any "
                   "other host needs --allow-remote-host)")
    p.add_argument("--allow-remote-host", action="store_true",
                   help="let --remote-host name a host other than the remote's loopback")


def parse_spec(spec: str) -> tuple[int | None, int]:
    """``"6006"`` -> ``(None, 6006)``; ``"8080:7860"`` -> ``(8080, 7860)``; ``"0:80"`` any."""
    local, sep, remote = spec.rpartition(":")
    try:
        remote_port = int(remote)
        local_port = int(local) if sep else None
    except ValueError:
        raise UsageError(f"{spec!r} is not [LOCAL:]REMOTE (port numbers, e.g. 6006 or "
                         "8080:7860)") from None
    if not 1 <= remote_port <= 65535 or (local_port is not None and not 0 <= local_port <= 65535):
        raise UsageError(f"{spec!r}: ports are 1..65535 (a local 0 means any free port)")
    return local_port, remote_port


def _open(ctx: Ctx, tether: Tether, local: int | None, remote: int) -> BlockingPortForward:
    args = ctx.args
    try:
        return tether.forward(remote, local if local is not None else remote, args.remote_host,
                              allow_remote_host=args.allow_remote_host)
    except ConfigError as exc:
        if local is not None or "already in use" not in str(exc):
            raise
    ctx.note(f"local port {remote} is taken here: using a free one")
    return tether.forward(remote, 0, args.remote_host, allow_remote_host=args.allow_remote_host)


def live_line(rows: list[dict[str, Any]], connected: bool) -> str:
    """One line for all forwards: connections (active/total) and bytes each way."""
    parts = []
    for row in rows:
        part = (f":{row['local_port']} {row['active']}/{row['connections']} conn "
                f"↑{human_bytes(row['bytes_up'])} ↓{human_bytes(row['bytes_down'])}")
        if row["failed"]:
            part += f" {row['failed']} failed"
        parts.append(part)
    state = "" if connected else "  [link down: reconnecting]"
    return " | ".join(parts) + state


def cmd_forward(ctx: Ctx) -> int:
    specs = [parse_spec(spec) for spec in ctx.args.ports]
    tether = ctx.connect()
    forwards: list[BlockingPortForward] = []
    try:
        for local, remote in specs:
            forwards.append(_open(ctx, tether, local, remote))
        if ctx.json:
            ctx.emit_json({"forwards": [f.info() for f in forwards]})
        else:
            for fwd in forwards:
                row = fwd.info()
                ctx.out.print(f"{fwd.url}  ->  remote {row['remote_host']}:{row['remote_port']}",
                              markup=False, highlight=False)
                if fwd.proxy_url:
                    ctx.note(f"  also at {fwd.proxy_url} (the server's jupyter-server-proxy; "
                             "open it with your token)")
                if not fwd.remote_listening:
                    ctx.note(f"  nothing listens on remote port {row['remote_port']} yet: "
                             "connections are refused until something does")
            ctx.note("forwarding; Ctrl-C stops")
        _watch(ctx, tether)
    except KeyboardInterrupt:
        pass
    finally:
        if ctx.tty and not ctx.json:
            sys.stderr.write("\n")
        for fwd in forwards:
            fwd.close()
    return EXIT_OK


def _watch(ctx: Ctx, tether: Tether) -> None:
    """Until Ctrl-C: the live line (redrawn on a terminal, printed on change when piped)."""
    last, last_at = "", 0.0
    while True:
        time.sleep(TTY_REFRESH_S)
        if ctx.json:
            continue
        line = live_line(tether.forwards(), tether.aio.link.connected)
        if ctx.tty:
            sys.stderr.write("\r\x1b[2K" + line)
            sys.stderr.flush()
        elif line != last and time.monotonic() - last_at >= PIPE_REFRESH_S:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            last, last_at = line, time.monotonic()
