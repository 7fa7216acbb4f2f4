"""The follow pump: streams followed job logs as ``log`` events, announces ends, settles waits.

One pump thread per supervisor reads new bytes from each followed job's log file (the file is
the source of truth; nothing is buffered in memory beyond one tick) and emits one batched
``log`` event per tick, bounded by a per-subscription credit window. A subscription is keyed
by (job_id, subscriber): followers that pass distinct ``subscriber`` ids have independent
offsets and windows, and every chunk names its subscription. A ``job_exit`` event follows a
subscription's last bytes, or goes out on its own for a job nobody follows.

Wait: ``job_wait`` holds no thread; the pump settles each waiter when its job ends or its
timeout passes, so any number of waits leave the supervisor's worker pool alone.
"""

import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import job_wrapper
from .args import int_arg
from .fsutil import read_at
from .job_registry import RUNNING, Job, JobRegistry, file_size
from .supervisor import Deferred, Request, Result, Supervisor
from .wire import ErrorCode, OpError, arg

KIB = 1024
MIB = 1024 * 1024

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


def subscriber_arg(args: Dict[str, Any]) -> str:
    """Who follows: a client-chosen id, "" (the default) for clients that do not say."""
    subscriber = arg(args, "subscriber", str, "")
    if len(subscriber) > MAX_SUBSCRIBER_CHARS:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "subscriber must have at most %d chars"
                      % MAX_SUBSCRIBER_CHARS)
    return subscriber


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
    """A ``job_wait`` in progress: settled by the pump when the job ends or time runs out,
    or when ``ready()`` says so; ``answer()`` (outside the lock) then makes the reply,
    else it is the job's summary."""

    __slots__ = ("answer", "deadline", "deferred", "job", "ready")

    def __init__(self, job: "Job", deadline: float, deferred: Deferred,
                 ready: Optional[Callable[[], bool]] = None,
                 answer: Optional[Callable[[], Any]] = None):
        self.job = job
        self.deadline = deadline
        self.deferred = deferred
        self.ready = ready
        self.answer = answer


