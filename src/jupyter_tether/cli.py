"""The ``jupyter-tether`` command (also ``jupyter tether``, which jupyter_core dispatches to it).

Exit codes: 0 ok; ``run`` (and ``submit --follow``) exit with the job's own exit code
(128+N when a signal ended it); 1 remote or connection errors, and a failed ``exec``;
2 usage and configuration errors; 130 when Ctrl-C detaches from (or interrupts) the work.
Errors are one ``error: ...`` line on stderr; ``--json`` puts only JSON on stdout.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import datetime as dt
import functools
import json
import os
import shlex
import signal as signals
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import anyio
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from . import __version__
from .config import (
    AUTH_TOKEN_ENV,
    CONFIG_ENV,
    Selection,
    config_path,
    describe_targets,
    named_targets,
    resolve_auth_token,
    select_target,
    target_from_config,
)
from .controller import submit as submit_mod
from .controller.blocking import Tether
from .controller.blocking_services import (
    Files,
    Job,
    Jobs,
    ProgressCallback,
    human_bytes,
    job_duration,
    run_on_portal,
)
from .controller.files import DEFAULT_SYNC_MAX_BYTES
from .controller.jobs import JobInfo
from .controller.target import (
    MIN_SECRET,
    TOKEN_ENV,
    URL_ENV,
    Target,
    parse_target,
    scrub_secrets,
)
from .controller.tether import AsyncTether
from .errors import AuthError, ConfigError, NotFound, TetherError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "JUPYTER_TETHER_DEBUG"


class UsageError(Exception):
    """A problem with the command line itself (exit 2)."""


# --- secrets ----------------------------------------------------------------------------------

#: Tokens this command knows (``--token``, a token in ``--url``, the config's targets): no
#: line it prints may show them. Filled by ``main``; ``REMOTE_JUPYTER_TOKEN`` is read live.
_SECRETS: set[str] = set()
_MIN_SECRET = MIN_SECRET


def _remember_secrets(*tokens: str | None) -> None:
    _SECRETS.update(t for t in tokens if t and len(t) >= _MIN_SECRET)


def scrub(text: str, *tokens: str | None) -> str:
    """``text`` with no credential in it: URL tokens redacted and every known token -> ***."""
    return scrub_secrets(text, {*_SECRETS, os.environ.get(TOKEN_ENV, ""),
                                os.environ.get(AUTH_TOKEN_ENV, ""), *(t or "" for t in tokens)})


def _tokens_in_argv(argv: Sequence[str]) -> list[str]:
    """``--token``/``--auth-token`` values, before argparse runs (its usage errors may quote
    them)."""
    found = []
    for index, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        # argparse takes unambiguous prefixes of either option
        if len(name) >= 4 and any(option.startswith(name)
                                  for option in ("--token", "--auth-token")):
            if eq:
                found.append(value)
            elif index + 1 < len(argv):
                found.append(argv[index + 1])
    return found


def _collect_secrets(args: argparse.Namespace) -> None:
    """Every token this command may hold: --token, --url's, and each configured target's."""
    _remember_secrets(args.token)
    if args.url:
        with contextlib.suppress(Exception):
            _remember_secrets(parse_target(args.url, args.token).token)
    with contextlib.suppress(Exception):  # a broken config is reported where it is used
        path = config_path()
        for name in named_targets(path):
            with contextlib.suppress(Exception):
                _remember_secrets(target_from_config(name, path).token)


# --- output helpers ---------------------------------------------------------------------------


@dataclass
class Ctx:
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
        sys.stdout.write(json.dumps(value, indent=2, default=_json_default) + "\n")
        sys.stdout.flush()

    def connect(self) -> Tether:
        if self._tether is None:
            self.selection = select_target(self.args.url, self.args.token, self.args.target)
            if self.selection.target is None:
                self.note(f"no --target, --url or ${URL_ENV}: starting a local Jupyter server "
                          f"in {Path.cwd()}")
                self._tether = Tether()
            else:
                _remember_secrets(self.selection.target.token)
                self._tether = Tether(target=self.selection.target)
        return self._tether

    def again(self, command: str) -> str:
        """A command line that reaches the same server (with no secret in it)."""
        extra = self.selection.cli_args() if self.selection else ""
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


def _json_default(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _table(ctx: Ctx, *columns: str) -> Table:
    # Plain aligned columns (no box drawing) when piped, so grep/awk see clean text.
    table = Table(box=box.SIMPLE_HEAD if ctx.tty else None, show_edge=False, pad_edge=False,
                  header_style="bold" if ctx.tty else "")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _escape(text: str) -> str:
    """Text for a rich table cell, shown as is (no markup)."""
    return text.replace("[", r"\[")


def _styled(ctx: Ctx, text: str, colour: str) -> str:
    return f"[{colour}]{_escape(text)}[/]" if ctx.tty else _escape(text)


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    stamp = dt.datetime.fromtimestamp(epoch)
    if stamp.date() == dt.date.today():
        return stamp.strftime("%H:%M:%S")
    return stamp.strftime("%Y-%m-%d %H:%M")


def _print_mapping(ctx: Ctx, mapping: dict[str, Any], title: str = "") -> None:
    """A result dict as aligned ``key  value`` lines; lists shown as counts (use --json)."""
    table = _table(ctx, "", "")
    table.show_header = False
    for key, value in mapping.items():
        if isinstance(value, list):
            shown = ", ".join(str(v) for v in value[:5]) + (" ..." if len(value) > 5 else "")
            text = f"{len(value)}" + (f": {shown}" if value else "")
        elif isinstance(value, dict):
            text = json.dumps(value, default=_json_default)
        else:
            text = "-" if value is None else str(value)
        table.add_row(key, text)
    if title:
        ctx.out.print(title, markup=False, highlight=False)
    ctx.table(table)


@contextlib.contextmanager
def transfer_progress(ctx: Ctx, label: str) -> Iterator[ProgressCallback | None]:
    """A rich bar (bytes, rate, ETA) when on a terminal; nothing when piped or --json."""
    with phase_progress(ctx) as progress:
        if progress is None:
            yield None
        else:
            # Called on the portal's loop thread; rich's Progress is thread-safe.
            yield lambda done, total: progress(label, done, total)


def _job_exit_code(info: JobInfo) -> int:
    """What a shell would report: the exit code, or 128+N for a job ended by signal N."""
    if info.signal:
        return 128 + int(info.signal)
    if info.exit_code is None:
        return EXIT_ERROR
    if info.exit_code < 0:
        return 128 - info.exit_code
    return min(int(info.exit_code), 255)


def _job_row(info: JobInfo) -> dict[str, Any]:
    row = info.to_dict()
    row["duration_s"] = (round((info.ended_at or time.time()) - info.started_at, 3)
                         if info.started_at else None)
    return row


def _stream_chunks(chunks: Iterator[bytes]) -> None:
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
        out.flush()


# --- commands ---------------------------------------------------------------------------------


async def _status_report(aio: AsyncTether, timeout: float = 30.0) -> dict[str, Any]:
    ping = await aio.ping(timeout)
    status = await aio.status()
    info = await aio.info()
    jobs = await aio.jobs.list("running")
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
    report: dict[str, Any] = run_on_portal(tether.portal,
                                           functools.partial(_status_report, tether.aio))
    if ctx.json:
        ctx.emit_json(report)
    else:
        _print_mapping(ctx, report)
    return EXIT_OK


def _one_line(exc: BaseException, target: Target | None = None) -> str:
    """An exception as one line with no credential in it."""
    text = str(exc) or type(exc).__name__
    return " ".join(scrub(text, target.token if target else None).split())


def _configured_targets(names: Sequence[str] | None = None
                        ) -> list[tuple[str, Target | None, str | None]]:
    """``(name, target, error)`` for the given names (default: every named target).

    An entry that cannot be used (no url, its token env var unset) keeps its error, so one
    bad entry does not hide the others; a name that is not in the file is a usage error.
    """
    path = config_path()
    known = named_targets(path)
    if names is None:
        names = list(known)
        if not names:
            raise ConfigError(f"no named targets in {path}: add [NAME] tables with a url "
                              "(see `jupyter-tether targets --help`)")
    rows: list[tuple[str, Target | None, str | None]] = []
    for name in names:
        if name not in known:
            target_from_config(name, path)  # raises the "no target named ..." error
        try:
            rows.append((name, target_from_config(name, path), None))
        except ConfigError as exc:
            rows.append((name, None, _one_line(exc)))
    return rows


async def _gather(items: Sequence[Any], work: Callable[[Any], Any]) -> list[Any]:
    """``await work(item)`` for every item at once; results in the items' order."""
    results: list[Any] = [None] * len(items)

    async def one(index: int) -> None:
        results[index] = await work(items[index])

    async with anyio.create_task_group() as group:
        for index in range(len(items)):
            group.start_soon(one, index)
    return results


