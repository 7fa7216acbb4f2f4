"""The job registry on disk: which jobs exist, their state, and who holds which idempotency key.

Under ``<state_dir>/jobs/``::

    <job_id>/job.json     what was started: command, cwd, log path, pids + start tokens
    <job_id>/pids.json    written by the wrapper as soon as the command runs
    <job_id>/exit.json    written by the wrapper when the command ends
    <job_id>/killed.json  written by us before we signal the job
    _keys/<sha256(key)>   idempotency key -> job_id, claimed by hard-linking a complete
                          temp file into place (exclusive, and never seen empty)

A job's state is recomputed from these files and the process table (see procs), so jobs
started by an earlier supervisor, or another one on the same state folder, are re-adopted.
"""

import errno
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import paths
from .procs import same_process
from .wire import ErrorCode, OpError, arg

RUNNING = "running"
EXITED = "exited"
KILLED = "killed"
LOST = "lost"
STATES = (RUNNING, EXITED, KILLED, LOST)

# A key file still empty or unreadable after this long was left by a start that died while
# claiming it (older payloads wrote the id after an O_EXCL create): it is cleared and reused.
KEY_STALE_S = 5.0

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: str, value: Dict[str, Any]) -> None:
    """Write a registry record whole (a temp file and a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def file_size(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def short(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


# File systems without hard links answer os.link with one of these.
_NO_LINKS = {getattr(errno, name) for name in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS",
                                               "EMLINK", "EXDEV") if hasattr(errno, name)}


def claim_key(key_path: str, job_id: str) -> bool:
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
        # empty key file, which JobRegistry.claimed clears once it is KEY_STALE_S old.
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


class Job:
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


class JobRegistry:
    """The jobs this supervisor knows, loaded from and recorded to ``jobs_dir``.

    ``lock`` guards the table and every job's fields (the follow pump takes it too).
    ``refresh`` notices a job's end; one that nobody was told of yet goes to ``unannounced``
    and ``wake`` is set, so the pump sends its ``job_exit`` event.
    """

    def __init__(self, jobs_dir: str):
        self.jobs_dir = jobs_dir
        self.keys_dir = os.path.join(jobs_dir, "_keys")
        self.lock = threading.RLock()
        self.jobs: Dict[str, Job] = {}
        self.unannounced: Dict[str, Job] = {}
        self.wake = threading.Event()
        # Adds usage and the reason it ended to each summary (resources.ResourceMonitor).
        self.annotate: Optional[Callable[[Job, Dict[str, Any]], None]] = None

    def scan(self) -> None:
        """Re-adopt what earlier supervisors started."""
        try:
            names = os.listdir(self.jobs_dir)
        except OSError:
            return
        with self.lock:
            for name in names:
                if ID_RE.match(name) and name not in self.jobs:
                    job = self.load(name)
                    if job is not None:
                        self.refresh(job)
                        job.announced = job.state != RUNNING  # history is not news
                        self.unannounced.pop(job.job_id, None)
                        self.jobs[name] = job

    def load(self, job_id: str) -> Optional[Job]:
        job_dir = os.path.join(self.jobs_dir, job_id)
        meta = read_json(os.path.join(job_dir, "job.json"))
        if meta is None or meta.get("job_id") != job_id or not isinstance(
                meta.get("log_path"), str):
            return None
        if meta.get("pid") is None:  # we died between spawning and recording: the wrapper knows
            pids = read_json(os.path.join(job_dir, "pids.json")) or {}
            for key in ("pid", "pid_start", "wrapper_pid", "wrapper_start"):
                meta[key] = pids.get(key)
        return Job(job_dir, meta)

    def get(self, args: Dict[str, Any]) -> Job:
        job_id = arg(args, "job_id", str)
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None and ID_RE.match(job_id):
                job = self.load(job_id)  # started by another supervisor on this state dir
                if job is not None:
                    self.refresh(job)
                    job.announced = job.state != RUNNING
                    self.unannounced.pop(job.job_id, None)
                    self.jobs[job_id] = job
        if job is None:
            raise OpError(ErrorCode.NOT_FOUND, "no job with id %r" % short(job_id),
                          {"job_id": short(job_id)})
        return job

    def refresh(self, job: Job) -> None:
        """Recompute a job's state from disk and the process table. Call with the lock held."""
        if job.popen is not None and job.popen.poll() is not None:
            job.popen = None  # reaped: no zombie left behind
        if job.exit is not None and job.state != RUNNING:
            return  # final
        previous = job.state
        if job.exit is None:
            job.exit = read_json(os.path.join(job.dir, "exit.json"))
        if job.killed is None:
            job.killed = read_json(os.path.join(job.dir, "killed.json"))
        meta = job.meta
        if job.exit is not None:
            code = job.exit.get("exit_code")
            by_signal = job.exit.get("signal") is not None or (isinstance(code, int) and code < 0)
            job.state = KILLED if job.killed is not None or by_signal else EXITED
        elif (job.popen is not None
              or same_process(meta.get("pid"), meta.get("pid_start"))
              or same_process(meta.get("wrapper_pid"), meta.get("wrapper_start"))):
            job.state = RUNNING  # a live wrapper is about to write the exit record
        else:
            job.state = KILLED if job.killed is not None else LOST
        if previous == RUNNING and job.state != RUNNING and not job.announced:
            self.unannounced[job.job_id] = job
            self.wake.set()

    def summary(self, job: Job) -> Dict[str, Any]:
        meta = job.meta
        ended = job.exit or {}
        result = {
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
            "bytes_written": file_size(meta["log_path"]),
            "log_start_offset": meta.get("log_start_offset", 0),
            "name": meta.get("name"),
            "idempotency_key": meta.get("idempotency_key"),
        }
        if self.annotate is not None:
            try:
                self.annotate(job, result)
            except Exception as exc:  # usage is extra: say what broke, keep the status
                result["usage_error"] = "%s: %s" % (type(exc).__name__, str(exc)[:200])
        return result

    def running(self) -> List[Job]:
        with self.lock:
            return [job for job in self.jobs.values() if job.state == RUNNING]

    def live(self) -> Dict[str, Any]:
        """The running jobs, newest first (for ``hello``: what a reconnecting client finds)."""
        with self.lock:
            for job in list(self.jobs.values()):
                self.refresh(job)
            live = sorted((j for j in self.jobs.values() if j.state == RUNNING),
                          key=lambda j: j.meta.get("started_at") or 0, reverse=True)
            return {"jobs": [self.summary(j) for j in live]}

    def claimed(self, key_path: str, key: str, command: str) -> Any:
        """The existing job's summary for a used key, its bare id if never started, or None."""
        try:
            with open(key_path, "rb") as f:
                st = os.fstat(f.fileno())
                job_id = f.read(256).decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise paths.os_error(exc, key_path) from None
        if not ID_RE.match(job_id):
            # Empty or damaged: a claim in progress elsewhere, or one whose writer died.
            if time.time() - st.st_mtime < KEY_STALE_S:
                raise OpError(ErrorCode.BUSY, "idempotency key is being claimed by another "
                              "supervisor: retry")
            self._clear_stale_key(key_path, st)
            return None
        try:
            job = self.get({"job_id": job_id})
        except OpError:
            return job_id
        if job.meta.get("command") != command:
            raise OpError(ErrorCode.CONFLICT,
                          "idempotency_key %r was already used for job %s with another command"
                          % (short(key), job_id), {"job_id": job_id})
        with self.lock:
            self.refresh(job)
            summary = self.summary(job)
        summary["reused"] = True
        return summary

    def new_id(self, key_path: Optional[str]) -> str:
        """A fresh job id with its folder made, and ``key_path`` claimed for it."""
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
                    claimed = claim_key(key_path, job_id)
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

    def discard(self, job_dir: str, key_path: Optional[str]) -> None:
        """Forget a job that never started, and release its key."""
        shutil.rmtree(job_dir, ignore_errors=True)
        if key_path is not None:
            try:
                os.unlink(key_path)
            except OSError:
                pass