def _read_from(path: str, offset: int, count: int) -> Tuple[bytes, Optional[int]]:
    """Up to ``count`` bytes of ``path`` from ``offset``, and the file's size."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return b"", None
    try:
        size = os.fstat(fd).st_size
        count = min(count, size - offset)
        return (read_at(fd, offset, count) if count > 0 else b""), size
    finally:
        os.close(fd)


def _safe_ready(ready: Callable[[], bool]) -> bool:
    try:
        return bool(ready())
    except Exception:  # let the answer say what is wrong
        return True


class FollowPump:
    """Owns the follow subscriptions, the waiters and the pump thread of one job manager.

    It shares the registry's lock, so a tick sees jobs, follows and waiters consistently.
    """

    def __init__(self, supervisor: Supervisor, registry: JobRegistry):
        self.sup = supervisor
        self.registry = registry
        self._lock = registry.lock
        self._wake = registry.wake
        self._follows: Dict[FollowKey, _Follow] = {}
        self._waiters: List[_Waiter] = []
        self._stop = threading.Event()
        self._pump: Optional[threading.Thread] = None
        self._last_refresh = 0.0
        self._fds: Dict[str, Tuple[str, int]] = {}  # pump thread only
        self._rr = 0

    # --- wait -------------------------------------------------------------------------------

    def wait(self, job: Job, timeout: float, req: Request,
             ready: Optional[Callable[[], bool]] = None,
             answer: Optional[Callable[[], Any]] = None) -> Any:
        """``job``'s summary (or ``answer()``) now if it ended or ``ready()``, else a
        Deferred the pump settles when one of them comes true or ``timeout`` passes."""
        with self._lock:
            self.registry.refresh(job)
            now = (job.state != RUNNING or timeout <= 0 or self._stop.is_set()
                   or (ready is not None and ready()))
            if now and answer is None:
                return self._wait_result(job)
            if not now:
                deferred = self.sup.defer(req)
                self._waiters.append(_Waiter(job, time.monotonic() + timeout, deferred,
                                             ready, answer))
        if now:
            assert answer is not None
            return answer()
        self.ensure()
        self._wake.set()
        return deferred

    def _wait_result(self, job: Job) -> Dict[str, Any]:
        """Call with the lock held."""
        summary = self.registry.summary(job)
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
                self.registry.refresh(job)  # once per job, however many wait for it
            keep = []
            for waiter in self._waiters:
                if everyone or waiter.job.state != RUNNING or now >= waiter.deadline or (
                        waiter.ready is not None and _safe_ready(waiter.ready)):
                    summary = self._wait_result(waiter.job) if waiter.answer is None else None
                    ready.append((waiter, summary))
                else:
                    keep.append(waiter)
            self._waiters = keep
        for waiter, summary in ready:
            if waiter.answer is None:
                waiter.deferred.resolve(summary)
                continue
            try:
                waiter.deferred.resolve(waiter.answer())
            except Exception as exc:
                waiter.deferred.reject(exc)

    # --- follow -----------------------------------------------------------------------------

    def op_follow(self, req: Request) -> Any:
        """Subscribe from ``offset``. With ``inline`` > 0 the reply itself carries up to that
        many bytes from ``offset`` (one blob; the pump goes on after them), and when the job
        has ended and they are all of it, ``complete`` with the job's summary and no
        subscription: a follow of an ended job is one message, no events, no unfollow."""
        job = self.registry.get(req.args)
        subscriber = subscriber_arg(req.args)
        offset = int_arg(req.args, "offset", 0, 0, 1 << 62)
        window = int_arg(req.args, "window", DEFAULT_WINDOW, 1, 1 << 40)
        window = max(MIN_WINDOW, min(MAX_WINDOW, window))
        inline = min(int_arg(req.args, "inline", 0, 0, 1 << 40), CHUNK_BYTES, window)
        path = job.meta["log_path"]
        with self._lock:
            # The state before the read: once ended, the read below sees all it wrote.
            self.registry.refresh(job)
            state = job.state
        data = b""
        size = file_size(path)
        if inline:
            data, size = _read_from(path, offset, inline)
        sent = offset + len(data)
        complete = bool(inline) and state != RUNNING and sent >= (size or 0)
        key = (job.job_id, subscriber)
        with self._lock:
            if complete:
                self._follows.pop(key, None)  # an earlier subscription of ours is done too
                summary = self.registry.summary(job)
            else:
                sub = self._follows.get(key)
                if sub is None:
                    sub = _Follow(job.job_id, subscriber, path)
                    self._follows[key] = sub
                sub.gen += 1
                sub.acked = offset
                sub.sent = sent
                sub.window = window
                sub.progress_at = time.monotonic()
        result = {"job_id": job.job_id, "subscriber": subscriber, "offset": offset,
                  "window": window, "size": size, "state": state, "sent": sent}
        if complete:
            result["complete"] = True
            result["job"] = summary
        else:
            self.ensure()
            self._wake.set()
        return Result(result, [data]) if inline else result

    def op_follow_ack(self, req: Request) -> Dict[str, Any]:
        job = self.registry.get(req.args)
        subscriber = subscriber_arg(req.args)
        offset = int_arg(req.args, "offset", None, 0, 1 << 62)
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
        job = self.registry.get(req.args)
        subscriber = subscriber_arg(req.args)
        with self._lock:
            sub = self._follows.pop((job.job_id, subscriber), None)
        self._wake.set()
        return {"job_id": job.job_id, "subscriber": subscriber, "followed": sub is not None}

    # --- the pump -----------------------------------------------------------------------------

    def ensure(self) -> None:
        with self._lock:
            if self._pump is not None or self._stop.is_set():
                return
            self._pump = threading.Thread(target=self._loop, name="tether-jobs",
                                          daemon=True)
            self._pump.start()

    def _loop(self) -> None:
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
                    elif self.registry.unannounced or job_wrapper.unreaped() or any(
                            j.state == RUNNING for j in self.registry.jobs.values()):
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
        job_wrapper.reap()
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
            for job in self.registry.jobs.values():
                if job.state == RUNNING and (refresh_all or job.job_id in followed):
                    self.registry.refresh(job)
            work = []
            for sub in self._follows.values():
                followed_job = self.registry.jobs.get(sub.job_id)
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
                    data = read_at(fd, offset, count)
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
                self._emit_exit(self.registry.jobs[sub.job_id], size, sub.subscriber)
            followed = {sub.job_id for sub in self._follows.values()}
            for job in list(self.registry.unannounced.values()):
                if job.job_id not in followed:
                    self._emit_exit(job, file_size(job.meta["log_path"]))
        return bool(chunks)

    def _emit_exit(self, job: Job, size: Optional[int],
                   subscriber: Optional[str] = None) -> None:
        ended = job.exit or {}
        body = {"job_id": job.job_id, "state": job.state, "exit_code": ended.get("exit_code"),
                "ended_at": ended.get("ended_at"), "size": size}
        if subscriber is not None:
            body["subscriber"] = subscriber  # the drained subscription it ends
        self.sup.emit("job_exit", body)
        job.announced = True
        self.registry.unannounced.pop(job.job_id, None)

    def close(self) -> None:
        """Stop the pump. Jobs are separate processes and keep running."""
        self._stop.set()
        self._wake.set()
        pump = self._pump
        if pump is not None and pump is not threading.current_thread():
            pump.join(timeout=5.0)
        self._settle_waiters(everyone=True)  # no pump ever ran, or it is stuck: answer anyway
