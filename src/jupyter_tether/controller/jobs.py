"""Jobs on the remote: start, status, tail, follow (pushed, lossless), wait, kill, run_commands.

``follow`` is exact by byte offset: the supervisor pushes log chunks tagged with their
offset; the client keeps ``next_offset``, drops what it already has, fills any gap (events
lost to a drop or to iopub's rate limiter) from the log file with ``job_tail``, and after a
reconnect re-subscribes from ``next_offset``. Every byte arrives once, in order.
"""

from __future__ import annotations

import builtins
import contextlib
import html
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from ..agent_payload.wire import Op
from ..errors import JobError, TetherError, TetherTimeout
from ..formatting import usage_line
from .caller import Caller
from .rpc import Event

FOLLOW_WINDOW = 8 * 1024 * 1024
# What a follow's reply carries itself: an ended job's log up to this size is one message.
FOLLOW_INLINE_BYTES = 1024 * 1024
# With no event for this long, ask the supervisor directly (covers any lost notification).
FOLLOW_IDLE_CHECK_S = 2.0
_WAIT_SLICE_S = 30.0


@dataclass
class JobInfo:
    """A job's state as the supervisor's registry knows it."""

    job_id: str
    state: str  # "running", "exited", "killed" or "lost"
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    command: str = ""
    cwd: str = ""
    log_path: str = ""
    bytes_written: int = 0
    name: str | None = None
    idempotency_key: str | None = None
    # What it uses (running: cpu_percent, rss, rss_peak, threads, open_files, gpu_mem; ended:
    # rss_peak, cpu_s), why it ended badly ({kind, message, hint}), and the box's warnings.
    usage: dict[str, Any] | None = None
    reason: dict[str, str] | None = None
    warnings: builtins.list[str] | None = None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> JobInfo:
        known: dict[str, Any] = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known.setdefault("state", "unknown")
        return cls(**known)

    @property
    def done(self) -> bool:
        return self.state != "running"

    @property
    def ok(self) -> bool:
        return self.state == "exited" and self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        code = "" if self.exit_code is None else f" exit_code={self.exit_code}"
        return f"job {self.job_id} {self.state}{code}: {self.command}"


