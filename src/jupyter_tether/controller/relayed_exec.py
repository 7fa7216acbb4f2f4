"""``exec`` through the supervisor: it drives the work kernel over the kernel's own ZMQ
ports on the remote host and answers with the whole cell in one comm message.

Behind a proxy that delays ACKs, a cell over the work kernel's websocket costs ~40 ms per
message after the first of a burst (busy, input, outputs, reply, idle); relayed, a small
cell costs one round trip. A cell running longer streams its outputs as ``exec_output``
events, fed to ``on_output`` as they come. Where the supervisor cannot reach the kernel
(``RelayUnavailable``: a gateway's remote kernel, no pyzmq on the host) the caller uses the
websocket path (``execute``). The outputs go through the same ``_Collector`` and
``ExecLimits`` as there, so the result is the same either way.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from ..agent_payload.wire import Op
from ..errors import ConnectionLost, KernelError, NotFound, TetherError
from .caller import Caller
from .execute import (
    EXEC_LIMITS,
    ExecLimits,
    ExecResult,
    OutputCallback,
    _Collector,
    apply_reply,
)
from .rpc import Event, Reply

#: after an interrupt, how long the kernel gets to report the KeyboardInterrupt
INTERRUPT_GRACE_S = 5.0
#: how long a reply waits for streamed events it says came before it (a replay after a drop)
EVENTS_GRACE_S = 5.0


class RelayUnavailable(TetherError):
    """The supervisor cannot run code in that kernel itself (nothing was run): use the
    websocket. ``lasting``: it never will (not on its host); else it may next time."""

    def __init__(self, message: str, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting


class _Feed:
    """Feeds one relayed cell's batches (events, then the reply's) into a collector, in
    order, once each."""

    def __init__(self, collector: _Collector) -> None:
        self.collector = collector
        self.next_index = 0
        self.arrived = anyio.Event()

    def batch(self, body: dict[str, Any], msg_id: str) -> None:
        collector = self.collector
        omitted = body.get("omitted")
        if isinstance(omitted, int) and omitted > 0:
            collector.omitted += omitted
            chars = body.get("omitted_chars")
            collector.omitted_chars += chars if isinstance(chars, int) else 0
            collector.cut = True
        outputs = body.get("outputs")
        for item in outputs if isinstance(outputs, list) else []:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], dict)):
                continue
            msg_type, content = str(item[0]), item[1]
            if msg_type == "stream":
                dropped = content.get("dropped")
                if isinstance(dropped, int) and dropped > 0:
                    tail = collector.stderr if content.get("name") == "stderr" else \
                        collector.stdout
                    tail.dropped += dropped
            collector.feed(msg_type, content, msg_id)

    def event(self, body: dict[str, Any], msg_id: str) -> None:
        index = body.get("index")
        if not isinstance(index, int) or index < self.next_index:
            return  # a replayed duplicate
        if index > self.next_index:  # beyond the replay ring: gone
            self.collector.cut = True
        self.next_index = index + 1
        self.batch(body, msg_id)
        self.arrived.set()
        self.arrived = anyio.Event()


async def execute_relayed(
    caller: Caller,
    kernel_id: str,
    code: str,
    *,
    timeout: float | None,
    max_output_chars: int = 20_000,
    image_dir: Path | None = None,
    on_output: OutputCallback | None = None,
    interrupt: Callable[[], Awaitable[None]] | None = None,
    limits: ExecLimits = EXEC_LIMITS,
) -> ExecResult:
    """Run ``code`` in ``kernel_id`` through the supervisor; the same result as ``execute``.

    Raises ``RelayUnavailable`` when the supervisor cannot reach that kernel (the code did
    not run), ``KernelError`` when the kernel died under it, ``ConnectionLost`` when the
    link dropped while it ran (it may still be running there).
    """
    exec_id = uuid.uuid4().hex
    collector = _Collector(max_output_chars, image_dir, on_output, limits)
    feed = _Feed(collector)

    def on_event(event: Event) -> None:
        if event.name == "exec_output" and event.body.get("exec_id") == exec_id:
            feed.event(event.body, exec_id)

    outcome: list[Reply | BaseException] = []
    done = anyio.Event()

    async def run() -> None:
        try:
            outcome.append(await caller.call(
                Op.KERNEL_EXEC, {"kernel_id": kernel_id, "code": code, "exec_id": exec_id,
                                 "max_output_chars": max_output_chars},
                timeout=None, idempotent=False))  # never run twice after a drop
        except Exception as exc:
            outcome.append(exc)
        finally:
            done.set()

    started = time.monotonic()
    status = "ok"
    remove = caller.add_listener(on_event)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                await done.wait()
            if not done.is_set():
                status = "timeout"
                if interrupt is not None:
                    await interrupt()
                with anyio.move_on_after(INTERRUPT_GRACE_S):
                    await done.wait()
                group.cancel_scope.cancel()  # the reply may still come; nobody waits for it
        reply: dict[str, Any] | None = None
        if outcome and isinstance(outcome[0], Reply):
            result = outcome[0].result
            # Streamed batches come before the reply; after a drop a replay may bring them.
            want = result.get("events")
            if isinstance(want, int):
                with anyio.move_on_after(EVENTS_GRACE_S):
                    while feed.next_index < want:
                        await feed.arrived.wait()
                if feed.next_index < want:
                    collector.cut = True
            feed.batch(result, exec_id)
            reply = result.get("reply") if isinstance(result.get("reply"), dict) else {}
        elif outcome and status != "timeout":
            error = outcome[0]
            assert isinstance(error, BaseException)
            if isinstance(error, NotFound) and error.details.get("local_exec") == "unavailable":
                raise RelayUnavailable(str(error), error.details.get("lasting") is True) \
                    from error
            if isinstance(error, NotFound) and error.details.get("local_exec") == "kernel_lost":
                raise KernelError(error.message) from None
            if isinstance(error, ConnectionLost):
                raise ConnectionLost(
                    f"the link dropped while the code ran in kernel {kernel_id}; it may "
                    "still be running there") from error
            raise error
    finally:
        remove()
    result_obj = collector.result(status)
    result_obj.duration_s = time.monotonic() - started
    if reply is not None:
        apply_reply(result_obj, reply, status, max_output_chars, limits)
    return result_obj
