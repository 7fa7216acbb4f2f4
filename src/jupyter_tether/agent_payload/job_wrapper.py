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
import select
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List

START_TIMEOUT_S = 15.0

# Wrappers we started and have not reaped yet, kept across supervisors of this module so
# that none is left a zombie of the kernel (the pump of any live manager reaps them).
_WRAPPERS: List[subprocess.Popen] = []
_WRAPPERS_LOCK = threading.Lock()

# Runs as ``python -I -S <jobs_dir>/_wrapper-<hash>.py job_dir shell command`` (a file, so
# ``ps`` stays readable) with the job's cwd and env, stderr on the log file and stdout on a
# pipe that carries one JSON line back to us. Python >= 3.5, standard library only.
# Signals sent to the wrapper itself go on to the job's group.
WRAPPER = r"""
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
ended = {"exit_code": rc, "signal": -rc if rc < 0 else None, "ended_at": time.time()}
try:  # the reaped tree: its largest process's peak RSS (KiB on Linux) and CPU time
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    ended["max_rss"] = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    ended["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
except Exception:
    pass
put("exit.json", ended)
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


def start(jobs_dir: str, job_dir: str, shell: str, command: str, cwd: str,
          env: Dict[str, str], log_fd: int) -> subprocess.Popen:
    """Start the wrapper for one job (raises OSError); read its pids with ``read_pids``."""
    python = sys.executable or shutil.which("python3") or "python3"
    return subprocess.Popen(
        [python, "-I", "-S", wrapper_file(jobs_dir), job_dir, shell, command],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_fd, cwd=cwd,
        env=env, start_new_session=True, close_fds=True)


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
