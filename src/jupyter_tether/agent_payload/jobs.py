"""Background jobs: shell commands in their own session, logged to disk, followed, re-adopted.

A job is ``<shell> -c COMMAND`` started by a tiny Python wrapper (``job_wrapper``) in a new
session; it outlives the supervisor and its kernel, and appends its output straight to a log
file. The pieces:

- ``job_registry``  the jobs on disk (``<state_dir>/jobs/``), their state, idempotency keys;
- ``procs``         process identity (pid + start token), process groups, shell and env;
- ``job_wrapper``   the wrapper script and its start;
- ``follow``        the pump: ``log`` and ``job_exit`` events, follow credit, waits;
- this module       the ``job_*`` ops that start, list, wait for, kill and tail jobs.
"""

import hashlib
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from . import job_wrapper, paths
from .args import command_arg, env_arg, float_arg, int_arg
from .follow import FollowPump
from .fsutil import read_at
from .job_registry import RUNNING, STATES, Job, JobRegistry, file_size, short, write_json
from .procs import NON_FATAL, build_env, group_alive, killpg, same_process, shell, start_token
from .resources import ResourceMonitor
from .run_commands import op_run_commands
from .supervisor import Request, Result, Supervisor
from .wire import ErrorCode, Op, OpError, arg

KIB = 1024
MIB = 1024 * 1024

DEFAULT_TAIL_LINES = 200
DEFAULT_TAIL_BYTES = MIB
MAX_TAIL_BYTES = 16 * MIB
MAX_TAIL_LINES = 10000000
MAX_WAIT_S = 3600.0
MAX_GRACE_S = 600.0


