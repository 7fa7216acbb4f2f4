"""Why a job ended badly, from its exit record, our kill record, its log's last lines and its
peak memory: one ``reason`` ({kind, message, hint}) an agent can act on. Pure: no I/O.

Kinds: ``lost``, ``start_failed``, ``killed_by_user``, ``timeout``, ``cuda_out_of_memory``,
``oom_killed`` (SIGKILL with the peak near the RAM limit), ``sigkill`` (SIGKILL from outside,
peak not near the limit), ``out_of_memory`` (an allocation failed: MemoryError,
``ulimit -v``, bad_alloc), ``traceback`` (a Python exception: its last line),
``command_not_found``, ``not_executable``, ``crashed`` (SIGSEGV, SIGBUS, SIGILL, SIGFPE),
``aborted``, ``terminated``, ``signal`` and ``exit_code``.
"""

import signal
from typing import Any, Dict, List, Optional

# A SIGKILLed job whose peak RSS reached this share of the RAM limit: the OOM killer.
OOM_NEAR_FRACTION = 0.7
MAX_MESSAGE_CHARS = 300

TRACEBACK = "Traceback (most recent call last):"
_CUDA_OOM = ("cuda out of memory", "cuda_error_out_of_memory", "cudaerrormemoryallocation",
             "cublas_status_alloc_failed", "resource_exhausted: out of memory",
             "out of memory on device", "hip out of memory")
_HOST_OOM = ("memoryerror", "cannot allocate memory", "unable to allocate", "std::bad_alloc",
             "out of memory", "outofmemoryerror", "memory exhausted")
_CRASH = ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE")
_STOP = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")

HINTS = {
    "lost": "its processes are gone and no exit was recorded (the machine or container was "
            "restarted?): start it again",
    "start_failed": "the command could not be started: check the shell and the cwd",
    "killed_by_user": "it was stopped with a kill request",
    "timeout": "it ran past its time limit: give it longer, or make it faster",
    "cuda_out_of_memory": "the GPU ran out of memory: use a smaller batch or model, mixed "
                          "precision or gradient checkpointing, or free the GPU memory other "
                          "jobs hold (jupyter_resources shows it by job)",
    "oom_killed": "the kernel's out-of-memory killer ended it: use less RAM (smaller batches, "
                  "fewer workers, streaming the data) or a machine with more",
    "sigkill": "SIGKILL came from outside jupyter-tether: often the out-of-memory killer "
               "(check its peak RSS against the RAM), or someone ran kill -9",
    "out_of_memory": "an allocation failed (RAM or a memory limit such as ulimit -v): use "
                     "less memory, or raise the limit",
    "traceback": "Python raised this exception: read the traceback at the end of its log",
    "command_not_found": "the shell did not find the program: check its name and PATH on the "
                         "remote, or install it first",
    "not_executable": "the file is not executable: chmod +x it, or run it with its "
                      "interpreter (python script.py)",
    "crashed": "the process crashed (native code): look at the log's last lines; a library "
               "version mismatch is a common cause",
    "aborted": "the process aborted itself (a failed assertion or a fatal error in native "
               "code): look at the log's last lines",
    "terminated": "a signal from outside jupyter-tether stopped it (the machine shutting "
                  "down, a scheduler, or someone's kill)",
    "signal": "a signal from outside jupyter-tether ended it",
    "exit_code": "it exited with an error: read the last lines of its log",
}


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "signal %d" % number


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def traceback_line(lines: List[str]) -> Optional[str]:
    """The exception line of the last Python traceback in ``lines`` (None if there is none).

    A prefix before the header (``[rank0]: `` from torchrun, a logger's) is stripped from
    the lines after it too.
    """
    for index in range(len(lines) - 1, -1, -1):
        at = lines[index].find(TRACEBACK)
        if at < 0:
            continue
        prefix = lines[index][:at]
        for line in lines[index + 1:]:
            if prefix and line.startswith(prefix):
                line = line[len(prefix):]
            if line.strip() and not line[0].isspace():
                return _short(line)
        return None
    return None


