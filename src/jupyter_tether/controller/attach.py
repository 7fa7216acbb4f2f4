"""Attaching to the supervisor kernel, step by step, each a function of one ``KernelSocket``.

``SupervisorLink._connect`` runs them in order: open the websocket while watching that its
kernel still exists (``open_watching``), install the payload unless the same one is live
(``inject``), park a subshell for comm traffic (``park_subshell``). ``probe_server`` is the
cheap REST round trip each reconnect attempt waits on first.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import anyio.abc

from ..agent_payload import bundle
from ..errors import ConnectionLost, KernelError, TetherError
from .execute import execute
from .kernel_requests import control_request
from .kernel_ws import KernelSocket
from .rest import JupyterRest

#: while a reconnect probe hangs (a blackholed path), start another this often
PROBE_EVERY_S = 0.5


async def open_watching(sock: KernelSocket, kernel_id: str, rest: JupyterRest,
                        task_group: anyio.abc.TaskGroup) -> None:
    """Open ``sock``, giving up as soon as the REST API says its kernel is gone.

    jupyter_server holds the websocket handshake to a kernel that is shutting down until
    the client's open timeout (20 s): a supervisor kernel deleted just as we reconnect
    would otherwise stall the link that long before a new one is started.
    """
    gone = False
    async with anyio.create_task_group() as watchers:

        async def watch() -> None:
            nonlocal gone
            while True:
                await anyio.sleep(0.5)
                with contextlib.suppress(TetherError):
                    if await rest.get_kernel(kernel_id) is None:
                        gone = True
                        watchers.cancel_scope.cancel()
                        return

        watchers.start_soon(watch)
        failure: BaseException | None = None
        try:
            await sock.open(task_group)
        except Exception as exc:
            # Raised after the group: from inside it would arrive as an ExceptionGroup,
            # which the reconnect loop's ``except AuthError`` would never match.
            failure = exc
        watchers.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if gone:
        await sock.aclose()
        raise KernelError(f"kernel {kernel_id} went away while we connected to it")


async def park_subshell(sock: KernelSocket) -> str | None:
    """Create a subshell for comm traffic and park a never-ending cell in it.

    A subshell keeps comm traffic off the main shell; the parked cell makes ipykernel
    dispatch our comm messages there without the busy/idle status pair, so each reply is
    one iopub message (see ``comm_binding.park``). The cell ends when the supervisor is
    upgraded or the kernel goes; every controller attached meanwhile shares it.
    """
    # A subshell outlives the supervisor that parked in it (an upgrade ends the parked cell,
    # not the subshell): park in the newest one there is. A new one per upgrade kept a
    # thread and ~10 fds each in the kernel. Nothing else makes subshells in this kernel.
    listed = await control_request(sock, "list_subshell_request", {})
    ids = listed.get("subshell_id") if listed.get("status") == "ok" else None
    if isinstance(ids, list) and ids and isinstance(ids[-1], str):
        subshell_id = ids[-1]
    else:
        reply = await control_request(sock, "create_subshell_request", {})
        if reply.get("status") != "ok":
            return None
        subshell_id = str(reply["subshell_id"])
    park = sock.build("execute_request", {
        "code": f"await __import__('sys').modules[{bundle.REMOTE_PACKAGE!r}]"
                ".comm_binding.park()",
        "silent": True, "store_history": False, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": False},
        header_extra={"subshell_id": subshell_id})
    await sock.send(park)  # its reply comes only when the cell ends: nobody waits for it
    return subshell_id


async def payload_is_live(sock: KernelSocket) -> bool:
    """One tiny round trip that saves re-sending ~150 KB of payload on every reconnect."""
    probe = (f"(lambda m: bool(m) and getattr(m, 'PAYLOAD_HASH', None) == {bundle.payload_hash()!r} "
             f"and m.comm_binding.is_live())(__import__('sys').modules.get({bundle.REMOTE_PACKAGE!r}))"
             )
    result = await execute(sock, "", timeout=30, silent=True, store_history=False,
                           wait_for_outputs=False,
                           user_expressions={"live": probe})
    live = result.user_expressions.get("live", {})
    return isinstance(live, dict) and (live.get("data") or {}).get("text/plain") == "True"


async def inject(sock: KernelSocket, kernel_id: str, remote_state_dir: str | None) -> str:
    """Install the payload and start the supervisor, unless the same payload is live;
    returns how it went: "reused", "installed" or "upgraded"."""
    if await payload_is_live(sock):
        return "reused"
    config: dict[str, Any] = {}
    if remote_state_dir:
        config["state_dir"] = remote_state_dir
    result = await execute(sock, bundle.install_code(config), timeout=60, silent=True,
                           store_history=False, wait_for_outputs=False,
                           user_expressions={"outcome": "_jupyter_tether_outcome"})
    if result.status != "ok":
        detail = result.error or {}
        raise KernelError(
            f"installing the supervisor in kernel {kernel_id} failed: "
            f"{detail.get('ename')}: {detail.get('evalue')}\n"
            + "\n".join(detail.get("traceback", [])[-5:])
        )
    outcome = result.user_expressions.get("outcome", {})
    text = (outcome.get("data") or {}).get("text/plain", "") if isinstance(outcome, dict) else ""
    return text.strip("'\"")


async def probe_server(rest: JupyterRest, ping_timeout: float) -> None:
    """Wait for one cheap REST round trip to succeed, for at most ``ping_timeout`` s.

    On a dead path a request on a pooled (half-open) connection, or a connect that is
    accepted but never answered, would hang for the HTTP client's full timeout. Each
    probe is cancelled at the deadline (which drops its connection), and while one hangs
    a fresh one starts every ``PROBE_EVERY_S``: the first answer ends the wait, so a
    healed path is noticed within about that long. An answer that is an error (refused,
    403, 502) ends it at once.
    """
    outcome: list[BaseException | None] = []  # the first answer: None when it was good
    async with anyio.create_task_group() as probes:

        async def probe() -> None:
            try:
                await rest.status()
            except Exception as exc:
                outcome.append(exc)
            else:
                outcome.append(None)
            probes.cancel_scope.cancel()

        with anyio.move_on_after(ping_timeout):
            while True:
                probes.start_soon(probe)
                await anyio.sleep(min(PROBE_EVERY_S, ping_timeout))
        probes.cancel_scope.cancel()
    if not outcome:
        raise ConnectionLost(f"the server did not answer within {ping_timeout:g}s")
    if outcome[0] is not None:
        raise outcome[0]