class JobManager:
    """The ``job_*`` ops over one registry and its follow pump."""

    def __init__(self, supervisor: Supervisor):
        self.sup = supervisor
        self.registry = JobRegistry(os.path.join(supervisor.state_dir, "jobs"))
        self.jobs_dir = self.registry.jobs_dir
        self.keys_dir = self.registry.keys_dir
        self.pump = FollowPump(supervisor, self.registry)
        self.starter = job_wrapper.Starter(self.jobs_dir)
        self._lock = self.registry.lock  # one lock over jobs, follows and waiters
        self._start_lock = threading.Lock()  # serialises starts (idempotency keys)
        self.monitor = ResourceMonitor(supervisor, self.registry)
        self.registry.annotate = self.monitor.annotate
        self.registry.scan()  # re-adopt what earlier supervisors started
        if self.registry.running():
            self.pump.ensure()

    def hello(self) -> Dict[str, Any]:
        return self.registry.live()

    # --- start ------------------------------------------------------------------------------

    def op_start(self, req: Request) -> Dict[str, Any]:
        args = req.args
        command = command_arg(arg(args, "command", str), "command")
        cwd = paths.resolve(self.sup.root_dir, arg(args, "cwd", str, ""))
        if not os.path.isdir(cwd):
            code = ErrorCode.NOT_A_DIRECTORY if os.path.exists(cwd) else ErrorCode.NOT_FOUND
            raise OpError(code, "cwd %s is not a directory" % cwd, {"path": cwd})
        overrides = env_arg(args)
        log_arg = arg(args, "log_path", str, None)
        key = arg(args, "idempotency_key", str, None)
        if key is not None and not 1 <= len(key) <= 512:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "idempotency_key must have 1 to 512 chars")
        name = arg(args, "name", str, None)
        if name is not None and len(name) > 256:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "name is longer than 256 chars")
        with self._start_lock:
            try:
                os.makedirs(self.keys_dir, exist_ok=True)
            except OSError as exc:
                raise paths.os_error(exc, self.keys_dir) from None
            job_id: Optional[str] = None
            key_path = None
            if key is not None:
                key_path = os.path.join(
                    self.keys_dir, hashlib.sha256(key.encode("utf-8")).hexdigest()[:40])
                existing = self.registry.claimed(key_path, key, command)
                if isinstance(existing, dict):
                    return existing
                job_id = existing  # claimed by a start that died before spawning: finish it
            if job_id is None:
                job_id = self.registry.new_id(key_path)
            return self._spawn(job_id, key_path, command, cwd, overrides, log_arg, key, name)

    def _spawn(self, job_id: str, key_path: Optional[str], command: str, cwd: str,
               overrides: Dict[str, Optional[str]], log_arg: Optional[str], key: Optional[str],
               name: Optional[str]) -> Dict[str, Any]:
        job_dir = os.path.join(self.jobs_dir, job_id)
        os.makedirs(job_dir, exist_ok=True)
        log_path = paths.resolve(self.sup.root_dir, log_arg or "logs/job-%s.log" % job_id)
        try:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            self.registry.discard(job_dir, key_path)
            raise paths.os_error(exc, log_path) from None
        shell_path = shell()
        meta: Dict[str, Any] = {
            "version": 1,
            "job_id": job_id,
            "command": command,
            "cwd": cwd,
            "log_path": log_path,
            "log_start_offset": os.fstat(log_fd).st_size,
            "name": name,
            "idempotency_key": key,
            "env_keys": sorted(overrides),  # names only: values may be secrets
            "shell": shell_path,
            "started_at": time.time(),
            "supervisor": self.sup.instance_id,
            "pid": None,
            "pid_start": None,
            "wrapper_pid": None,
            "wrapper_start": None,
        }
        try:
            write_json(os.path.join(job_dir, "job.json"), meta)
            popen = self.starter.start(job_dir, shell_path, command, cwd, build_env(overrides),
                                       log_path, log_fd)
        except OSError as exc:
            self.registry.discard(job_dir, key_path)
            raise OpError(ErrorCode.INTERNAL, "could not start job: %s" % exc) from None
        finally:
            os.close(log_fd)
        info = job_wrapper.read_pids(popen)
        if popen.stdout is not None:
            popen.stdout.close()
        for field in ("pid", "pid_start", "wrapper_pid", "wrapper_start"):
            meta[field] = info.get(field)
        if meta["wrapper_pid"] is None:
            meta["wrapper_pid"] = popen.pid
        if not meta["pid_start"]:  # no /proc here: take the token ourselves
            meta["pid_start"] = start_token(meta["pid"])
        if not meta["wrapper_start"]:
            meta["wrapper_start"] = start_token(meta["wrapper_pid"])
        if "error" in info:
            meta["error"] = info["error"]
        write_json(os.path.join(job_dir, "job.json"), meta)
        job = Job(job_dir, meta)
        job.popen = popen
        job_wrapper.adopt(popen)
        with self._lock:
            self.registry.jobs[job_id] = job
            self.registry.refresh(job)
            summary = self.registry.summary(job)
        summary["reused"] = False
        self.pump.ensure()
        self.registry.wake.set()
        return summary

    # --- status, list, wait, kill ---------------------------------------------------------------

    def op_status(self, req: Request) -> Dict[str, Any]:
        job = self.registry.get(req.args)
        self.monitor.asked()
        with self._lock:
            self.registry.refresh(job)
            return self.registry.summary(job)

    def op_list(self, req: Request) -> Dict[str, Any]:
        limit = int_arg(req.args, "limit", 1000, 1, 100000)
        state = arg(req.args, "state", str, None)
        if state is not None and state not in STATES:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "state must be running, exited, killed "
                          "or lost, got %r" % short(state))
        self.monitor.asked()
        with self._lock:
            jobs = list(self.registry.jobs.values())
            for job in jobs:
                self.registry.refresh(job)
            if state is not None:
                jobs = [j for j in jobs if j.state == state]
            jobs.sort(key=lambda j: j.meta.get("started_at") or 0, reverse=True)
            return {"jobs": [self.registry.summary(j) for j in jobs[:limit]], "total": len(jobs)}

    def op_wait(self, req: Request) -> Any:
        """The job's summary once it ends or ``timeout`` passes; holds no thread meanwhile
        (the pump settles it)."""
        job = self.registry.get(req.args)
        timeout = float_arg(req.args, "timeout", 60.0, 0.0, MAX_WAIT_S, clamp=True)
        return self.pump.wait(job, timeout, req)

    def op_kill(self, req: Request) -> Dict[str, Any]:
        job = self.registry.get(req.args)
        sig = int_arg(req.args, "signal", int(signal.SIGTERM), 1, int(signal.NSIG) - 1)
        grace = float_arg(req.args, "grace", 5.0, 0.0, MAX_GRACE_S)
        why = arg(req.args, "reason", str, "user")  # "timeout": the job ran out of time
        if why not in ("user", "timeout"):
            raise OpError(ErrorCode.INVALID_ARGUMENT, "reason must be 'user' or 'timeout'")
        pid = job.meta.get("pid")
        pgid = pid if isinstance(pid, int) and pid > 0 else 0  # the command leads its group
        signalled = escalated = False
        with self._lock:
            self.registry.refresh(job)
            running = job.state == RUNNING
            ours = same_process(pgid, job.meta.get("pid_start"))
            fatal = sig not in NON_FATAL
            if running and ours and fatal and job.killed is None:
                job.killed = {"signal": sig, "at": time.time(), "by": why}
                write_json(os.path.join(job.dir, "killed.json"), job.killed)
        if pgid:
            if running and ours:
                signalled = killpg(pgid, sig)
            elif start_token(pgid) is None and group_alive(pgid):
                # The leader is gone but children it left live on in its group (no process
                # can create a group with this id while the leader's pid is free): end them.
                signalled = killpg(pgid, sig)
        if signalled and sig == signal.SIGTERM:
            deadline = time.monotonic() + grace
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if group_alive(pgid):
                escalated = killpg(pgid, signal.SIGKILL)
        if signalled and fatal:  # let the wrapper record the end: the reply has the final state
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                with self._lock:
                    self.registry.refresh(job)
                    if job.state != RUNNING:
                        break
                time.sleep(0.02)
        with self._lock:
            self.registry.refresh(job)
            summary = self.registry.summary(job)
        summary["signalled"] = signalled
        summary["escalated"] = escalated
        return summary

    # --- tail -------------------------------------------------------------------------------

    def op_tail(self, req: Request) -> Any:
        """Log bytes: the last ``lines`` lines, or ``max_bytes`` from ``offset``; with the
        job's summary (``job``, as ``job_status`` gives it), taken before the read, so an
        ended job's read holds all it wrote. ``wait`` (with ``offset``): hold the reply,
        with no thread, until ``max_bytes`` are there, the job ends, or ``wait`` s pass."""
        job = self.registry.get(req.args)
        args = req.args
        offset = int_arg(args, "offset", None, 0, 1 << 62)
        lines = int_arg(args, "lines", None, 0, MAX_TAIL_LINES)
        max_bytes = int_arg(args, "max_bytes", DEFAULT_TAIL_BYTES, 0, MAX_TAIL_BYTES)
        wait = float_arg(args, "wait", 0.0, 0.0, MAX_WAIT_S, clamp=True)
        if offset is not None and lines is not None:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "give either lines or offset, not both")
        if offset is None and lines is None:
            lines = DEFAULT_TAIL_LINES
        path = job.meta["log_path"]

        def answer() -> Result:
            self.monitor.asked()  # as job_status: its usage figures are fresh
            with self._lock:
                self.registry.refresh(job)
                summary = self.registry.summary(job)
            return _tail(job.job_id, path, offset, lines, max_bytes, summary)

        if offset is None or wait <= 0:
            return answer()
        want = offset + max_bytes
        return self.pump.wait(job, wait, req, ready=lambda: (file_size(path) or 0) >= want,
                              answer=answer)

    def close(self) -> None:
        """Stop the pump and the sampler. Jobs are separate processes and keep running."""
        self.monitor.close()
        self.starter.close()
        self.pump.close()


