"""Background jobs: shell commands in their own session, logged to disk, followed, re-adopted.

A job is ``<shell> -c COMMAND`` started by a tiny Python wrapper (the kernel's interpreter,
``-I -S``). The wrapper runs in a new session; the command runs in its own process group
inside it, so ``killpg`` on the job never hits the wrapper, which then records the exit code
and end time in the job's registry folder even when the supervisor (or its kernel) is gone.
stdout and stderr are appended straight to the log file: no pipe ties the job to us.

Registry, under ``<state_dir>/jobs/``::

    <job_id>/job.json     what was started: command, cwd, log path, pids + start tokens
    <job_id>/pids.json    written by the wrapper as soon as the command runs
    <job_id>/exit.json    written by the wrapper when the command ends
    <job_id>/killed.json  written by us before we signal the job
    _keys/<sha256(key)>   idempotency key -> job_id, claimed by hard-linking a complete
                          temp file into place (exclusive, and never seen empty)

A process is identified by pid plus a start token (``/proc/<pid>/stat`` starttime, or
psutil's create_time), so a recycled pid is never mistaken for a job.

Follow: one pump thread per supervisor reads new bytes from each followed job's log file
(the file is the source of truth; nothing is buffered in memory beyond one tick) and emits
one batched ``log`` event per tick, bounded by a per-subscription credit window. A
subscription is keyed by (job_id, subscriber): followers that pass distinct ``subscriber``
ids have independent offsets and windows, and every chunk names its subscription.

Wait: ``job_wait`` holds no thread; the pump settles each waiter when its job ends or its
timeout passes, so any number of waits leave the supervisor's worker pool alone.
"""

import codecs
import errno
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from . import paths
from .supervisor import Deferred, Request, Result, Supervisor
from .wire import ErrorCode, OpError, arg

try:  # psutil is optional: /proc covers Linux, psutil covers macOS and friends.
    import psutil as _psutil
except ImportError:  # pragma: no cover - depends on the remote environment
    _psutil = None

KIB = 1024
MIB = 1024 * 1024

RUNNING = "running"
EXITED = "exited"
KILLED = "killed"
LOST = "lost"

DEFAULT_TAIL_LINES = 200
DEFAULT_TAIL_BYTES = MIB
MAX_TAIL_BYTES = 16 * MIB
MAX_TAIL_LINES = 10000000
DEFAULT_WINDOW = 8 * MIB
MIN_WINDOW = 64 * KIB
MAX_WINDOW = 256 * MIB
CHUNK_BYTES = MIB  # one blob of a log event
TICK_BYTES = 4 * MIB  # all blobs of one log event
FOLLOW_TICK_S = 0.012  # after an event: iopub allows ~1000 msg/s, ~80/s is far below that
# After a quiet tick, look again soon: the first bytes after a pause go out within ~3 ms,
# while a busy log is still batched into one event per FOLLOW_TICK_S.
FOLLOW_POLL_S = 0.003
WATCH_TICK_S = 0.05  # exit detection when nothing is followed
IDLE_TICK_S = 1.0
WAIT_TICK_S = 0.02  # how soon a waiter hears that its job ended
# A subscription whose window stayed full with no ack for this long has lost its follower:
# it is dropped (a live follower that merely paused re-subscribes after its idle check).
FOLLOW_STALL_S = 300.0
MAX_SUBSCRIBER_CHARS = 128
MAX_WAIT_S = 3600.0
MAX_GRACE_S = 600.0
START_TIMEOUT_S = 15.0
DEFAULT_COMMAND_TIMEOUT_S = 600.0
MAX_COMMAND_TIMEOUT_S = 7 * 24 * 3600.0
DEFAULT_MAX_OUTPUT_CHARS = 20000
MAX_OUTPUT_CHARS = 10 * 1000 * 1000
# A key file still empty or unreadable after this long was left by a start that died while
# claiming it (older payloads wrote the id after an O_EXCL create): it is cleared and reused.
KEY_STALE_S = 5.0

# Wrappers we started and have not reaped yet, kept across supervisors of this module so
# that none is left a zombie of the kernel (the pump of any live manager reaps them).
_WRAPPERS: List[subprocess.Popen] = []
_WRAPPERS_LOCK = threading.Lock()

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_HAS_PROC = os.path.exists("/proc/self/stat")

# Runs as ``python -I -S <jobs_dir>/_wrapper-<hash>.py job_dir shell command`` (a file, so
# ``ps`` stays readable) with the job's cwd and env, stderr on the log file and stdout on a
# pipe that carries one JSON line back to us. Python >= 3.5, standard library only.
# Signals sent to the wrapper itself go on to the job's group.
_WRAPPER = r"""
import json, os, signal, subprocess, sys, time
job_dir, shell, command = sys.argv[1], sys.argv[2], sys.argv[3]
def put(name, data):
    tmp = os.path.join(job_dir, "." + name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(job_dir, name))
def token(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        return "proc:" + data[data.rfind(b")") + 2:].split()[19].decode()
    except Exception:
        return None
child = None
def forward(signum, frame):
    if child is not None:
        try:
            os.killpg(child.pid, signum)
        except OSError:
            pass
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)
try:
    child = subprocess.Popen([shell, "-c", command], stdin=subprocess.DEVNULL, stdout=2,
                             stderr=2, preexec_fn=os.setpgrp)
except Exception as exc:
    sys.stderr.write("jupyter-tether: could not start the job: %s\n" % exc)
    put("exit.json", {"exit_code": 127, "signal": None, "ended_at": time.time(),
                      "error": str(exc)})
    sys.stdout.write(json.dumps({"error": str(exc)}) + "\n")
    sys.exit(0)
info = {"pid": child.pid, "pid_start": token(child.pid), "wrapper_pid": os.getpid(),
        "wrapper_start": token(os.getpid())}
put("pids.json", info)
sys.stdout.write(json.dumps(info) + "\n")
sys.stdout.flush()
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
rc = child.wait()
put("exit.json", {"exit_code": rc, "signal": -rc if rc < 0 else None, "ended_at": time.time()})
"""


