"""``run``, ``jobs``, ``logs`` and ``kill``: background jobs and their logs."""

from __future__ import annotations

import argparse
import codecs
import json
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .. import Job, JobInfo
from ..formatting import job_duration, short_bytes
from .context import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Ctx,
    UsageError,
    add_command,
    error,
    json_default,
)
from .output import new_table, stream_chunks, when

# The remote's (Linux) signal numbers, which the supervisor reports: named here rather than
# by this machine's ``signal`` module, whose numbers differ on macOS (SIGUSR1 is 30 there).
SIGNAL_NAMES: dict[int, str] = dict(enumerate((
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
    "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS"), start=1))


def signal_name(number: int) -> str:
    """``15`` -> ``SIGTERM`` (Linux numbering); real-time ones as ``SIGRTMIN+N``."""
    if number in SIGNAL_NAMES:
        return "SIG" + SIGNAL_NAMES[number]
    return f"SIGRTMIN+{number - 34}" if 34 < number <= 64 else \
        "SIGRTMIN" if number == 34 else f"SIG{number}"


def _signal_number(info: JobInfo) -> int | None:
    if info.signal:
        return int(info.signal)
    if info.exit_code is not None and info.exit_code < 0:  # a Popen returncode: -N
        return -int(info.exit_code)
    return None


def job_exit_code(info: JobInfo) -> int:
    """What a shell would report: the exit code, or 128+N for a job ended by signal N."""
    number = _signal_number(info)
    if number is not None:
        return 128 + number
    if info.exit_code is None:
        return EXIT_ERROR
    return min(int(info.exit_code), 255)


def exit_fields(info: JobInfo) -> dict[str, Any]:
    """How a job ended, in the one vocabulary of every command and ``--json``: ``exit_code``
    (the code it exited with; null while running, when a signal ended it, or when lost) and
    ``signal`` (the name of the signal that ended it, else null)."""
    number = _signal_number(info)
    code = None if number is not None or info.state == "running" else info.exit_code
    return {"exit_code": code, "signal": signal_name(number) if number is not None else None}


def exit_text(info: JobInfo) -> str:
    """The same words everywhere: ``exited with code 3``, ``killed by SIGTERM``, ..."""
    fields = exit_fields(info)
    if info.state == "running":
        return "running"
    if fields["signal"]:
        return f"killed by {fields['signal']}"
    if fields["exit_code"] is not None:
        return f"exited with code {fields['exit_code']}"
    if info.state == "lost":
        return "lost (its process is gone and no exit code was recorded)"
    return info.state


def job_row(info: JobInfo) -> dict[str, Any]:
    row = {**info.to_dict(), **exit_fields(info)}
    row["duration_s"] = (round((info.ended_at or time.time()) - info.started_at, 3)
                         if info.started_at else None)
    return row


def usage_cells(info: JobInfo) -> tuple[str, str, str]:
    """CPU (a running job's %, an ended one's seconds), RSS now and its peak: one word each,
    so piped output still splits on whitespace."""
    usage = info.usage or {}
    if usage.get("cpu_percent") is not None:
        cpu = f"{usage['cpu_percent']:.0f}%"
    else:
        cpu = f"{usage['cpu_s']:.1f}s" if usage.get("cpu_s") is not None else "-"
    return cpu, short_bytes(usage.get("rss")), short_bytes(usage.get("rss_peak"))


def follow_job(ctx: Ctx, job: Job, offset: int = 0) -> int:
    """Stream a job's log until it ends, then exit with its code; Ctrl-C only detaches."""
    try:
        if ctx.json:
            info = job.wait()
        else:
            with job.follow(offset) as chunks:
                stream_chunks(chunks)
            info = job.wait()
    except KeyboardInterrupt:
        ctx.err.print(f"\ndetached: job {job.job_id} keeps running. Re-attach with:\n  "
                      + ctx.again(f"logs {job.job_id} -f"), markup=False, highlight=False)
        return EXIT_INTERRUPTED
    code = job_exit_code(info)
    if ctx.json:
        ctx.emit_json({**job_row(info), "log_tail": job.tail(50)})
    elif info.state == "lost":
        error(f"job {job.job_id} {exit_text(info)}")
    else:
        ctx.note(f"[job {job.job_id} {exit_text(info)}]")
    return code


# --- run --------------------------------------------------------------------------------------