def _tail(job_id: str, path: str, offset: Optional[int], lines: Optional[int],
          max_bytes: int, summary: Dict[str, Any]) -> Result:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise paths.os_error(exc, path) from None
    try:
        size = os.fstat(fd).st_size
        truncated = False
        if offset is not None:
            start = min(offset, size)
            end = min(size, start + max_bytes)
            truncated = end < size
        else:
            end = size
            start, truncated = _tail_start(fd, size, lines or 0, max_bytes)
        data = read_at(fd, start, end - start) if end > start else b""
    finally:
        os.close(fd)
    value = {"job_id": job_id, "offset_start": start, "offset_end": start + len(data),
             "size": size, "truncated": truncated, "state": summary["state"], "job": summary}
    return Result(value, [data])


def _tail_start(fd: int, size: int, lines: int, max_bytes: int) -> Tuple[int, bool]:
    """Start offset of the last ``lines`` lines, scanning back in blocks; and whether
    ``max_bytes`` cut it short. A last line without a newline counts as a line."""
    if lines <= 0 or size == 0:
        return size, False
    limit = max(0, size - max_bytes)
    # A trailing newline ends the last line; it does not begin another one.
    pos = size - 1 if read_at(fd, size - 1, 1) == b"\n" else size
    need = lines
    block = 64 * KIB
    while pos > limit:
        count = min(block, pos - limit)
        data = read_at(fd, pos - count, count)
        index = len(data)
        while True:
            index = data.rfind(b"\n", 0, index)
            if index < 0:
                break
            need -= 1
            if need == 0:
                return pos - count + index + 1, False
        pos -= count
    return limit, limit > 0


# --- registration ------------------------------------------------------------------------------


def _watching(monitor: ResourceMonitor, handler: Callable[[Request], Any]
              ) -> Callable[[Request], Any]:
    """``handler``, and someone follows a log: keep sampling usage while they do."""
    def handle(req: Request) -> Any:
        monitor.watch()
        return handler(req)
    return handle



def register(supervisor: Supervisor) -> None:
    """Create the job manager (re-adopting earlier jobs) and register its ops."""
    manager = JobManager(supervisor)
    supervisor.register(Op.JOB_START, manager.op_start, blocking=True)
    supervisor.register(Op.JOB_STATUS, manager.op_status)
    supervisor.register(Op.JOB_LIST, manager.op_list)
    supervisor.register(Op.JOB_TAIL, manager.op_tail, blocking=True)
    # Not blocking: a wait is settled by the pump and holds no worker (see op_wait).
    supervisor.register(Op.JOB_WAIT, manager.op_wait)
    supervisor.register(Op.JOB_KILL, manager.op_kill, blocking=True)
    supervisor.register(Op.JOB_FOLLOW, _watching(manager.monitor, manager.pump.op_follow))
    supervisor.register(Op.JOB_FOLLOW_ACK,
                        _watching(manager.monitor, manager.pump.op_follow_ack))
    supervisor.register(Op.JOB_UNFOLLOW, manager.pump.op_unfollow)
    supervisor.register(Op.RUN_COMMANDS, lambda req: op_run_commands(supervisor.root_dir, req),
                        blocking=True)
    supervisor.register(Op.RESOURCES, manager.monitor.op_resources, blocking=True)
    supervisor.add_hello_extra(manager.hello)
    supervisor.add_closer(manager.close)