def _status_all(ctx: Ctx) -> int:
    args = ctx.args
    if args.url or args.target:
        raise UsageError("--all shows every named target of the config file: leave out "
                         "--target and --url")
    timeout = args.timeout
    entries = _configured_targets()

    async def probe(entry: tuple[str, Target | None, str | None]) -> dict[str, Any]:
        name, target, error = entry
        row: dict[str, Any] = {"name": name, "target": target.display_url if target else None,
                               "ok": False, "error": error}
        if target is None:
            return row
        try:
            with anyio.fail_after(timeout):
                async with AsyncTether(target=target) as aio:
                    report = await _status_report(aio, timeout)
            row.update(report, name=name, ok=True)
        except Exception as raised:
            exc = _unwrap(raised)
            row["error"] = (f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError)
                            and not isinstance(exc, TetherError) else _one_line(exc, target))
        return row

    rows: list[dict[str, Any]] = anyio.run(_gather, entries, probe)
    failed = [row["name"] for row in rows if not row["ok"]]
    if ctx.json:
        ctx.emit_json({"config": str(config_path()), "ok": not failed, "targets": rows})
    else:
        table = _table(ctx, "NAME", "URL", "STATUS", "RTT", "HOST", "RUNNING")
        for row in rows:
            name, url = _escape(row["name"]), _escape(row["target"] or "-")
            if row["ok"]:
                rtt = f"{row['rtt_ms']:.0f} ms" if row.get("rtt_ms") is not None else "-"
                table.add_row(name, url, _styled(ctx, "ok", "green"), rtt,
                              _escape(row.get("hostname") or "-"),
                              str(row.get("running_jobs", "-")))
            else:
                table.add_row(name, url, _styled(ctx, f"error: {row['error']}", "red"),
                              "-", "-", "-")
        ctx.table(table)
    if failed:
        _error(f"{len(failed)} of {len(rows)} targets failed: {', '.join(failed)}")
        return EXIT_ERROR
    return EXIT_OK


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

    call = functools.partial(tether.aio.exec, code, kernel_id=ctx.args.kernel,
                             timeout=ctx.args.timeout,
                             on_output=None if ctx.json else on_output)
    try:
        result = run_on_portal(tether.portal, call)
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
            _error(f"timed out after {ctx.args.timeout}s; the kernel was interrupted")
        elif result.status == "aborted":
            _error("the kernel aborted the execution")
    return EXIT_OK if result.ok else EXIT_ERROR


