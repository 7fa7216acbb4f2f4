"""The job wrapper: a tiny Python script that starts a job's command and records its end.

The wrapper runs in a new session (``start_new_session``); the command runs in its own
process group inside it, so ``killpg`` on the job never hits the wrapper, which then records
the exit code, end time, and the peak RSS and CPU time of the tree it reaped (getrusage)
in the job's registry folder even when the supervisor (or its kernel) is gone. stdout and
stderr are appended straight to the log file: no pipe ties the job to us but the one JSON
line that reports its pids.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from .fsutil import wait_ready

START_TIMEOUT_S = 15.0
STANDBY_IDLE_S = 600.0  # a warm wrapper no job took by then exits

# Wrappers we started and have not reaped yet, kept across supervisors of this module so
# that none is left a zombie of the kernel (the pump of any live manager reaps them).
_WRAPPERS: List[subprocess.Popen] = []
_WRAPPERS_LOCK = threading.Lock()

# Runs as ``python -I -S <jobs_dir>/_wrapper-<hash>.py job_dir shell command`` (a file, so
# ``ps`` stays readable) with the job's cwd and env, stderr on the log file and stdout on a
# pipe that carries one JSON line back to us. Python >= 3.8, standard library only.
# Signals sent to the wrapper itself go on to the job's group.
# Until that line is out only builtin modules are imported (json and subprocess would add
# ~15 ms to every job start): the command is spawned with posix_spawn (fork+exec where
# there is none) and the line is written by hand; json comes after, off the start path.
# ``--standby IDLE_S`` starts one ahead of its job (``Starter``): it waits on stdin for the
# job as one JSON line (job_dir, shell, command, cwd, env, log_path), then opens the log
# as its stderr, goes to the cwd and goes on as above; with nothing for IDLE_S, it exits.
WRAPPER = r"""
import os, signal, sys, time
env = os.environ
if sys.argv[1] == "--standby":
    import json, select
    ready, _, _ = select.select([0], [], [], float(sys.argv[2]))
    line = sys.stdin.readline() if ready else ""
    if not line:
        sys.exit(0)
    spec = json.loads(line)
    job_dir, shell, command, env = spec["job_dir"], spec["shell"], spec["command"], spec["env"]
    try:
        fd = os.open(spec["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
        os.chdir(spec["cwd"])
    except OSError as exc:
        failed = exc
    else:
        failed = None
else:
    job_dir, shell, command = sys.argv[1], sys.argv[2], sys.argv[3]
    failed = None
def put(name, text):
    tmp = os.path.join(job_dir, "." + name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(job_dir, name))
def token(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        return "proc:" + data[data.rfind(b")") + 2:].split()[19].decode("ascii")
    except Exception:
        return None
def js(value):  # ints and tokens (digits) only: what the pids line holds
    return "null" if value is None else '"%s"' % value if isinstance(value, str) else str(value)
child = None
def forward(signum, frame):
    if child is not None:
        try:
            os.killpg(child, signum)
        except OSError:
            pass
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)
argv = [shell, "-c", command]
try:
    if failed is not None:
        raise failed
    if hasattr(os, "posix_spawn"):
        # SIGPIPE back to its default, as subprocess does: `yes | head` must end quietly.
        child = os.posix_spawn(shell, argv, env, setpgroup=0, setsigdef=(
            signal.SIGPIPE,), file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, 2, 1)])
    else:
        pid = os.fork()
        if pid == 0:
            try:
                os.setpgid(0, 0)
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.dup2(2, 1)
                os.execve(shell, argv, env)
            finally:
                os._exit(127)
        child = pid
except Exception as exc:
    import json
    sys.stderr.write("jupyter-tether: could not start the job: %s\n" % exc)
    put("exit.json", json.dumps({"exit_code": 127, "signal": None, "ended_at": time.time(),
                                 "error": str(exc)}))
    sys.stdout.write(json.dumps({"error": str(exc)}) + "\n")
    sys.exit(0)
info = (("pid", child), ("pid_start", token(child)), ("wrapper_pid", os.getpid()),
        ("wrapper_start", token(os.getpid())))
line = "{" + ", ".join('"%s": %s' % (k, js(v)) for k, v in info) + "}"
put("pids.json", line)
sys.stdout.write(line + "\n")
sys.stdout.flush()
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
import json
while True:
    try:
        _, status = os.waitpid(child, 0)
        break
    except InterruptedError:
        continue
