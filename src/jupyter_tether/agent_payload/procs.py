"""Processes of jobs: identity that survives pid reuse, process groups, shell and environment.

A process is identified by pid plus a start token (``/proc/<pid>/stat`` starttime, or
psutil's create_time), so a recycled pid is never mistaken for a job.
"""

import os
import shutil
import signal
from typing import Any, Dict, List, Optional

from .wire import ErrorCode, OpError

try:  # psutil is optional: /proc covers Linux, psutil covers macOS and friends.
    import psutil as _psutil
except ImportError:  # pragma: no cover - depends on the remote environment
    _psutil = None

_HAS_PROC = os.path.exists("/proc/self/stat")


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


def start_token(pid: Optional[int]) -> Optional[str]:
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


def same_process(pid: Any, token: Any) -> bool:
    """Whether ``pid`` is alive and is the very process that ``token`` was taken from."""
    if not isinstance(pid, int) or not isinstance(token, str):
        return False
    current = start_token(pid)
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


def group_alive(pgid: int) -> bool:
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
NON_FATAL = {getattr(signal, name) for name in (
    "SIGSTOP", "SIGCONT", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGWINCH", "SIGUSR1", "SIGUSR2",
    "SIGCHLD", "SIGURG") if hasattr(signal, name)}


def killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        raise OpError(ErrorCode.PERMISSION_DENIED, "cannot signal process group %d: %s"
                      % (pgid, exc)) from None


def shell() -> str:
    """The shell jobs and commands run in: bash where there is one."""
    for candidate in ("/bin/bash", "/bin/sh"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("sh") or "/bin/sh"


def build_env(overrides: Dict[str, Optional[str]]) -> Dict[str, str]:
    """The kernel's environment for a child process, with ``overrides`` (None unsets)."""
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