def _command_string(parts: Sequence[str]) -> str:
    parts = list(parts)
    if parts and parts[0] == "--":
        parts = parts[1:]
    if not parts:
        raise UsageError("no command given")
    # One argument is a shell string ("make && ./train"); several are an argv to quote.
    return parts[0] if len(parts) == 1 else shlex.join(parts)


def _env_pairs(pairs: Sequence[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--env wants NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def _follow_job(ctx: Ctx, job: Job, offset: int = 0) -> int:
    """Stream a job's log until it ends, then exit with its code; Ctrl-C only detaches."""
    try:
        if ctx.json:
            info = job.wait()
        else:
            with job.follow(offset) as chunks:
                _stream_chunks(chunks)
            info = job.wait()
    except KeyboardInterrupt:
        ctx.err.print(f"\ndetached: job {job.job_id} keeps running. Re-attach with:\n  "
                      + ctx.again(f"logs {job.job_id} -f"), markup=False, highlight=False)
        return EXIT_INTERRUPTED
    code = _job_exit_code(info)
    if ctx.json:
        ctx.emit_json({**_job_row(info), "log_tail": job.tail(50), "exit_status": code})
    elif info.state == "lost":
        _error(f"job {job.job_id} was lost: its process is gone and no exit code was recorded")
    elif code != 0:
        ctx.note(f"[job {job.job_id} {info.state}: exit status {code}]")
    return code


def cmd_run(ctx: Ctx) -> int:
    args = ctx.args
    command = _command_string(args.command)
    env = _env_pairs(args.env)
    tether = ctx.connect()
    job = Jobs(tether.portal, tether.aio.jobs).start(command, cwd=args.cwd, env=env,
                                                     log_path=args.log, name=args.name,
                                                     idempotency_key=args.idempotency_key)
    if args.detach:
        if ctx.json:
            ctx.emit_json(job.info.to_dict() if job.info else {"job_id": job.job_id})
        else:
            ctx.out.print(job.job_id, markup=False, highlight=False)
            ctx.note("follow it with: " + ctx.again(f"logs {job.job_id} -f"))
        return EXIT_OK
    ctx.note(f"job {job.job_id} started; Ctrl-C detaches (the job keeps running)")
    return _follow_job(ctx, job)


def cmd_jobs(ctx: Ctx) -> int:
    tether = ctx.connect()
    infos = Jobs(tether.portal, tether.aio.jobs).list(state=ctx.args.state)
    infos.sort(key=lambda i: i.started_at or 0)
    if ctx.json:
        ctx.emit_json([_job_row(i) for i in infos])
        return EXIT_OK
    if not infos:
        ctx.note("no jobs")
        return EXIT_OK
    table = _table(ctx, "JOB", "STATE", "EXIT", "STARTED", "TIME", "COMMAND")
    colours = {"running": "cyan", "exited": "green", "killed": "yellow", "lost": "red"}
    for info in infos:
        state = info.state
        if ctx.tty:
            colour = "red" if state == "exited" and info.exit_code else colours.get(state, "")
            state = f"[{colour}]{state}[/]" if colour else state
        exit_text = "-" if info.state == "running" else (
            f"sig {info.signal}" if info.signal else str(info.exit_code))
        command = info.command if len(info.command) <= 60 else info.command[:57] + "..."
        table.add_row(info.job_id, state, exit_text, _when(info.started_at),
                      job_duration(info) or "-", command.replace("[", r"\["))
    ctx.table(table)
    return EXIT_OK


def cmd_logs(ctx: Ctx) -> int:
    args = ctx.args
    tether = ctx.connect()
    job = Jobs(tether.portal, tether.aio.jobs).get(args.job)
    info = job.status()  # raises NotFound for an unknown job before anything else
    if args.lines is not None and args.lines < 0:
        raise UsageError("-n wants a number of lines >= 0")
    if args.follow:
        offset = 0
        if args.lines is not None:
            # Exactly the last N lines up to a known offset, then follow from that offset.
            offset = info.bytes_written
            start = max(0, offset - 1024 * 1024)
            data = job.read(start, offset - start)[0] if offset > start else b""
            lines = data.splitlines(keepends=True)
            tail = b"".join(lines[-args.lines:]) if args.lines else b""
            if ctx.json:
                ctx.emit_json({"job_id": job.job_id, "data": tail.decode("utf-8", "replace")})
            else:
                sys.stdout.buffer.write(tail)
                sys.stdout.buffer.flush()
        return _follow_logs(ctx, job, offset)
    if args.lines is not None:
        text = job.tail(args.lines) if args.lines else ""
    elif ctx.json:
        text = _read_all(job, info.bytes_written)
    else:
        # The log as it is now, chunk by chunk: never all of it in memory, bytes as written.
        _stream_chunks(_log_chunks(job, info.bytes_written))
        return EXIT_OK
    if ctx.json:
        ctx.emit_json({"job_id": job.job_id, "state": info.state, "exit_code": info.exit_code,
                       "log": text})
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return EXIT_OK


def _log_chunks(job: Job, size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of a job's log (at least), one read at a time."""
    offset = 0
    while offset < size:
        data, offset = job.read(offset)
        if not data:
            break
        yield data


def _read_all(job: Job, size: int) -> str:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts = [decoder.decode(data) for data in _log_chunks(job, size)]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def _follow_logs(ctx: Ctx, job: Job, offset: int) -> int:
    try:
        with job.follow(offset) as chunks:
            if ctx.json:  # JSON lines: one object per chunk, then the final state
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                for chunk in chunks:
                    text = decoder.decode(chunk)
                    if text:
                        sys.stdout.write(json.dumps({"job_id": job.job_id, "data": text}) + "\n")
                        sys.stdout.flush()
            else:
                _stream_chunks(chunks)
        info = job.wait()
    except KeyboardInterrupt:
        ctx.note(f"\nstopped following; job {job.job_id} is not affected")
        return EXIT_INTERRUPTED
    if ctx.json:
        sys.stdout.write(json.dumps({"job": _job_row(info)}, default=_json_default) + "\n")
    else:
        ctx.note(f"[job {job.job_id} {info.state}, exit status {_job_exit_code(info)}]")
    return EXIT_OK


def _parse_signal(value: str) -> int:
    text = value.strip().upper()
    if text.isdigit():
        return int(text)
    name = text if text.startswith("SIG") else "SIG" + text
    try:
        return int(signals.Signals[name])
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown signal {value!r}") from None


def cmd_kill(ctx: Ctx) -> int:
    tether = ctx.connect()
    job = Jobs(tether.portal, tether.aio.jobs).get(ctx.args.job)
    info = job.kill(signal=ctx.args.signal, grace=ctx.args.grace)
    if ctx.json:
        ctx.emit_json(_job_row(info))
    else:
        ctx.out.print(f"job {info.job_id}: {info.state}"
                      + (f" (exit status {_job_exit_code(info)})" if info.done else ""),
                      markup=False, highlight=False)
    return EXIT_OK


def _files(ctx: Ctx) -> Files:
    tether = ctx.connect()
    return Files(tether.portal, tether.aio.files)


def _rate(size: int, seconds: float) -> str:
    return f", {human_bytes(size / seconds)}/s" if seconds > 0 else ""


def _report_transfer(ctx: Ctx, verb: str, source: str, dest: str, result: Any) -> None:
    data: dict[str, Any] = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    if ctx.json:
        ctx.emit_json(data)
        return
    size, seconds = int(data.get("bytes") or 0), float(data.get("seconds") or 0.0)
    line = f"{verb} {source} -> {dest}: "
    if "uploaded" in data:  # a sync
        line += (f"{data['uploaded']} files sent ({human_bytes(size)}), "
                 f"{data.get('unchanged', 0)} unchanged, {data.get('deleted', 0)} deleted")
        skipped = data.get("skipped") or []
        if skipped:
            line += f", {len(skipped)} skipped (links or special files; see --json)"
    elif "files" in data:  # a directory download
        line += f"{data['files']} files, {human_bytes(size)}"
    else:
        line += human_bytes(size)
        if data.get("resumed_bytes"):
            line += f" (resumed after {human_bytes(data['resumed_bytes'])})"
    line += f" in {seconds:.2f}s{_rate(size, seconds)}"
    ctx.out.print(line, markup=False, highlight=False)


def _parse_size(value: str) -> int | None:
    """``200M``, ``2G``, ``5000`` (bytes); ``0`` or ``none`` lifts the limit."""
    text = value.strip().lower()
    if text in ("0", "none", "unlimited"):
        return None
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        return int(float(number.removesuffix("i")) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (like 500M or 2G)") from None


def cmd_put(ctx: Ctx) -> int:
    local = Path(ctx.args.local)
    if not local.exists():
        raise UsageError(f"{local}: no such file or directory")
    files = _files(ctx)
    with transfer_progress(ctx, f"put {local.name}") as progress:
        if local.is_dir():  # a directory goes up as a (delta) sync
            result: Any = files.sync(local, ctx.args.remote, max_bytes=ctx.args.max_bytes,
                                     progress=progress or False)
        else:
            result = files.upload(local, ctx.args.remote, progress=progress or False)
    _report_transfer(ctx, "uploaded", str(local), ctx.args.remote, result)
    return EXIT_OK


def _remote_is_dir(files: Files, remote: str) -> bool:
    info = files.stat(remote)
    if not info.get("exists"):
        raise NotFound("not_found", f"no such remote file or directory: {info.get('path', remote)}")
    kind = info.get("target_type") if info.get("type") == "symlink" else info.get("type")
    return kind == "directory"


def cmd_get(ctx: Ctx) -> int:
    files = _files(ctx)
    remote, local = ctx.args.remote, Path(ctx.args.local)
    is_dir = _remote_is_dir(files, remote)
    if not is_dir and local.is_dir():
        local = local / Path(remote.rstrip("/")).name  # like cp: into an existing directory
    with transfer_progress(ctx, f"get {Path(remote).name}") as progress:
        if is_dir:
            result: Any = files.download_dir(remote, local, progress=progress or False)
        else:
            result = files.download(remote, local, progress=progress or False)
    _report_transfer(ctx, "downloaded", remote, str(local), result)
    return EXIT_OK


def cmd_sync(ctx: Ctx) -> int:
    local = Path(ctx.args.local_dir)
    if not local.is_dir():
        raise UsageError(f"{local}: not a directory")
    files = _files(ctx)
    with transfer_progress(ctx, f"sync {local.name or local}") as progress:
        result = files.sync(local, ctx.args.remote_dir, exclude=ctx.args.exclude or None,
                            delete=ctx.args.delete, max_bytes=ctx.args.max_bytes,
                            gitignore=not ctx.args.no_gitignore, progress=progress or False,
                            dry_run=ctx.args.dry_run,
                            allow_root_delete=ctx.args.allow_root_delete)
    if result.get("dry_run"):
        return _report_dry_run(ctx, str(local), result)
    _report_transfer(ctx, "synced", str(local), ctx.args.remote_dir, result)
    return EXIT_OK


def _report_dry_run(ctx: Ctx, local: str, result: dict[str, Any]) -> int:
    """What a sync would do; exit 1 when a real run would refuse."""
    if ctx.json:
        ctx.emit_json(result)
    else:
        lines = [f"dry run: sync {local} -> {result.get('remote_dir')} would send "
                 f"{result.get('would_upload', 0)} files "
                 f"({human_bytes(int(result.get('would_upload_bytes') or 0))}) and delete "
                 f"{result.get('would_delete', 0)}; nothing was changed"]
        lines += [f"  send   {p}" for p in result.get("would_upload_paths", [])]
        lines += [f"  delete {p}" for p in result.get("would_delete_paths", [])]
        ctx.out.print("\n".join(lines), markup=False, highlight=False)
    for reason in result.get("would_refuse", []):
        _error(f"a real run would refuse: {reason}")
    return EXIT_ERROR if result.get("would_refuse") else EXIT_OK


def _load_spec(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0]
        raise UsageError(f"{path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {reason}") \
            from None
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: a job spec must be a mapping (JSON object / YAML dict)")
    return spec


@contextlib.contextmanager
def phase_progress(ctx: Ctx) -> Iterator[Callable[[str, int, int], None] | None]:
    """One bar for multi-step work (submit, collect): ``progress(phase, done, total)``."""
    if ctx.json or not ctx.tty or not ctx.err.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=ctx.err, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=None)
            progress.update(tasks[phase], completed=done, total=total or None)

        yield update


def _collect_dir(name: str) -> str:
    return f"results/{name}"


def cmd_submit(ctx: Ctx) -> int:
    spec = _load_spec(Path(ctx.args.spec))
    if len(ctx.args.targets) > 1:
        if ctx.args.dry_run:
            raise UsageError("--dry-run takes one --target: dry-run the spec on each in turn")
        return _submit_many(ctx, spec)
    tether = ctx.connect()
    with phase_progress(ctx) as progress:
        result: dict[str, Any] = run_on_portal(
            tether.portal,
            functools.partial(submit_mod.submit, tether.aio, spec, progress=progress,
                              dry_run=ctx.args.dry_run))
    if result.get("dry_run"):
        if ctx.json:
            ctx.emit_json(result)
        else:
            for item in result.get("sync", []):
                _report_dry_run(ctx, str(item.get("local_dir")), {**item, "would_refuse": []})
            ctx.note("dry run: nothing was synced, bootstrapped or started")
        for reason in result.get("would_refuse", []):
            _error(f"a real submit would refuse: {reason}")
        return EXIT_ERROR if result.get("would_refuse") else EXIT_OK
    job_id = result.get("job_id")
    if ctx.args.follow and job_id:
        if not ctx.json:
            if result.get("reused"):
                ctx.note(f"an identical submit already started job {job_id}: following it")
            ctx.note(f"job {job_id} submitted; Ctrl-C detaches (the job keeps running)")
        return _follow_job(ctx, Jobs(tether.portal, tether.aio.jobs).get(str(job_id)))
    if ctx.json:
        ctx.emit_json(result)
    else:
        _print_mapping(ctx, {k: v for k, v in result.items() if k not in ("job", "error")})
        if job_id:
            ctx.note("follow it with: " + ctx.again(f"logs {job_id} -f"))
            if result.get("artifacts"):
                ctx.note("collect its artifacts with: " + ctx.again(f"collect {job_id} results"))
    if not result.get("ok", True):
        _error(result.get("error") or "the submit failed")
        return EXIT_ERROR
    return EXIT_OK


def _submit_many(ctx: Ctx, spec: dict[str, Any]) -> int:
    """The same spec to several named targets at once: a job on each, collected from each."""
    args = ctx.args
    if args.url:
        raise UsageError("several --target names and --url do not mix")
    if args.follow:
        raise UsageError("--follow follows one job: with several --target names, follow each "
                         "job with `jupyter-tether --target NAME logs JOB -f`")
    submit_mod.validate_spec(spec)  # a bad spec is refused before anything is sent anywhere
    entries = _configured_targets(args.targets)

    async def one(entry: tuple[str, Target | None, str | None]) -> dict[str, Any]:
        name, target, error = entry
        row: dict[str, Any] = {"target": name, "ok": False, "job_id": None, "error": error}
        if target is None:
            return row
        try:
            async with AsyncTether(target=target) as aio:
                result = await submit_mod.submit(aio, spec)
        except Exception as raised:
            row["error"] = _one_line(_unwrap(raised), target)
            return row
        job_id = result.get("job_id")
        row.update(ok=bool(result.get("ok", True)) and bool(job_id), job_id=job_id,
                   reused=bool(result.get("reused")), error=result.get("error"), result=result)
        if job_id:
            row["follow"] = f"jupyter-tether --target {shlex.quote(name)} logs {job_id} -f"
            row["collect"] = (f"jupyter-tether --target {shlex.quote(name)} collect {job_id} "
                              f"{shlex.quote(_collect_dir(name))}")
        return row

    ctx.note(f"submitting {args.spec} to {len(entries)} targets: "
             + ", ".join(name for name, _, _ in entries))
    rows: list[dict[str, Any]] = anyio.run(_gather, entries, one)
    failed = [row["target"] for row in rows if not row["ok"]]
    if ctx.json:
        ctx.emit_json({"ok": not failed, "submits": rows})
    else:
        table = _table(ctx, "TARGET", "JOB", "RESULT")
        for row in rows:
            if row["ok"]:
                outcome = "reused (an identical submit)" if row.get("reused") else "started"
                table.add_row(_escape(row["target"]), row["job_id"],
                              _styled(ctx, outcome, "green"))
            else:
                table.add_row(_escape(row["target"]), row["job_id"] or "-",
                              _styled(ctx, f"failed: {row['error']}", "red"))
        ctx.table(table)
        started = [row for row in rows if row.get("job_id")]
        if started:
            ctx.note("follow with:\n" + "\n".join(f"  {row['follow']}" for row in started))
            ctx.note("collect the artifacts with:\n"
                     + "\n".join(f"  {row['collect']}" for row in started))
    if failed:
        _error(f"the submit failed on {len(failed)} of {len(rows)} targets: {', '.join(failed)}")
        return EXIT_ERROR
    return EXIT_OK


def cmd_collect(ctx: Ctx) -> int:
    tether = ctx.connect()
    with phase_progress(ctx) as progress:
        result: dict[str, Any] = run_on_portal(
            tether.portal, functools.partial(submit_mod.collect, tether.aio, ctx.args.job,
                                             ctx.args.dir, require_done=not ctx.args.allow_running,
                                             progress=progress))
    if ctx.json:
        ctx.emit_json(result)
    else:
        table = _table(ctx, "ARTIFACT", "LOCAL", "RESULT")
        for item in result.get("downloads", []):
            remote = item.get("remote_path") or item.get("remote_dir") or str(item.get("artifact"))
            local = item.get("local_path") or item.get("local_dir") or "-"
            outcome = (human_bytes(item["bytes"]) if isinstance(item.get("bytes"), int) else "ok") \
                if item.get("ok") else f"failed: {item.get('error')}"
            table.add_row(remote, local, outcome)
        ctx.table(table)
    missing = result.get("missing") or []
    if missing:
        _error(f"{len(missing)} artifact(s) could not be collected: "
               + ", ".join(str(m) for m in missing))
        return EXIT_ERROR
    return EXIT_OK


def cmd_env(ctx: Ctx) -> int:
    tether = ctx.connect()
    snap: dict[str, Any] = run_on_portal(
        tether.portal, functools.partial(tether.aio.env_snapshot, ctx.args.timeout))
    if ctx.json:
        ctx.emit_json(snap)
        return EXIT_OK
    torch = snap.get("torch") or {}
    smi = snap.get("nvidia_smi_list") or {}
    freeze = snap.get("pip_freeze") or {}
    gpus = (smi.get("stdout") or "").strip().splitlines() if smi.get("returncode") == 0 else []
    if torch.get("importable"):
        torch_text = (f"{torch.get('version')} (cuda {torch.get('cuda')}, "
                      f"available={torch.get('cuda_available')}, "
                      f"devices={torch.get('device_count')})")
    else:
        torch_text = "not importable" + (f": {torch['error']}" if torch.get("error") else "")
    packages = (freeze.get("stdout") or "").strip().splitlines()
    summary = {
        "python": (snap.get("python") or "").split()[0] or None,
        "executable": snap.get("python_executable"), "platform": snap.get("platform"),
        "cpus": snap.get("cpu_count"), "root_dir": snap.get("root_dir"),
        "gpus": "; ".join(gpus) or "none (nvidia-smi " + (
            "unavailable)" if not smi.get("available") else "failed)"),
        "torch": torch_text, "packages": f"{len(packages)} (pip freeze; --json for the list)",
        "cuda_env": ", ".join(sorted(snap.get("cuda_env") or {})) or "-",
    }
    _print_mapping(ctx, summary)
    return EXIT_OK


def cmd_targets(ctx: Ctx) -> int:
    path = config_path()
    rows = describe_targets(path)
    if ctx.json:
        ctx.emit_json({"config": str(path), "targets": rows})
        return EXIT_OK
    ctx.note(f"config: {path}" + ("" if path.exists() else " (does not exist)"))
    if rows:
        table = _table(ctx, "NAME", "URL", "TOKEN", "DEFAULT")
        for row in rows:
            table.add_row(row["name"], row["url"] or "-", row["token"], "*" if row["default"] else "")
        ctx.table(table)
    return EXIT_OK


def cmd_mcp(ctx: Ctx) -> int:
    args = ctx.args
    # Imported here, not at the top: the MCP SDK would slow every other command's start.
    from . import mcp_server

    selection = select_target(args.url, args.token, args.target)
    target = selection.target
    auth_token = resolve_auth_token(args.auth_token, args.auth_token_file)
    _remember_secrets(auth_token)
    mcp_server.serve(transport="stdio" if args.stdio else "streamable-http", host=args.host,
                     port=args.port, path=args.path, url=target.base_url if target else None,
                     token=target.token if target else None, auth_token=auth_token,
                     allowed_hosts=args.allowed_host, allow_any_server=args.allow_any_server,
                     output_dir=args.output_dir, embedded_root=args.embedded_root,
                     local_roots=args.local_root)
    return EXIT_OK


# --- the parser -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error of this command, pointing at --help.
        line = " ".join(scrub(message).split())
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
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print machine-readable JSON only")
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
  nothing          a local Jupyter server is started for the command (root: the cwd)

exit codes: 0 ok; `run` exits with the job's exit code (128+N if killed by signal N);
  1 remote/connection error or failed exec; 2 usage/config error; 130 Ctrl-C (detached)
"""


def _sub(subparsers: Any, name: str, func: Callable[[Ctx], int], help_text: str,
         examples: str, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help_text, description=help_text, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "))
    parser.set_defaults(func=func)
    return parser


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

    p = _sub(subparsers, "mcp", cmd_mcp, "serve the MCP server (streamable HTTP or stdio)", """
        jupyter-tether mcp                         # http://127.0.0.1:8009/mcp
        jupyter-tether mcp --stdio --target kaggle
        jupyter-tether mcp --local-root ~/proj --local-root ~/data   # file tools: only these
        jupyter-tether mcp --host 0.0.0.0 --auth-token-file ~/.config/jupyter-tether/mcp-token
        JUPYTER_TETHER_AUTH_TOKEN=... jupyter-tether mcp --allowed-host mcp.example.org
        (python -m jupyter_tether.mcp_server takes the same options)
        """, common)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8009, help="port (default: %(default)s)")
    p.add_argument("--path", default="/mcp", help="HTTP path (default: %(default)s)")
    p.add_argument("--stdio", action="store_true", help="speak MCP over stdin/stdout instead")
    p.add_argument("--auth-token", default=None, metavar="TOKEN",
                   help=f"bearer token clients must send (default: ${AUTH_TOKEN_ENV}; "
                   "required off loopback); other local users see argv in the process list: "
                   "prefer the env var or --auth-token-file")
    p.add_argument("--auth-token-file", default=None, metavar="PATH",
                   help="read the bearer token from this file")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a further Host name clients use (a LAN name, a reverse proxy's "
                   "public name; NAME or NAME:PORT; repeatable); a non-loopback name needs "
                   "an auth token")
    p.add_argument("--allow-any-server", action="store_true",
                   help="let tools' server_url name any Jupyter server, not only the default "
                   "and the named targets (such servers get no token unless the URL holds one)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where exec images are saved (default: the user cache dir)")
    p.add_argument("--embedded-root", default=None, metavar="DIR",
                   help="root directory of the embedded local Jupyter server, used when no "
                   "target is given (default: the cwd)")
    p.add_argument("--local-root", action="append", default=None, metavar="DIR",
                   help="a local directory the file tools may read and write (repeatable; "
                   "default: the cwd); a client's MCP roots narrow these, never widen them")

    p = _sub(subparsers, "status", cmd_status, "connect and show the server, supervisor and link",
             """
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

    p = _sub(subparsers, "exec", cmd_exec, "run Python code in the remote work kernel", """
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

    p = _sub(subparsers, "run", cmd_run, "start a background job and follow its log", """
        jupyter-tether run 'python train.py --epochs 3 2>&1 | tee train.txt'
        jupyter-tether run python train.py --epochs 3     # several words: an argv, quoted
        jupyter-tether run --cwd work --env CUDA_VISIBLE_DEVICES=0 -- python train.py
        jupyter-tether run --detach 'sleep 600'           # prints the job id and returns
        Ctrl-C detaches (the job keeps running): re-attach with `jupyter-tether logs JOB -f`.
        The exit status is the job's.
        """, common)
    p.add_argument("--detach", "-d", action="store_true",
                   help="print the job id and return at once")
    p.add_argument("--cwd", default="", help="working directory (relative to the server root)")
    p.add_argument("--env", action="append", metavar="NAME=VALUE",
                   help="set an environment variable (repeatable)")
    p.add_argument("--name", default=None, help="a label for the job")
    p.add_argument("--log", default=None, metavar="PATH", help="remote log file path")
    p.add_argument("--idempotency-key", default=None,
                   help="a retried run with the same key never starts a second job")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the command: one shell string, or words after the options")

    p = _sub(subparsers, "jobs", cmd_jobs, "list jobs", """
        jupyter-tether jobs
        jupyter-tether jobs --state running
        jupyter-tether --json jobs | jq -r '.[] | select(.state=="running") | .job_id'
        """, common)
    p.add_argument("--state", choices=["running", "exited", "killed", "lost"], default=None,
                   help="only jobs in this state")

    p = _sub(subparsers, "logs", cmd_logs, "print a job's log (whole, last N lines, or follow)", """
        jupyter-tether logs JOB            # the whole log so far
        jupyter-tether logs JOB -n 50      # the last 50 lines
        jupyter-tether logs JOB -f         # the whole log, then follow until the job ends
        jupyter-tether logs JOB -f -n 0    # only new output
        """, common)
    p.add_argument("job", help="job id")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    p.add_argument("-n", "--lines", type=int, default=None, help="only the last N lines")

    p = _sub(subparsers, "kill", cmd_kill, "stop a job (its whole process group)", """
        jupyter-tether kill JOB                  # TERM, then KILL after 5 s
        jupyter-tether kill JOB --signal INT --grace 30
        jupyter-tether kill JOB --signal KILL
        """, common)
    p.add_argument("job", help="job id")
    p.add_argument("-s", "--signal", type=_parse_signal, default=int(signals.SIGTERM),
                   help="signal name or number (default: TERM)")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds before KILL follows (default: %(default)s)")

    p = _sub(subparsers, "put", cmd_put, "upload a file (or a directory, as a sync)", """
        jupyter-tether put model.ckpt work/model.ckpt
        jupyter-tether put ./data work/data
        """, common)
    p.add_argument("local", help="local file or directory")
    p.add_argument("remote", help="remote path (relative to the server root)")
    p.add_argument("--max-bytes", type=_parse_size, default=DEFAULT_SYNC_MAX_BYTES,
                   metavar="SIZE", help="for a directory: refuse to send more (default: 200M; "
                   "0 = no limit)")

    p = _sub(subparsers, "get", cmd_get, "download a remote file or directory", """
        jupyter-tether get work/out/metrics.json .
        jupyter-tether get work/out ./out
        """, common)
    p.add_argument("remote", help="remote file or directory")
    p.add_argument("local", help="local destination")

    p = _sub(subparsers, "sync", cmd_sync, "send only what changed in a directory", """
        jupyter-tether sync ./src work/src
        jupyter-tether sync ./src work/src --delete --exclude '*.pyc' --exclude .git
        """, common)
    p.add_argument("local_dir", help="local directory")
    p.add_argument("remote_dir", help="remote directory")
    p.add_argument("--delete", action="store_true", help="delete remote files absent locally")
    p.add_argument("--dry-run", action="store_true",
                   help="change nothing: list what would be sent and deleted")
    p.add_argument("--allow-root-delete", action="store_true",
                   help="let --delete work in the server root, the home directory, / or a "
                   "directory above them (refused by default)")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="skip matching paths (repeatable; .gitignore-style; default: VCS "
                   "dirs, caches, venvs, build outputs)")
    p.add_argument("--no-gitignore", action="store_true",
                   help="do not apply the tree's .gitignore files")
    p.add_argument("--max-bytes", type=_parse_size, default=DEFAULT_SYNC_MAX_BYTES,
                   metavar="SIZE", help="refuse, before sending, when more would travel "
                   "(default: 200M; 0 = no limit)")

    p = _sub(subparsers, "submit", cmd_submit, "submit a job spec (sync, bootstrap, run)", """
        jupyter-tether submit job.yaml
        jupyter-tether submit job.json --follow
        jupyter-tether submit job.yaml --target east --target west   # a job on each
        (with several targets it prints each job id and the collect command for each)
        """, common)
    p.add_argument("spec", help="a .json or .yaml job spec")
    p.add_argument("--follow", action="store_true",
                   help="follow the job's log and exit with its exit status")
    p.add_argument("--dry-run", action="store_true",
                   help="change nothing: show what each sync would send and delete")

    p = _sub(subparsers, "collect", cmd_collect, "download a submitted job's artifacts", """
        jupyter-tether collect JOB ./results
        jupyter-tether collect JOB ./results --allow-running
        """, common)
    p.add_argument("job", help="job id")
    p.add_argument("dir", help="local directory")
    p.add_argument("--allow-running", action="store_true",
                   help="collect even though the job has not ended")

    p = _sub(subparsers, "env", cmd_env, "snapshot the remote environment (python, GPUs, torch)", """
        jupyter-tether env
        jupyter-tether --json env | jq .torch
        """, common)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds (default: %(default)s)")

    _sub(subparsers, "targets", cmd_targets, "list the named targets of the config file", """
        jupyter-tether targets
        """, common)
    return parser


# --- entry point ------------------------------------------------------------------------------


def _error(message: str) -> None:
    line = " ".join(scrub(str(message)).split()) or "unknown error"
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


def _unwrap(exc: BaseException) -> BaseException:
    # Task groups wrap what failed inside them; the user wants the failure itself.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _SECRETS.clear()
    _remember_secrets(*_tokens_in_argv(argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("url", "token"):
        setattr(args, name, getattr(args, name, None))
    _collect_secrets(args)
    args.targets = list(dict.fromkeys(getattr(args, "target", None) or []))
    args.target = args.targets[0] if len(args.targets) == 1 else None
    args.json = getattr(args, "json", False)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if len(args.targets) > 1 and args.func is not cmd_submit:
        parser.error("--target may be given once (several only for submit)")
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
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except BaseException as raised:
        exc = _unwrap(raised)
        if isinstance(exc, KeyboardInterrupt):
            sys.stderr.write("interrupted\n")
            return EXIT_INTERRUPTED
        if isinstance(exc, SystemExit):
            raise exc from None
        if os.environ.get(DEBUG_ENV):
            raise
        if isinstance(exc, (UsageError, ConfigError)):
            _error(str(exc))
            return EXIT_USAGE
        if isinstance(exc, TetherError):
            hint = ctx.selection.auth_hint() if isinstance(exc, AuthError) and ctx.selection \
                else ""
            _error(str(exc) + hint)
            return EXIT_ERROR
        if isinstance(exc, BrokenPipeError):  # `| head` closed the pipe: not our failure
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the exit flush
            return EXIT_OK
        _error(f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for a traceback)")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