class AsyncJob:
    """Handle on one remote job. Cheap to create; every method asks the supervisor."""

    def __init__(self, caller: Caller, job_id: str, info: JobInfo | None = None) -> None:
        self._caller = caller
        self.job_id = job_id
        self.info = info

    def __repr__(self) -> str:
        state = self.info.state if self.info else "?"
        return f"<AsyncJob {self.job_id} {state}>"

    async def status(self) -> JobInfo:
        """The job's state now: running, exited (``exit_code``), killed (``signal``) or lost."""
        reply = await self._caller.call(Op.JOB_STATUS, {"job_id": self.job_id})
        self.info = JobInfo.from_wire(reply.result)
        return self.info

    async def read(self, offset: int = 0, max_bytes: int = 4 * 1024 * 1024, *,
                   wait: float = 0.0) -> tuple[bytes, int]:
        """Log bytes from ``offset`` (at most ``max_bytes``) and the offset after them.

        ``wait`` > 0: the supervisor holds the reply until ``max_bytes`` are there, the job
        ends, or ``wait`` seconds pass (one round trip however long it gathers). ``info``
        is the job's state as of just before the read: once it says ended, the read has
        everything the job wrote.
        """
        args: dict[str, Any] = {"job_id": self.job_id, "offset": offset, "max_bytes": max_bytes}
        if wait > 0:
            args["wait"] = wait
        reply = await self._caller.call(Op.JOB_TAIL, args, timeout=wait + 60)
        self._note(reply.result)
        data = reply.buffers[0] if reply.buffers else b""
        return data, int(reply.result["offset_start"]) + len(data)

    async def tail(self, lines: int = 200) -> str:
        """The last ``lines`` lines of the log (bytes that are not UTF-8 are replaced);
        ``info`` is updated with the job's state in the same round trip."""
        reply = await self._caller.call(Op.JOB_TAIL, {"job_id": self.job_id, "lines": lines})
        self._note(reply.result)
        data = reply.buffers[0] if reply.buffers else b""
        return data.decode("utf-8", errors="replace")

    def _note(self, result: dict[str, Any]) -> None:
        """Keep the job's summary a reply carried (``job``) as ``info``."""
        summary = result.get("job")
        if isinstance(summary, dict):
            self.info = JobInfo.from_wire(summary)

    async def wait(self, timeout: float | None = None) -> JobInfo:
        """Wait until the job ends; raise TetherTimeout after ``timeout`` seconds."""
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        while True:
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise TetherTimeout(f"job {self.job_id} still running after {timeout}s")
            slice_s = min(_WAIT_SLICE_S, remaining)
            reply = await self._caller.call(
                Op.JOB_WAIT, {"job_id": self.job_id, "timeout": slice_s}, timeout=slice_s + 30)
            self.info = JobInfo.from_wire(reply.result)
            if self.info.done:
                return self.info

    async def kill(self, signal: int = 15, grace: float = 5.0, *,
                   reason: str = "user") -> JobInfo:
        """Signal the job's whole process group; TERM escalates to KILL after ``grace``.

        ``reason="timeout"`` records that it ran out of time (its ``reason`` then says so).
        """
        args = {"job_id": self.job_id, "signal": signal, "grace": grace}
        if reason != "user":
            args["reason"] = reason
        reply = await self._caller.call(Op.JOB_KILL, args, timeout=grace + 30)
        self.info = JobInfo.from_wire(reply.result)
        return self.info

    async def follow(self, offset: int = 0, *, window: int = FOLLOW_WINDOW) -> AsyncIterator[bytes]:
        """Yield the log from ``offset`` as it is written, until the job ends and all is read."""
        caller = self._caller
        send, receive = anyio.create_memory_object_stream[Event](math.inf)
        job_id = self.job_id
        # Our own subscription: another follower of the same job (this process or another
        # controller) keeps its own offset and window on the supervisor.
        subscriber = uuid.uuid4().hex[:16]

        def ours(item: dict[str, Any]) -> bool:
            return item.get("job_id") == job_id and item.get("subscriber", subscriber) == subscriber

        # An exit announced to everyone while our first subscribe is in flight waits for its
        # reply, which says more (the log from our offset, and the end with it when it fits):
        # taken first, the announcement would cost a read of what the reply carries anyway.
        held: list[Event] = []
        holding = True

        def on_event(event: Event) -> None:
            if event.name == "log":
                if any(ours(c) for c in event.body.get("chunks", [])):
                    send.send_nowait(event)
            elif event.name == "job_exit" and event.body.get("job_id") == job_id and \
                    event.body.get("subscriber") in (None, subscriber):
                if holding and event.body.get("subscriber") is None:
                    held.append(event)
                else:
                    send.send_nowait(event)

        next_offset = offset
        acked = offset
        # Whether the supervisor holds a subscription of ours that it will not end itself.
        subscribed = False

        async def subscribe() -> None:
            # The reply carries what the log holds from the offset (and, for an ended job
            # whose log fits, the end too): fed in as the pump's events would be.
            nonlocal subscribed
            reply = await caller.call(Op.JOB_FOLLOW, {
                "job_id": job_id, "offset": next_offset, "window": window,
                "subscriber": subscriber, "inline": FOLLOW_INLINE_BYTES})
            result = reply.result
            blob = reply.buffers[0] if reply.buffers else b""
            subscribed = not result.get("complete")
            if isinstance(result.get("job"), dict):
                self.info = JobInfo.from_wire(result["job"])
            # A re-subscribe after a drop may answer once the follow is over: nothing to feed.
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                if blob:
                    send.send_nowait(Event(0, "log", {"chunks": [{
                        "job_id": job_id, "subscriber": subscriber,
                        "offset": int(result["offset"]), "length": len(blob)}]}, [blob]))
                if result.get("complete"):
                    send.send_nowait(Event(0, "job_exit", {
                        "job_id": job_id, "subscriber": subscriber,
                        "size": result.get("size"), "state": result.get("state")}))

        remove_listener = caller.add_listener(on_event)
        remove_hook = caller.on_reattach(subscribe)
        exit_size: int | None = None
        try:
            await subscribe()
            holding = False
            for announced in held:
                send.send_nowait(announced)
            while True:
                event: Event | None = None
                with anyio.move_on_after(FOLLOW_IDLE_CHECK_S):
                    event = await receive.receive()
                if event is None:
                    # Quiet: maybe the exit notification was lost. Ask, and re-subscribe.
                    info = await self.status()
                    if info.done:
                        exit_size = info.bytes_written
                    else:
                        await subscribe()
                        continue
                elif event.name == "job_exit":
                    if event.body.get("subscriber") == subscriber:
                        subscribed = False  # the supervisor dropped it with this event
                    size = event.body.get("size")
                    if size is None:
                        size = (await self.status()).bytes_written
                    exit_size = int(size)
                else:
                    for chunk, blob in zip(event.body["chunks"], event.buffers, strict=False):
                        if not ours(chunk):
                            continue
                        start = int(chunk["offset"])
                        if start > next_offset:  # a gap: read it from the log file
                            async for data in self._read_range(next_offset, start):
                                next_offset += len(data)
                                yield data
                        if start + len(blob) <= next_offset:
                            continue  # already have it (a replay or a re-subscribe overlap)
                        data = blob[next_offset - start:]
                        next_offset += len(data)
                        yield data
                    if next_offset - acked >= window // 4:
                        acked = next_offset
                        caller.start_soon(self._ack, acked, subscriber)
                if exit_size is not None:
                    async for data in self._read_range(next_offset, exit_size):
                        next_offset += len(data)
                        yield data
                    return
        finally:
            remove_listener()
            remove_hook()
            send.close()
            if subscribed:  # left early (or the end went unseen): let it go, unawaited
                with contextlib.suppress(RuntimeError):  # the link is closing: it goes too
                    caller.start_soon(self._unfollow, subscriber)

    async def _unfollow(self, subscriber: str) -> None:
        with contextlib.suppress(TetherError):
            await self._caller.call(Op.JOB_UNFOLLOW, {"job_id": self.job_id,
                                                      "subscriber": subscriber}, timeout=5)

    async def _read_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        while start < end:
            data, after = await self.read(start, min(end - start, 4 * 1024 * 1024))
            if not data:
                return
            start = after
            yield data

    async def _ack(self, offset: int, subscriber: str) -> None:
        try:
            await self._caller.call(Op.JOB_FOLLOW_ACK, {"job_id": self.job_id, "offset": offset,
                                                        "subscriber": subscriber}, timeout=30)
        except TetherError:
            pass  # a lost ack only pauses the push; the idle check re-subscribes

    def _repr_html_(self) -> str:
        info = self.info
        state = html.escape(info.state if info else "unknown")
        command = html.escape(info.command if info else "")
        usage = html.escape(usage_line(info.usage, info.reason)) if info else ""
        return (f"<b>job {html.escape(self.job_id)}</b> <code>{state}</code> {command}"
                + (f"<br><small>{usage}</small>" if usage else ""))