rc = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else (
    -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
ended = {"exit_code": rc, "signal": -rc if rc < 0 else None, "ended_at": time.time()}
try:  # the reaped tree: its largest process's peak RSS (KiB on Linux) and CPU time
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    ended["max_rss"] = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    ended["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
except Exception:
    pass
put("exit.json", json.dumps(ended))
"""


def wrapper_file(jobs_dir: str) -> str:
    """The wrapper script's path under ``jobs_dir``, written there once per version."""
    digest = hashlib.sha256(WRAPPER.encode("utf-8")).hexdigest()[:12]
    path = os.path.join(jobs_dir, "_wrapper-%s.py" % digest)
    if not os.path.exists(path):
        tmp = "%s.%d.tmp" % (path, os.getpid())
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(WRAPPER)
        os.replace(tmp, path)
    return path


def _python() -> str:
    return sys.executable or shutil.which("python3") or "python3"


def start(jobs_dir: str, job_dir: str, shell: str, command: str, cwd: str,
          env: Dict[str, str], log_fd: int) -> subprocess.Popen:
    """Start the wrapper for one job (raises OSError); read its pids with ``read_pids``."""
    return subprocess.Popen(
        [_python(), "-I", "-S", wrapper_file(jobs_dir), job_dir, shell, command],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_fd, cwd=cwd,
        env=env, start_new_session=True, close_fds=True)


class Starter:
    """Starts job wrappers, one kept warm after the first start: a wrapper started ahead
    (``--standby``) takes its job in ~2 ms instead of a Python start (~10-20 ms)."""

    def __init__(self, jobs_dir: str, idle_s: float = STANDBY_IDLE_S):
        self.jobs_dir = jobs_dir
        self.idle_s = idle_s
        self._lock = threading.Condition()
        self._standby: Optional[subprocess.Popen] = None
        self._filling = False
        self._closed = False

    def start(self, job_dir: str, shell: str, command: str, cwd: str, env: Dict[str, str],
              log_path: str, log_fd: int) -> subprocess.Popen:
        """The wrapper for one job, running it (raises OSError); then ``read_pids``."""
        popen = self._take()
        if popen is not None:
            line = json.dumps({"job_dir": job_dir, "shell": shell, "command": command,
                               "cwd": cwd, "env": env, "log_path": log_path}) + "\n"
            try:
                assert popen.stdin is not None
                popen.stdin.write(line.encode("utf-8"))
                popen.stdin.close()
            except OSError:  # it gave up waiting just now: start one the usual way
                _discard(popen)
                popen = None
        if popen is None:
            popen = start(self.jobs_dir, job_dir, shell, command, cwd, env, log_fd)
        self._refill()
        return popen

    def _take(self) -> Optional[subprocess.Popen]:
        with self._lock:
            # One being started is still sooner than starting another (a few ms, not ~15).
            self._lock.wait_for(lambda: not self._filling, timeout=1.0)
            popen, self._standby = self._standby, None
        if popen is not None and popen.poll() is not None:
            _discard(popen)  # it waited too long and left
            return None
        return popen

    def _refill(self) -> None:
        with self._lock:
            if self._closed or self._filling or self._standby is not None:
                return
            self._filling = True
        threading.Thread(target=self._fill, name="tether-job-standby", daemon=True).start()

    def _fill(self) -> None:
        popen: Optional[subprocess.Popen] = None
        try:
            popen = subprocess.Popen(
                [_python(), "-I", "-S", wrapper_file(self.jobs_dir), "--standby",
                 str(self.idle_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, cwd=self.jobs_dir, start_new_session=True,
                close_fds=True)
        except OSError:
            pass  # the next start goes the usual way
        with self._lock:
            self._filling = False
            if popen is not None and not self._closed and self._standby is None:
                self._standby, popen = popen, None
            self._lock.notify_all()
        if popen is not None:
            _discard(popen)

    def close(self) -> None:
        """End the waiting wrapper (EOF on its stdin), if any."""
        with self._lock:
            self._closed = True
            popen, self._standby = self._standby, None
        if popen is not None:
            _discard(popen)


def _discard(popen: subprocess.Popen) -> None:
    """Let an unused standby go: EOF makes it exit; the pump reaps it."""
    for pipe in (popen.stdin, popen.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
    adopt(popen)


def read_pids(popen: subprocess.Popen) -> Dict[str, Any]:
    """The wrapper's one JSON line: pids and start tokens (or a start error)."""
    assert popen.stdout is not None
    fd = popen.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + START_TIMEOUT_S
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if not wait_ready(fd, timeout=remaining):
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


def adopt(popen: subprocess.Popen) -> None:
    """Keep ``popen`` until it is reaped (by ``reap``, from any live manager's pump)."""
    with _WRAPPERS_LOCK:
        _WRAPPERS.append(popen)


def reap() -> None:
    """Reap the wrappers that ended, so none is left a zombie of the kernel."""
    with _WRAPPERS_LOCK:
        _WRAPPERS[:] = [p for p in _WRAPPERS if p.poll() is None]


def unreaped() -> bool:
    """Whether a wrapper we started may still be running."""
    return bool(_WRAPPERS)