def _find(lines: List[str], needles: Any) -> Optional[str]:
    """The last line that holds one of ``needles`` (lower case)."""
    for line in reversed(lines):
        low = line.lower()
        if any(needle in low for needle in needles):
            return _short(line)
    return None


def _last_line(lines: List[str]) -> Optional[str]:
    for line in reversed(lines):
        if line.strip():
            return _short(line)
    return None


def _ending_signal(exit_record: Dict[str, Any]) -> Optional[int]:
    """The signal that ended it: recorded, a negative returncode, or a shell's 128+N."""
    sig = exit_record.get("signal")
    code = exit_record.get("exit_code")
    if isinstance(sig, int) and sig > 0:
        return sig
    if isinstance(code, int) and code < 0:
        return -code
    if isinstance(code, int) and 128 < code <= 128 + 64:
        return code - 128
    return None


def _mib(value: float) -> str:
    return "%.0f MiB" % (value / 1048576.0)


def _reason(kind: str, message: str) -> Dict[str, str]:
    return {"kind": kind, "message": _short(message), "hint": HINTS[kind]}


def classify(state: str, exit_record: Optional[Dict[str, Any]],
             killed: Optional[Dict[str, Any]], log_tail: str,
             rss_peak: Optional[int] = None,
             ram_limit: Optional[int] = None) -> Optional[Dict[str, str]]:
    """The reason a job ended badly, or None when it is running or exited with code 0."""
    if state == "running":
        return None
    if state == "lost":
        return _reason("lost", "no exit record: the job's processes vanished")
    ended = exit_record or {}
    code = ended.get("exit_code")
    sig = _ending_signal(ended)
    if killed is not None:
        by = killed.get("by") or "user"
        number = killed.get("signal")
        name = signal_name(number) if isinstance(number, int) else "a signal"
        if by == "timeout":
            return _reason("timeout", "stopped by %s after its time limit" % name)
        return _reason("killed_by_user", "stopped by a kill request (%s)" % name)
    if ended.get("error"):
        return _reason("start_failed", "could not start: %s" % ended["error"])
    if code == 0 and sig is None:
        return None
    lines = log_tail.splitlines()
    found = _find(lines, _CUDA_OOM)
    if found:
        return _reason("cuda_out_of_memory", found)
    if sig == signal.SIGKILL:
        peak = rss_peak or 0
        if ram_limit and peak >= OOM_NEAR_FRACTION * ram_limit:
            return _reason("oom_killed", "killed by SIGKILL with its peak RSS at %s of %s RAM"
                           % (_mib(peak), _mib(ram_limit)))
        detail = " (peak RSS %s of %s RAM)" % (_mib(peak), _mib(ram_limit)) \
            if peak and ram_limit else ""
        return _reason("sigkill", "killed by SIGKILL, not by jupyter-tether%s" % detail)
    exception = traceback_line(lines)
    if exception is not None:
        kind = "out_of_memory" if any(n in exception.lower() for n in _HOST_OOM) \
            else "traceback"
        return _reason(kind, exception)
    found = _find(lines, _HOST_OOM)
    if found:
        return _reason("out_of_memory", found)
    if code == 127:
        return _reason("command_not_found", _find(lines, ("not found", "no such file"))
                       or "exit code 127: command not found")
    if code == 126:
        return _reason("not_executable", _find(lines, ("permission denied", "cannot execute"))
                       or "exit code 126: not executable")
    if code == 124:
        return _reason("timeout", "exit code 124: `timeout` ended it")
    if sig is not None:
        name = signal_name(sig)
        kind = "crashed" if name in _CRASH else "aborted" if name == "SIGABRT" else \
            "terminated" if name in _STOP else "signal"
        last = _last_line(lines)
        return _reason(kind, "killed by %s%s" % (name, ": " + last if last else ""))
    last = _last_line(lines)
    return _reason("exit_code", "exited with code %s%s" % (code, ": " + last if last else ""))