# --- processes ------------------------------------------------------------------------------


def _proc_fields(pid: int) -> Optional[List[str]]:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    end = data.rfind(b")")  # the command name may itself hold spaces and parentheses
    if end < 0:
        return None
    return data[end + 2:].decode("ascii", "replace").split()


def _start_token(pid: Optional[int]) -> Optional[str]:
    """An identity token of a live process (None when dead or a zombie)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    if _HAS_PROC:
        fields = _proc_fields(pid)
        if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
            return None
        return "proc:" + fields[19]
    if _psutil is not None:
        try:
            proc = _psutil.Process(pid)
            if proc.status() == _psutil.STATUS_ZOMBIE:
                return None
            return "psutil:%.3f" % proc.create_time()
        except Exception:
            return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return "alive"  # nothing tells start times apart here: liveness is all we know


def _same_process(pid: Any, token: Any) -> bool:
    """Whether ``pid`` is alive and is the very process that ``token`` was taken from."""
    if not isinstance(pid, int) or not isinstance(token, str):
        return False
    current = _start_token(pid)
    if current is None:
        return False
    kind, _, value = token.partition(":")
    current_kind, _, current_value = current.partition(":")
    if kind != current_kind or kind == "alive":
        return True  # cannot compare: trust liveness (only where no /proc and no psutil)
    if kind == "psutil":
        try:
            return abs(float(value) - float(current_value)) < 0.05
        except ValueError:
            return False
    return value == current_value


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``."""
    if _HAS_PROC:
        try:
            names = os.listdir("/proc")
        except OSError:
            names = []
        for name in names:
            if not name.isdigit():
                continue
            fields = _proc_fields(int(name))
            if fields and len(fields) > 2 and fields[0] not in ("Z", "X") and fields[2] == str(pgid):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# Signals that do not ask a process to end: sending one does not make the job "killed".
_NON_FATAL = {getattr(signal, name) for name in (
    "SIGSTOP", "SIGCONT", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGWINCH", "SIGUSR1", "SIGUSR2",
    "SIGCHLD", "SIGURG") if hasattr(signal, name)}


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        raise OpError(ErrorCode.PERMISSION_DENIED, "cannot signal process group %d: %s"
                      % (pgid, exc)) from None


def _shell() -> str:
    for candidate in ("/bin/bash", "/bin/sh"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("sh") or "/bin/sh"


# --- small file helpers ------------------------------------------------------------------------


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: str, value: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _file_size(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _pread(fd: int, size: int, offset: int) -> bytes:
    """Read exactly ``size`` bytes at ``offset`` unless the file ends first."""
    parts: List[bytes] = []
    while size > 0:
        data = os.pread(fd, min(size, 4 * MIB), offset)
        if not data:
            break
        parts.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(parts)


def _short(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


# File systems without hard links answer os.link with one of these.
_NO_LINKS = {getattr(errno, name) for name in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS",
                                               "EMLINK", "EXDEV") if hasattr(errno, name)}


def _claim_key(key_path: str, job_id: str) -> bool:
    """Claim an idempotency key file for ``job_id``; False when someone else holds it.

    The id is written to a temp file first and hard-linked into place, so the claim is
    exclusive and the key file is never seen empty: a crash or a full disk before the link
    leaves no claim at all. Raises OpError when the claim cannot be written.
    """
    tmp = os.path.join(os.path.dirname(key_path), ".%s.%s.tmp"
                       % (os.path.basename(key_path), secrets.token_hex(4)))
    try:
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(job_id)
        except OSError as exc:
            raise paths.os_error(exc, tmp) from None
        try:
            os.link(tmp, key_path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise paths.os_error(exc, key_path) from None
        # No hard links here: an exclusive create, then the id. A crash in between leaves an
        # empty key file, which _claimed clears once it is KEY_STALE_S old.
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise paths.os_error(exc, key_path) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(job_id)
        except OSError as exc:
            try:
                os.unlink(key_path)
            except OSError:
                pass
            raise paths.os_error(exc, key_path) from None
        return True
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


# --- argument helpers --------------------------------------------------------------------------


def _int_arg(args: Dict[str, Any], name: str, default: Any, low: int, high: int) -> Any:
    value = arg(args, name, int, default)
    if value is None:
        return None
    if not low <= value <= high:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "argument %r must be between %d and %d, got %d"
                      % (name, low, high, value))
    return value


def _float_arg(args: Dict[str, Any], name: str, default: float, low: float, high: float,
               clamp: bool = False) -> float:
    value = float(arg(args, name, float, default))
    if value != value or value < low or (value > high and not clamp):  # NaN fails too
        raise OpError(ErrorCode.INVALID_ARGUMENT, "argument %r must be between %g and %g, got %r"
                      % (name, low, high, value))
    return min(value, high)


def _env_arg(args: Dict[str, Any]) -> Dict[str, Optional[str]]:
    overrides = arg(args, "env_overrides", dict, {})
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or "=" in key or "\x00" in key:
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "env_overrides keys must be non-empty names without '=', got %r"
                          % (key,))
        if value is not None and (not isinstance(value, str) or "\x00" in value):
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "env_overrides[%r] must be a string (or null to unset), got %s"
                          % (key, type(value).__name__))
    return overrides


