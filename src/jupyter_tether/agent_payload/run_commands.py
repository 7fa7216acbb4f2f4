"""``run_commands``: short shell commands run one after another, their output returned whole.

Unlike jobs, nothing outlives the op: each command runs in its own session with a timeout
(its whole process group is killed when it passes), and only the last ``max_output_chars``
of its stdout and stderr are kept.
"""

import codecs
import os
import signal
import subprocess
import threading
import time
from typing import Any, Dict

from . import paths
from .args import command_arg, env_arg, float_arg, int_arg
from .procs import build_env, shell
from .supervisor import Request
from .wire import ErrorCode, OpError, arg

KIB = 1024
DEFAULT_COMMAND_TIMEOUT_S = 600.0
MAX_COMMAND_TIMEOUT_S = 7 * 24 * 3600.0
DEFAULT_MAX_OUTPUT_CHARS = 20000
MAX_OUTPUT_CHARS = 10 * 1000 * 1000


class _TailReader(threading.Thread):
    """Drains a pipe, keeping only the last ``cap`` characters and counting the rest."""

    def __init__(self, fd: int, cap: int):
        super().__init__(daemon=True, name="tether-run-output")
        self.fd = fd
        self.cap = cap
        self.total = 0
        self._buf = ""
        self._lock = threading.Lock()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def run(self) -> None:
        try:
            while True:
                data = os.read(self.fd, 64 * KIB)
                if not data:
                    break
                self._add(self._decoder.decode(data))
            self._add(self._decoder.decode(b"", final=True))
        except OSError:
            pass
        finally:
            os.close(self.fd)

    def _add(self, text: str) -> None:
        with self._lock:
            self.total += len(text)
            self._buf += text
            if len(self._buf) > 2 * self.cap + 64 * KIB:
                self._buf = self._buf[len(self._buf) - self.cap:]

    def text(self) -> str:
        with self._lock:
            kept = self._buf[len(self._buf) - self.cap:] if self.cap else ""
            dropped = self.total - len(kept)
        return "[... %d chars truncated ...]\n%s" % (dropped, kept) if dropped else kept


def _run_one(command: str, cwd: str, env: Dict[str, str], timeout: float,
             cap: int) -> Dict[str, Any]:
    started = time.monotonic()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen([shell(), "-c", command], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        return {"command": command, "returncode": 127, "stdout": "",
                "stderr": "could not start: %s" % exc, "duration_s": 0.0, "timed_out": False}
    os.close(out_w)
    os.close(err_w)
    readers = [_TailReader(out_r, cap), _TailReader(err_r, cap)]
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        returncode = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:  # its own session: the whole group goes, grandchildren included
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        returncode = proc.wait()
    for reader in readers:
        # A background child may hold the pipe open: give up on it after a while.
        reader.join(timeout=5.0)
    return {"command": command, "returncode": returncode, "stdout": readers[0].text(),
            "stderr": readers[1].text(), "duration_s": round(time.monotonic() - started, 3),
            "timed_out": timed_out}


def op_run_commands(root_dir: str, req: Request) -> Dict[str, Any]:
    """Run ``commands`` in order in ``cwd`` (relative to ``root_dir``); stop at the first
    failure unless ``fail_fast`` is false."""
    args = req.args
    commands = arg(args, "commands", list)
    if len(commands) > 10000:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "too many commands (%d)" % len(commands))
    for index, command in enumerate(commands):
        command_arg(command, "commands[%d]" % index)
    cwd = paths.resolve(root_dir, arg(args, "cwd", str, ""))
    if not os.path.isdir(cwd):
        code = ErrorCode.NOT_A_DIRECTORY if os.path.exists(cwd) else ErrorCode.NOT_FOUND
        raise OpError(code, "cwd %s is not a directory" % cwd, {"path": cwd})
    env = build_env(env_arg(args))
    timeout = float_arg(args, "timeout_s_per_command", DEFAULT_COMMAND_TIMEOUT_S, 0.001,
                        MAX_COMMAND_TIMEOUT_S)
    fail_fast = arg(args, "fail_fast", bool, True)
    cap = int_arg(args, "max_output_chars", DEFAULT_MAX_OUTPUT_CHARS, 0, MAX_OUTPUT_CHARS)
    results = []
    ok = True
    for command in commands:
        result = _run_one(command, cwd, env, timeout, cap)
        results.append(result)
        if result["returncode"] != 0 or result["timed_out"]:
            ok = False
            if fail_fast:
                break
    return {"results": results, "ok": ok, "skipped": len(commands) - len(results)}
