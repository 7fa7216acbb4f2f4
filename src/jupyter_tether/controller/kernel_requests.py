"""Request and reply exchanges with a kernel over its ``KernelSocket``.

``kernel_info`` (asked until shell *and* iopub answer), ``control_request``, and the two
waits every ``execute_request`` makes: for its reply and outputs (``await_reply``), and for
the kernel's report after an interrupt (``drain_after_interrupt``). ``execute`` and a
notebook cell's run (``notebooks.outputs``) share them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ..errors import ConnectionLost, KernelError
from .kernel_ws import KernelMessage, KernelSocket

log = logging.getLogger(__name__)

#: how long outputs may trail the execute_reply before we stop waiting for the idle status
IDLE_GRACE_S = 2.0

#: gets each output message of a run: its ``msg_type`` and content
OutputFeed = Callable[[str, dict[str, Any]], None]


async def await_reply(replies: MemoryObjectReceiveStream[KernelMessage], feed: OutputFeed,
                      timeout: float | None, *, wait_for_outputs: bool = True
                      ) -> tuple[dict[str, Any] | None, bool]:
    """Wait for an ``execute_request``'s reply and (unless not ``wait_for_outputs``) the idle
    status that ends its outputs, handing each output to ``feed`` on the way.

    Returns the reply (None when none came) and whether ``timeout`` ran out.
    """
    reply: dict[str, Any] | None = None
    idle = False
    with anyio.move_on_after(timeout) as scope:
        async for incoming in replies:
            if incoming.channel == "shell" and incoming.msg_type == "execute_reply":
                reply = incoming.content
                # Outputs end with the idle status on iopub; but iopub can lose messages
                # (a kernel restart's late-joining subscription, the rate limiter), and
                # the reply alone must not then wait for ever.
                scope.deadline = min(scope.deadline, anyio.current_time() + IDLE_GRACE_S)
            elif incoming.channel == "iopub":
                if incoming.msg_type == "status":
                    idle = incoming.content.get("execution_state") == "idle"
                else:
                    feed(incoming.msg_type, incoming.content)
            if reply is not None and (idle or not wait_for_outputs):
                break
    return reply, scope.cancelled_caught


async def drain_after_interrupt(replies: MemoryObjectReceiveStream[KernelMessage],
                                feed: OutputFeed, grace_s: float) -> dict[str, Any] | None:
    """After an interrupt, give the kernel ``grace_s`` to report the KeyboardInterrupt it
    raised: outputs go to ``feed``; returns the reply, None when none came in time."""
    with anyio.move_on_after(grace_s):
        async for incoming in replies:
            if incoming.channel == "shell" and incoming.msg_type == "execute_reply":
                return incoming.content
            if incoming.channel == "iopub" and incoming.msg_type != "status":
                feed(incoming.msg_type, incoming.content)
    return None


async def kernel_info(sock: KernelSocket, timeout: float = 30.0) -> dict[str, Any]:
    """Ask until the kernel answers on shell *and* iopub, then return its kernel_info.

    A request sent while a kernel (re)starts is simply lost, and after a restart the server's
    iopub subscription joins late: replies on shell flow while iopub (where every comm reply
    travels) still drops messages. Like jupyter_server's own "nudge", keep asking until a
    status message for one of our requests comes back on iopub.
    """
    deadline = anyio.current_time() + timeout
    sent: list[str] = []
    send_reply, replies = anyio.create_memory_object_stream[KernelMessage](math.inf)
    info: dict[str, Any] | None = None
    try:
        interval = 0.5
        while anyio.current_time() < deadline:
            msg = sock.build("kernel_info_request", {})
            sent.append(msg["header"]["msg_id"])
            sock.expect_into(sent[-1], send_reply)
            await sock.send(msg)
            with anyio.move_on_after(min(interval, max(0.0, deadline - anyio.current_time()))):
                iopub_seen = False
                async for incoming in replies:
                    if incoming.msg_type == "kernel_info_reply":
                        info = incoming.content
                    elif incoming.channel == "iopub":
                        iopub_seen = True
                    if info is not None and iopub_seen:
                        return info
            if sock.limit_error is not None:
                raise sock.limit_error
            if sock.closed.is_set():
                raise ConnectionLost(f"kernel websocket closed: {sock.close_reason}")
            interval = min(interval * 2, 4.0)
    finally:
        for msg_id in sent:
            sock.forget(msg_id)
        send_reply.close()
    if info is not None:
        log.warning("kernel %s answers but its iopub stays silent", sock.kernel_id)
        return info
    raise KernelError(f"kernel {sock.kernel_id} did not answer kernel_info in {timeout}s")


async def control_request(sock: KernelSocket, msg_type: str, content: dict[str, Any],
                          timeout: float = 20.0) -> dict[str, Any]:
    """Send a control-channel request (e.g. ``create_subshell_request``) and await its reply."""
    msg = sock.build(msg_type, content, channel="control")
    replies = sock.expect(msg["header"]["msg_id"])
    reply_type = msg_type.replace("_request", "_reply")
    try:
        await sock.send(msg)
        with anyio.fail_after(timeout):
            async for incoming in replies:
                if incoming.msg_type == reply_type:
                    return incoming.content
    except TimeoutError:
        raise KernelError(f"kernel {sock.kernel_id} did not answer {msg_type}") from None
    finally:
        sock.forget(msg["header"]["msg_id"])
    if sock.limit_error is not None:
        raise sock.limit_error
    raise ConnectionLost(f"kernel websocket closed: {sock.close_reason}")