def _build_env(overrides: Dict[str, Optional[str]]) -> Dict[str, str]:
    env = dict(os.environ)
    # ipykernel's inline matplotlib backend means nothing outside the kernel.
    if env.get("MPLBACKEND", "").startswith("module://matplotlib_inline"):
        del env["MPLBACKEND"]
    env.setdefault("PYTHONUNBUFFERED", "1")  # live logs from Python jobs writing to a file
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _subscriber_arg(args: Dict[str, Any]) -> str:
    """Who follows: a client-chosen id, "" (the default) for clients that do not say."""
    subscriber = arg(args, "subscriber", str, "")
    if len(subscriber) > MAX_SUBSCRIBER_CHARS:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "subscriber must have at most %d chars"
                      % MAX_SUBSCRIBER_CHARS)
    return subscriber


def _command_arg(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise OpError(ErrorCode.INVALID_ARGUMENT, "%s must be a string, got %s"
                      % (name, type(value).__name__))
    if not value.strip():
        raise OpError(ErrorCode.INVALID_ARGUMENT, "%s is empty" % name)
    if "\x00" in value:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "%s contains a NUL byte" % name)
    return value


# --- the manager -------------------------------------------------------------------------------


class _Job:
    """One registry entry plus what this supervisor knows about it."""

    __slots__ = ("announced", "dir", "exit", "job_id", "killed", "meta", "popen", "state")

    def __init__(self, job_dir: str, meta: Dict[str, Any]):
        self.dir = job_dir
        self.meta = meta
        self.job_id: str = meta["job_id"]
        self.popen: Optional[subprocess.Popen] = None  # the wrapper, when we started it
        self.exit: Optional[Dict[str, Any]] = None
        self.killed: Optional[Dict[str, Any]] = None
        self.state = RUNNING
        self.announced = False  # a job_exit event went out for it


FollowKey = Tuple[str, str]  # (job_id, subscriber)


class _Follow:
    """A log subscription: bytes [acked, sent) are in flight, at most ``window`` of them."""

    __slots__ = ("acked", "gen", "job_id", "path", "progress_at", "sent", "subscriber",
                 "window")

    def __init__(self, job_id: str, subscriber: str, path: str):
        self.job_id = job_id
        self.subscriber = subscriber
        self.path = path
        self.sent = 0
        self.acked = 0
        self.window = DEFAULT_WINDOW
        self.gen = 0  # bumped on every (re)subscribe, so a stale read is dropped
        self.progress_at = time.monotonic()  # last (re)subscribe or ack that moved ``acked``

    @property
    def key(self) -> FollowKey:
        return (self.job_id, self.subscriber)


class _Waiter:
    """A ``job_wait`` in progress: settled by the pump when the job ends or time runs out."""

    __slots__ = ("deadline", "deferred", "job")

    def __init__(self, job: "_Job", deadline: float, deferred: Deferred):
        self.job = job
        self.deadline = deadline
        self.deferred = deferred