def add_run(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "run", cmd_run, "start a background job and follow its log", """
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


def cmd_run(ctx: Ctx) -> int:
    args = ctx.args
    command = _command_string(args.command)
    env = _env_pairs(args.env)
    job = ctx.connect().jobs.start(command, cwd=args.cwd, env=env, log_path=args.log,
                                   name=args.name, idempotency_key=args.idempotency_key)
    if args.detach:
        if ctx.json:
            ctx.emit_json(job_row(job.info) if job.info else {"job_id": job.job_id})
        else:
            ctx.out.print(job.job_id, markup=False, highlight=False)
            ctx.note("follow it with: " + ctx.again(f"logs {job.job_id} -f"))
        return EXIT_OK
    ctx.note(f"job {job.job_id} started; Ctrl-C detaches (the job keeps running)")
    return follow_job(ctx, job)


# --- jobs -------------------------------------------------------------------------------------


def add_jobs(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "jobs", cmd_jobs, "list jobs", """
        jupyter-tether jobs
        jupyter-tether jobs --state running
        jupyter-tether --json jobs | jq -r '.[] | select(.state=="running") | .job_id'
        """, common)
    p.add_argument("--state", choices=["running", "exited", "killed", "lost"], default=None,
                   help="only jobs in this state")


def cmd_jobs(ctx: Ctx) -> int:
    infos = ctx.connect().jobs.list(state=ctx.args.state)
    infos.sort(key=lambda i: i.started_at or 0)
    if ctx.json:
        ctx.emit_json([job_row(i) for i in infos])
        return EXIT_OK
    if not infos:
        ctx.note("no jobs")
        return EXIT_OK
    table = new_table(ctx, "JOB", "STATE", "EXIT", "WHY", "STARTED", "TIME", "CPU", "RSS",
                      "PEAK", "COMMAND")
    colours = {"running": "cyan", "exited": "green", "killed": "yellow", "lost": "red"}
    for info in infos:
        state = info.state
        if ctx.tty:
            colour = "red" if state == "exited" and info.exit_code else colours.get(state, "")
            state = f"[{colour}]{state}[/]" if colour else state
        fields = exit_fields(info)
        ended = fields["signal"] or ("-" if fields["exit_code"] is None else
                                     str(fields["exit_code"]))
        command = info.command if len(info.command) <= 60 else info.command[:57] + "..."
        table.add_row(info.job_id, state, ended, (info.reason or {}).get("kind") or "-",
                      when(info.started_at), job_duration(info) or "-", *usage_cells(info),
                      command.replace("[", r"\["))
    ctx.table(table)
    return EXIT_OK


# --- logs -------------------------------------------------------------------------------------


def add_logs(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "logs", cmd_logs,
                    "print a job's log (whole, last N lines, or follow)", """
        jupyter-tether logs JOB            # the whole log so far
        jupyter-tether logs JOB -n 50      # the last 50 lines
        jupyter-tether logs JOB -f         # the whole log, then follow until the job ends
        jupyter-tether logs JOB -f -n 0    # only new output
        """, common)
    p.add_argument("job", help="job id")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    p.add_argument("-n", "--lines", type=int, default=None, help="only the last N lines")


def cmd_logs(ctx: Ctx) -> int:
    args = ctx.args
    job = ctx.connect().jobs.get(args.job)
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
        stream_chunks(_log_chunks(job, info.bytes_written))
        return EXIT_OK
    if ctx.json:
        ctx.emit_json({"job_id": job.job_id, "state": info.state, **exit_fields(info),
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
                stream_chunks(chunks)
        info = job.wait()
    except KeyboardInterrupt:
        ctx.note(f"\nstopped following; job {job.job_id} is not affected")
        return EXIT_INTERRUPTED
    if ctx.json:
        sys.stdout.write(json.dumps({"job": job_row(info)}, default=json_default) + "\n")
    else:
        ctx.note(f"[job {job.job_id} {exit_text(info)}]")
    return EXIT_OK


# --- kill -------------------------------------------------------------------------------------


def add_kill(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "kill", cmd_kill, "stop a job (its whole process group)", """
        jupyter-tether kill JOB                  # TERM, then KILL after 5 s
        jupyter-tether kill JOB --signal INT --grace 30
        jupyter-tether kill JOB --signal KILL
        """, common)
    p.add_argument("job", help="job id")
    p.add_argument("-s", "--signal", type=_parse_signal, default=15,
                   help="signal name or number (default: TERM)")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds before KILL follows (default: %(default)s)")


def _parse_signal(value: str) -> int:
    text = value.strip().upper()
    if text.isdigit():
        return int(text)
    name = text.removeprefix("SIG")
    for number, known in SIGNAL_NAMES.items():  # the remote's numbers, not this machine's
        if known == name:
            return number
    raise argparse.ArgumentTypeError(f"unknown signal {value!r} (like TERM, INT, KILL or 15)")


def cmd_kill(ctx: Ctx) -> int:
    job = ctx.connect().jobs.get(ctx.args.job)
    info = job.kill(signal=ctx.args.signal, grace=ctx.args.grace)
    if ctx.json:
        ctx.emit_json(job_row(info))
    else:
        ctx.out.print(f"job {info.job_id} {exit_text(info)}", markup=False, highlight=False)
    return EXIT_OK