class AsyncJobs:
    """``tether.jobs``: start and find jobs, and run short command sequences."""

    def __init__(self, caller: Caller) -> None:
        self._caller = caller

    async def start(self, command: str, *, cwd: str = "", env: dict[str, str] | None = None,
                    log_path: str | None = None, name: str | None = None,
                    idempotency_key: str | None = None) -> AsyncJob:
        """Start ``command`` in its own session on the remote; returns at once.

        A retried start with the same ``idempotency_key`` returns the same job; one is
        generated when none is given, so the link's own retry after a drop is safe too.
        """
        args: dict[str, Any] = {"command": command, "cwd": cwd,
                                "idempotency_key": idempotency_key or uuid.uuid4().hex}
        if env:
            args["env_overrides"] = env
        if log_path:
            args["log_path"] = log_path
        if name:
            args["name"] = name
        try:
            reply = await self._caller.call(Op.JOB_START, args)
        except TetherError as exc:
            raise JobError(f"could not start {command!r}: {exc}") from exc
        info = JobInfo.from_wire(reply.result)
        return AsyncJob(self._caller, info.job_id, info)

    def get(self, job_id: str) -> AsyncJob:
        """A handle on a job by id (no round trip: ``status()`` says whether it exists)."""
        return AsyncJob(self._caller, job_id)

    async def list(self, state: str | None = None) -> builtins.list[JobInfo]:
        """The remote's jobs (every controller's), or only those in ``state``."""
        args = {"state": state} if state else {}
        reply = await self._caller.call(Op.JOB_LIST, args)
        return [JobInfo.from_wire(item) for item in reply.result.get("jobs", [])]

    async def run_commands(self, commands: builtins.list[str], *, cwd: str = "",
                           env: dict[str, str] | None = None, timeout_per_command: float = 600,
                           fail_fast: bool = True, max_output_chars: int = 20_000) -> dict[str, Any]:
        """Run shell commands one after another; each result has returncode, stdout, stderr."""
        args: dict[str, Any] = {"commands": list(commands), "cwd": cwd,
                                "timeout_s_per_command": timeout_per_command,
                                "fail_fast": fail_fast, "max_output_chars": max_output_chars}
        if env:
            args["env_overrides"] = env
        # Not idempotent: a command sequence must never silently run twice after a drop.
        reply = await self._caller.call(
            Op.RUN_COMMANDS, args, idempotent=False,
            timeout=timeout_per_command * max(1, len(commands)) + 30)
        result: dict[str, Any] = reply.result
        return result