class JobManager:
    """Owns the registry, the job processes' bookkeeping and the follow pump."""

    def __init__(self, supervisor: Supervisor):
        self.sup = supervisor
        self.jobs_dir = os.path.join(supervisor.state_dir, "jobs")
        self.keys_dir = os.path.join(self.jobs_dir, "_keys")
        self._lock = threading.RLock()
        self._start_lock = threading.Lock()  # serialises starts (idempotency keys)
        self._jobs: Dict[str, _Job] = {}
        self._follows: Dict[FollowKey, _Follow] = {}
        self._waiters: List[_Waiter] = []
        self._unannounced: Dict[str, _Job] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pump: Optional[threading.Thread] = None
        self._last_refresh = 0.0
        self._fds: Dict[str, Tuple[str, int]] = {}  # pump thread only
        self._rr = 0
        self._scan()

    # --- registry ---------------------------------------------------------------------------

    def _scan(self) -> None:
        """Re-adopt what earlier supervisors started."""
        try:
            names = os.listdir(self.jobs_dir)
        except OSError:
            return
        with self._lock:
            for name in names:
                if _ID_RE.match(name) and name not in self._jobs:
                    job = self._load(name)
                    if job is not None:
                        self._refresh(job)
                        job.announced = job.state != RUNNING  # history is not news
                        self._unannounced.pop(job.job_id, None)
                        self._jobs[name] = job
        if self._running():
            self._ensure_pump()

    def _load(self, job_id: str) -> Optional[_Job]:
        job_dir = os.path.join(self.jobs_dir, job_id)
        meta = _read_json(os.path.join(job_dir, "job.json"))
        if meta is None or meta.get("job_id") != job_id or not isinstance(
                meta.get("log_path"), str):
            return None
        if meta.get("pid") is None:  # we died between spawning and recording: the wrapper knows
            pids = _read_json(os.path.join(job_dir, "pids.json")) or {}
            for key in ("pid", "pid_start", "wrapper_pid", "wrapper_start"):
                meta[key] = pids.get(key)
        return _Job(job_dir, meta)

    def _get(self, args: Dict[str, Any]) -> _Job:
        job_id = arg(args, "job_id", str)
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None and _ID_RE.match(job_id):
                job = self._load(job_id)  # started by another supervisor on this state dir
                if job is not None:
                    self._refresh(job)
                    job.announced = job.state != RUNNING
                    self._unannounced.pop(job.job_id, None)
                    self._jobs[job_id] = job
        if job is None:
            raise OpError(ErrorCode.NOT_FOUND, "no job with id %r" % _short(job_id),
                          {"job_id": _short(job_id)})
        return job

    def _refresh(self, job: _Job) -> None:
        """Recompute a job's state from disk and the process table. Call with the lock held."""
        if job.popen is not None and job.popen.poll() is not None:
            job.popen = None  # reaped: no zombie left behind
        if job.exit is not None and job.state != RUNNING:
            return  # final
        previous = job.state
        if job.exit is None:
            job.exit = _read_json(os.path.join(job.dir, "exit.json"))
        if job.killed is None:
            job.killed = _read_json(os.path.join(job.dir, "killed.json"))
        meta = job.meta
        if job.exit is not None:
            code = job.exit.get("exit_code")
            by_signal = job.exit.get("signal") is not None or (isinstance(code, int) and code < 0)
            job.state = KILLED if job.killed is not None or by_signal else EXITED
        elif (job.popen is not None
              or _same_process(meta.get("pid"), meta.get("pid_start"))
              or _same_process(meta.get("wrapper_pid"), meta.get("wrapper_start"))):
            job.state = RUNNING  # a live wrapper is about to write the exit record
        else:
            job.state = KILLED if job.killed is not None else LOST
        if previous == RUNNING and job.state != RUNNING and not job.announced:
            self._unannounced[job.job_id] = job
            self._wake.set()

    def _summary(self, job: _Job) -> Dict[str, Any]:
        meta = job.meta
        ended = job.exit or {}
        return {
            "job_id": job.job_id,
            "state": job.state,
            "pid": meta.get("pid"),
            "exit_code": ended.get("exit_code"),
            "signal": ended.get("signal"),
            "started_at": meta.get("started_at"),
            "ended_at": ended.get("ended_at"),
            "command": meta.get("command"),
            "cwd": meta.get("cwd"),
            "log_path": meta.get("log_path"),
            "bytes_written": _file_size(meta["log_path"]),
            "log_start_offset": meta.get("log_start_offset", 0),
            "name": meta.get("name"),
            "idempotency_key": meta.get("idempotency_key"),
        }

    def _running(self) -> List[_Job]:
        with self._lock:
            return [job for job in self._jobs.values() if job.state == RUNNING]

    def hello(self) -> Dict[str, Any]:
        with self._lock:
            for job in list(self._jobs.values()):
                self._refresh(job)
            live = sorted((j for j in self._jobs.values() if j.state == RUNNING),
                          key=lambda j: j.meta.get("started_at") or 0, reverse=True)
            return {"jobs": [self._summary(j) for j in live]}

    # --- start ------------------------------------------------------------------------------

    def op_start(self, req: Request) -> Dict[str, Any]:
        args = req.args
        command = _command_arg(arg(args, "command", str), "command")
        cwd = paths.resolve(self.sup.root_dir, arg(args, "cwd", str, ""))
        if not os.path.isdir(cwd):
            code = ErrorCode.NOT_A_DIRECTORY if os.path.exists(cwd) else ErrorCode.NOT_FOUND
            raise OpError(code, "cwd %s is not a directory" % cwd, {"path": cwd})
        overrides = _env_arg(args)
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
                existing = self._claimed(key_path, key, command)
                if isinstance(existing, dict):
                    return existing
                job_id = existing  # claimed by a start that died before spawning: finish it
            if job_id is None:
                job_id = self._new_id(key_path)
            return self._spawn(job_id, key_path, command, cwd, overrides, log_arg, key, name)

    def _claimed(self, key_path: str, key: str, command: str) -> Any:
        """The existing job's summary for a used key, its bare id if never started, or None."""
        try:
            with open(key_path, "rb") as f:
                st = os.fstat(f.fileno())
                job_id = f.read(256).decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise paths.os_error(exc, key_path) from None
        if not _ID_RE.match(job_id):
            # Empty or damaged: a claim in progress elsewhere, or one whose writer died.
            if time.time() - st.st_mtime < KEY_STALE_S:
                raise OpError(ErrorCode.BUSY, "idempotency key is being claimed by another "
                              "supervisor: retry")
            self._clear_stale_key(key_path, st)
            return None
        try:
            job = self._get({"job_id": job_id})
        except OpError:
            return job_id
        if job.meta.get("command") != command:
            raise OpError(ErrorCode.CONFLICT,
                          "idempotency_key %r was already used for job %s with another command"
                          % (_short(key), job_id), {"job_id": job_id})
        with self._lock:
            self._refresh(job)
            summary = self._summary(job)
        summary["reused"] = True
        return summary

    def _new_id(self, key_path: Optional[str]) -> str:
        for _ in range(100):
            job_id = "j" + secrets.token_hex(5)
            try:
                os.makedirs(os.path.join(self.jobs_dir, job_id))
            except FileExistsError:
                continue
            except OSError as exc:
                raise paths.os_error(exc, self.jobs_dir) from None
            if key_path is not None:
                try:
                    claimed = _claim_key(key_path, job_id)
                except BaseException:
                    os.rmdir(os.path.join(self.jobs_dir, job_id))
                    raise
                if not claimed:  # two supervisors racing on one key cannot both win
                    os.rmdir(os.path.join(self.jobs_dir, job_id))
                    raise OpError(ErrorCode.BUSY, "idempotency key is being claimed by another "
                                  "supervisor: retry")
            return job_id
        raise OpError(ErrorCode.INTERNAL, "could not allocate a job id")

    def _clear_stale_key(self, key_path: str, stale: os.stat_result) -> None:
        """Move aside a key file a dead start left empty or damaged, and only that file."""
        aside = "%s.stale-%s" % (key_path, secrets.token_hex(4))
        try:
            os.rename(key_path, aside)  # atomic: of two supervisors clearing it, one moves it
        except FileNotFoundError:
            return  # another supervisor cleared it first
        except OSError as exc:
            raise paths.os_error(exc, key_path) from None
        try:
            moved = os.stat(aside)
            if (moved.st_dev, moved.st_ino) != (stale.st_dev, stale.st_ino):
                # Someone cleared the stale file and claimed the key in between: that claim
                # is good, put it back (a link never replaces a newer one).
                try:
                    os.link(aside, key_path)
                except OSError:
                    pass
                raise OpError(ErrorCode.BUSY, "idempotency key is being claimed by another "
                              "supervisor: retry")
        finally:
            try:
                os.unlink(aside)
            except OSError:
                pass

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
            self._discard(job_dir, key_path)
            raise paths.os_error(exc, log_path) from None
        shell = _shell()
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
            "shell": shell,
            "started_at": time.time(),
            "supervisor": self.sup.instance_id,
            "pid": None,
            "pid_start": None,
            "wrapper_pid": None,
            "wrapper_start": None,
        }
        try:
            _write_json(os.path.join(job_dir, "job.json"), meta)
            python = sys.executable or shutil.which("python3") or "python3"
            popen = subprocess.Popen(
                [python, "-I", "-S", self._wrapper_file(), job_dir, shell, command],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_fd, cwd=cwd,
                env=_build_env(overrides), start_new_session=True, close_fds=True)
        except OSError as exc:
            self._discard(job_dir, key_path)
            raise OpError(ErrorCode.INTERNAL, "could not start job: %s" % exc) from None
        finally:
            os.close(log_fd)
        info = self._read_pids(popen)
        if popen.stdout is not None:
            popen.stdout.close()
        for field in ("pid", "pid_start", "wrapper_pid", "wrapper_start"):
            meta[field] = info.get(field)
        if meta["wrapper_pid"] is None:
            meta["wrapper_pid"] = popen.pid
        if not meta["pid_start"]:  # no /proc here: take the token ourselves
            meta["pid_start"] = _start_token(meta["pid"])
        if not meta["wrapper_start"]:
            meta["wrapper_start"] = _start_token(meta["wrapper_pid"])
        if "error" in info:
            meta["error"] = info["error"]
        _write_json(os.path.join(job_dir, "job.json"), meta)
        job = _Job(job_dir, meta)
        job.popen = popen
        with _WRAPPERS_LOCK:
            _WRAPPERS.append(popen)
        with self._lock:
            self._jobs[job_id] = job
            self._refresh(job)
            summary = self._summary(job)
        summary["reused"] = False
        self._ensure_pump()
        self._wake.set()
        return summary

    def _wrapper_file(self) -> str:
        digest = hashlib.sha256(_WRAPPER.encode("utf-8")).hexdigest()[:12]
        path = os.path.join(self.jobs_dir, "_wrapper-%s.py" % digest)
        if not os.path.exists(path):
            tmp = "%s.%d.tmp" % (path, os.getpid())
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(_WRAPPER)
            os.replace(tmp, path)
        return path

    def _read_pids(self, popen: subprocess.Popen) -> Dict[str, Any]:
        """The wrapper's one JSON line: pids and start tokens (or a start error)."""
        assert popen.stdout is not None
        fd = popen.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                break
            data = os.read(fd, 4096)
            if not data:
                break
            buf += data
        try:
            value = json.loads(buf.split(b"\n", 1)[0].decode("utf-8"))
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
        return {"error": "the job wrapper did not report its pid (see the log)"}

    def _discard(self, job_dir: str, key_path: Optional[str]) -> None:
        shutil.rmtree(job_dir, ignore_errors=True)
        if key_path is not None:
            try:
                os.unlink(key_path)
            except OSError:
                pass

    # --- status, list, wait, kill ---------------------------------------------------------------

    def op_status(self, req: Request) -> Dict[str, Any]:
        job = self._get(req.args)
        with self._lock:
            self._refresh(job)
            return self._summary(job)

    def op_list(self, req: Request) -> Dict[str, Any]:
        limit = _int_arg(req.args, "limit", 1000, 1, 100000)
        state = arg(req.args, "state", str, None)
        if state is not None and state not in (RUNNING, EXITED, KILLED, LOST):
            raise OpError(ErrorCode.INVALID_ARGUMENT, "state must be running, exited, killed "
                          "or lost, got %r" % _short(state))
        with self._lock:
            jobs = list(self._jobs.values())
            for job in jobs:
                self._refresh(job)
            if state is not None:
                jobs = [j for j in jobs if j.state == state]
            jobs.sort(key=lambda j: j.meta.get("started_at") or 0, reverse=True)
            return {"jobs": [self._summary(j) for j in jobs[:limit]], "total": len(jobs)}

    def op_wait(self, req: Request) -> Any:
        """The job's summary once it ends or ``timeout`` passes; holds no thread meanwhile."""
        job = self._get(req.args)
        timeout = _float_arg(req.args, "timeout", 60.0, 0.0, MAX_WAIT_S, clamp=True)
        with self._lock:
            self._refresh(job)
            if job.state != RUNNING or timeout <= 0 or self._stop.is_set():
                return self._wait_result(job)
            deferred = self.sup.defer(req)
            self._waiters.append(_Waiter(job, time.monotonic() + timeout, deferred))
        self._ensure_pump()
        self._wake.set()
        return deferred

    def _wait_result(self, job: _Job) -> Dict[str, Any]:
        """Call with the lock held."""
        summary = self._summary(job)
        summary["timed_out"] = summary["state"] == RUNNING
        return summary

    def _settle_waiters(self, everyone: bool) -> None:
        """Answer the waiters whose job ended or whose time is up (all of them on close)."""
        now = time.monotonic()
        ready = []
        with self._lock:
            if not self._waiters:
                return
            for job in {id(w.job): w.job for w in self._waiters}.values():
                self._refresh(job)  # once per job, however many wait for it
            keep = []
            for waiter in self._waiters:
                if everyone or waiter.job.state != RUNNING or now >= waiter.deadline:
                    ready.append((waiter, self._wait_result(waiter.job)))
                else:
                    keep.append(waiter)
            self._waiters = keep
        for waiter, summary in ready:
            waiter.deferred.resolve(summary)

    def op_kill(self, req: Request) -> Dict[str, Any]:
        job = self._get(req.args)
        sig = _int_arg(req.args, "signal", int(signal.SIGTERM), 1, int(signal.NSIG) - 1)
        grace = _float_arg(req.args, "grace", 5.0, 0.0, MAX_GRACE_S)
        pid = job.meta.get("pid")
        pgid = pid if isinstance(pid, int) and pid > 0 else 0  # the command leads its group
        signalled = escalated = False
        with self._lock:
            self._refresh(job)
            running = job.state == RUNNING
            ours = _same_process(pgid, job.meta.get("pid_start"))
            fatal = sig not in _NON_FATAL
            if running and ours and fatal and job.killed is None:
                job.killed = {"signal": sig, "at": time.time()}
                _write_json(os.path.join(job.dir, "killed.json"), job.killed)
        if pgid:
            if running and ours:
                signalled = _killpg(pgid, sig)
            elif _start_token(pgid) is None and _group_alive(pgid):
                # The leader is gone but children it left live on in its group (no process
                # can create a group with this id while the leader's pid is free): end them.
                signalled = _killpg(pgid, sig)
        if signalled and sig == signal.SIGTERM:
            deadline = time.monotonic() + grace
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(pgid):
                escalated = _killpg(pgid, signal.SIGKILL)
        if signalled and fatal:  # let the wrapper record the end: the reply has the final state
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                with self._lock:
                    self._refresh(job)
                    if job.state != RUNNING:
                        break
                time.sleep(0.02)
        with self._lock:
            self._refresh(job)
            summary = self._summary(job)
        summary["signalled"] = signalled
        summary["escalated"] = escalated
        return summary

    # --- tail -------------------------------------------------------------------------------

    def op_tail(self, req: Request) -> Result:
        job = self._get(req.args)
        args = req.args
        offset = _int_arg(args, "offset", None, 0, 1 << 62)
        lines = _int_arg(args, "lines", None, 0, MAX_TAIL_LINES)
        max_bytes = _int_arg(args, "max_bytes", DEFAULT_TAIL_BYTES, 0, MAX_TAIL_BYTES)
        if offset is not None and lines is not None:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "give either lines or offset, not both")
        if offset is None and lines is None:
            lines = DEFAULT_TAIL_LINES
        path = job.meta["log_path"]
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
                start, truncated = _tail_start(fd, size, lines, max_bytes)
            data = _pread(fd, end - start, start) if end > start else b""
        finally:
            os.close(fd)
        with self._lock:
            self._refresh(job)
            state = job.state
        value = {"job_id": job.job_id, "offset_start": start, "offset_end": start + len(data),
                 "size": size, "truncated": truncated, "state": state}
        return Result(value, [data])

    # --- follow -----------------------------------------------------------------------------

    def op_follow(self, req: Request) -> Dict[str, Any]:
        job = self._get(req.args)
        subscriber = _subscriber_arg(req.args)
        offset = _int_arg(req.args, "offset", 0, 0, 1 << 62)
        window = _int_arg(req.args, "window", DEFAULT_WINDOW, 1, 1 << 40)
        window = max(MIN_WINDOW, min(MAX_WINDOW, window))
        with self._lock:
            self._refresh(job)
            key = (job.job_id, subscriber)
            sub = self._follows.get(key)
            if sub is None:
                sub = _Follow(job.job_id, subscriber, job.meta["log_path"])
                self._follows[key] = sub
            sub.gen += 1
            sub.sent = sub.acked = offset
            sub.window = window
            sub.progress_at = time.monotonic()
            state = job.state
        self._ensure_pump()
        self._wake.set()
        return {"job_id": job.job_id, "subscriber": subscriber, "offset": offset,
                "window": window, "size": _file_size(job.meta["log_path"]), "state": state}

    def op_follow_ack(self, req: Request) -> Dict[str, Any]:
        job = self._get(req.args)
        subscriber = _subscriber_arg(req.args)
        offset = _int_arg(req.args, "offset", None, 0, 1 << 62)
        if offset is None:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "missing required argument 'offset'")
        with self._lock:
            sub = self._follows.get((job.job_id, subscriber))
            if sub is None:
                return {"job_id": job.job_id, "subscriber": subscriber, "followed": False}
            acked = max(sub.acked, min(offset, sub.sent))
            if acked > sub.acked:
                sub.acked = acked
                sub.progress_at = time.monotonic()
            result = {"job_id": job.job_id, "subscriber": subscriber, "followed": True,
                      "acked": sub.acked, "sent": sub.sent}
        self._wake.set()
        return result

    def op_unfollow(self, req: Request) -> Dict[str, Any]:
        job = self._get(req.args)
        subscriber = _subscriber_arg(req.args)
        with self._lock:
            sub = self._follows.pop((job.job_id, subscriber), None)
        self._wake.set()
        return {"job_id": job.job_id, "subscriber": subscriber, "followed": sub is not None}

    # --- the pump -----------------------------------------------------------------------------

    def _ensure_pump(self) -> None:
        with self._lock:
            if self._pump is not None or self._stop.is_set():
                return
            self._pump = threading.Thread(target=self._pump_loop, name="tether-jobs",
                                          daemon=True)
            self._pump.start()

    def _pump_loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                emitted = False
                try:
                    emitted = self._tick()
                except Exception:  # keep pumping: one bad tick must not end all follows
                    self.sup.counters["jobs_pump_errors"] += 1
                try:
                    self._settle_waiters(everyone=False)
                except Exception:
                    self.sup.counters["jobs_pump_errors"] += 1
                with self._lock:
                    if self._follows:
                        delay = FOLLOW_TICK_S if emitted else FOLLOW_POLL_S
                    elif self._unannounced or _WRAPPERS or any(
                            j.state == RUNNING for j in self._jobs.values()):
                        delay = WATCH_TICK_S
                    else:
                        delay = IDLE_TICK_S
                    if self._waiters:
                        nearest = min(w.deadline for w in self._waiters) - time.monotonic()
                        delay = max(0.0, min(delay, WAIT_TICK_S, nearest))
                self._wake.wait(delay)
        finally:
            for _, fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._settle_waiters(everyone=True)

    def _fd_for(self, sub: _Follow) -> Optional[int]:
        cached = self._fds.get(sub.job_id)
        if cached is not None and cached[0] == sub.path:
            return cached[1]
        if cached is not None:
            os.close(cached[1])
            del self._fds[sub.job_id]
        try:
            fd = os.open(sub.path, os.O_RDONLY)
        except OSError:
            return None
        self._fds[sub.job_id] = (sub.path, fd)
        return fd

    def _tick(self) -> bool:
        """One pump round; True when it published log bytes."""
        # 1. States first: a job seen finished here has written all its bytes before the
        #    reads below, so "finished and everything sent" is safe to announce.
        with _WRAPPERS_LOCK:
            _WRAPPERS[:] = [p for p in _WRAPPERS if p.poll() is None]
        now = time.monotonic()
        refresh_all = now - self._last_refresh >= WATCH_TICK_S / 2
        with self._lock:
            if refresh_all:
                self._last_refresh = now
            # A subscription stuck on a full window with no ack for long has no follower.
            for key, sub in list(self._follows.items()):
                if sub.sent - sub.acked >= sub.window and now - sub.progress_at > FOLLOW_STALL_S:
                    del self._follows[key]
                    self.sup.counters["jobs_follows_expired"] += 1
            # Followed jobs every tick (their end decides when a follow is drained); the rest
            # at the watch rate, so fast polling stays cheap (waited-for jobs: _settle_waiters).
            followed = {sub.job_id for sub in self._follows.values()}
            for job in self._jobs.values():
                if job.state == RUNNING and (refresh_all or job.job_id in followed):
                    self._refresh(job)
            work = []
            for sub in self._follows.values():
                followed_job = self._jobs.get(sub.job_id)
                if followed_job is not None:
                    work.append((sub, sub.gen, sub.sent, sub.window - (sub.sent - sub.acked),
                                 followed_job.state != RUNNING))
        # 2. Read outside the lock, at most TICK_BYTES in all, round-robin for fairness.
        followed = {w[0].job_id for w in work}
        for job_id in [j for j in self._fds if j not in followed]:
            os.close(self._fds.pop(job_id)[1])
        if work:
            start = self._rr % len(work)
            self._rr += 1
            work = work[start:] + work[:start]
        budget = TICK_BYTES
        reads = []
        for sub, gen, offset, allowed, finished in work:
            fd = self._fd_for(sub)
            size: Optional[int] = None
            data = b""
            if fd is not None:
                size = os.fstat(fd).st_size
                count = min(size - offset, allowed, budget)
                if count > 0:
                    data = _pread(fd, count, offset)
                    budget -= len(data)
            reads.append((sub, gen, offset, data, size, finished))
        # 3. Commit and publish; a subscription reset meanwhile makes its read stale.
        with self._lock:
            chunks: List[Dict[str, Any]] = []
            blobs: List[bytes] = []
            done = []
            for sub, gen, offset, data, size, finished in reads:
                if self._follows.get(sub.key) is not sub or sub.gen != gen:
                    continue
                for piece in range(0, len(data), CHUNK_BYTES):
                    blob = data[piece:piece + CHUNK_BYTES]
                    chunks.append({"job_id": sub.job_id, "subscriber": sub.subscriber,
                                   "offset": offset + piece, "length": len(blob)})
                    blobs.append(blob)
                sub.sent = offset + len(data)
                if finished and (size is None or sub.sent >= size):
                    done.append((sub, size))
            if chunks:
                self.sup.emit("log", {"chunks": chunks}, blobs)
            for sub, size in done:
                # Each drained subscription hears the end, after all of its bytes.
                del self._follows[sub.key]
                self._emit_exit(self._jobs[sub.job_id], size, sub.subscriber)
            followed = {sub.job_id for sub in self._follows.values()}
            for job in list(self._unannounced.values()):
                if job.job_id not in followed:
                    self._emit_exit(job, _file_size(job.meta["log_path"]))
        return bool(chunks)

    def _emit_exit(self, job: _Job, size: Optional[int],
                   subscriber: Optional[str] = None) -> None:
        ended = job.exit or {}
        body = {"job_id": job.job_id, "state": job.state, "exit_code": ended.get("exit_code"),
                "ended_at": ended.get("ended_at"), "size": size}
        if subscriber is not None:
            body["subscriber"] = subscriber  # the drained subscription it ends
        self.sup.emit("job_exit", body)
        job.announced = True
        self._unannounced.pop(job.job_id, None)

    def close(self) -> None:
        """Stop the pump. Jobs are separate processes and keep running."""
        self._stop.set()
        self._wake.set()
        pump = self._pump
        if pump is not None and pump is not threading.current_thread():
            pump.join(timeout=5.0)
        self._settle_waiters(everyone=True)  # no pump ever ran, or it is stuck: answer anyway


def _tail_start(fd: int, size: int, lines: int, max_bytes: int) -> Tuple[int, bool]:
    """Start offset of the last ``lines`` lines, scanning back in blocks; and whether
    ``max_bytes`` cut it short. A last line without a newline counts as a line."""
    if lines <= 0 or size == 0:
        return size, False
    limit = max(0, size - max_bytes)
    # A trailing newline ends the last line; it does not begin another one.
    pos = size - 1 if _pread(fd, 1, size - 1) == b"\n" else size
    need = lines
    block = 64 * KIB
    while pos > limit:
        count = min(block, pos - limit)
        data = _pread(fd, count, pos - count)
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


# --- run_commands ------------------------------------------------------------------------------


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
        proc = subprocess.Popen([_shell(), "-c", command], cwd=cwd, env=env,
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
    args = req.args
    commands = arg(args, "commands", list)
    if len(commands) > 10000:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "too many commands (%d)" % len(commands))
    for index, command in enumerate(commands):
        _command_arg(command, "commands[%d]" % index)
    cwd = paths.resolve(root_dir, arg(args, "cwd", str, ""))
    if not os.path.isdir(cwd):
        code = ErrorCode.NOT_A_DIRECTORY if os.path.exists(cwd) else ErrorCode.NOT_FOUND
        raise OpError(code, "cwd %s is not a directory" % cwd, {"path": cwd})
    env = _build_env(_env_arg(args))
    timeout = _float_arg(args, "timeout_s_per_command", DEFAULT_COMMAND_TIMEOUT_S, 0.001,
                         MAX_COMMAND_TIMEOUT_S)
    fail_fast = arg(args, "fail_fast", bool, True)
    cap = _int_arg(args, "max_output_chars", DEFAULT_MAX_OUTPUT_CHARS, 0, MAX_OUTPUT_CHARS)
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


# --- registration ------------------------------------------------------------------------------


def register(supervisor: Supervisor) -> None:
    """Create the job manager (re-adopting earlier jobs) and register its ops."""
    manager = JobManager(supervisor)
    supervisor.register("job_start", manager.op_start, blocking=True)
    supervisor.register("job_status", manager.op_status)
    supervisor.register("job_list", manager.op_list)
    supervisor.register("job_tail", manager.op_tail, blocking=True)
    # Not blocking: a wait is settled by the pump and holds no worker (see op_wait).
    supervisor.register("job_wait", manager.op_wait)
    supervisor.register("job_kill", manager.op_kill, blocking=True)
    supervisor.register("job_follow", manager.op_follow)
    supervisor.register("job_follow_ack", manager.op_follow_ack)
    supervisor.register("job_unfollow", manager.op_unfollow)
    supervisor.register("run_commands", lambda req: op_run_commands(supervisor.root_dir, req),
                        blocking=True)
    supervisor.add_hello_extra(manager.hello)
    supervisor.add_closer(manager.close)
