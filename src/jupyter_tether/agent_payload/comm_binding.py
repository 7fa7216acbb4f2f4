"""Binds the Supervisor to ipykernel comms: the only payload module that touches the kernel.

Clients always open the comm (JupyterLab closes kernel-opened comms it does not know).
Replies go back on the comm that asked; events go out once, on the most recently opened
live comm: iopub is broadcast to every websocket attached to the kernel, so every attached
controller sees them, and ``seq`` stays contiguous for all of them.
"""

import inspect
import os
import threading
from typing import Any, Dict, List, Optional, Sequence

from . import app, wire
from .supervisor import Supervisor

_lock = threading.Lock()
_send_lock = threading.Lock()
_state: Dict[str, Any] = {"supervisor": None, "comms": [], "parked": None}


def _kernel() -> Any:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        raise RuntimeError("jupyter-tether's payload must run inside an IPython kernel")
    return shell.kernel


def _send(data: bytes, blobs: Sequence[bytes], channel: Any) -> None:
    comm = channel
    if comm is None:
        with _lock:
            comms: List[Any] = list(_state["comms"])
        if not comms:
            return  # nobody attached: the event waits in the replay ring
        comm = comms[-1]
    # Published directly rather than with comm.send(): ipykernel's Comm remembers the
    # subshell of whatever thread last sent on it and routes the client's next messages
    # there, so a send from the log pump thread would pull our traffic onto the main shell.
    kernel = _kernel()
    content = {"data": {"tether": wire.PROTOCOL_VERSION}, "comm_id": comm.comm_id}
    # One sender at a time: ipykernel hands sends to its IOPub thread, but once that thread
    # has stopped (the kernel shutting down) it sends from the caller's thread, and ZMQ
    # sockets are not thread-safe: replies from several op workers would interleave frames.
    io_thread = getattr(getattr(kernel.iopub_socket, "io_thread", None), "thread", None)
    if _state.get("kernel_closing") or (io_thread is not None and not io_thread.is_alive()):
        # The kernel is shutting down: once its IOPub thread stops, ipykernel sends from
        # whichever thread calls, and ours would interleave frames with its own last
        # messages on the bare socket, garbling both. The client re-sends after reconnecting.
        return
    with _send_lock:
        kernel.session.send(kernel.iopub_socket, "comm_msg", content, parent={},
                            ident=comm.topic, buffers=[data, *blobs])


def _on_msg(comm: Any, msg: Dict[str, Any]) -> None:
    supervisor: Optional[Supervisor] = _state["supervisor"]
    if supervisor is None:
        return
    buffers = msg.get("buffers") or []
    if not buffers:
        # A JSON-only message (no envelope buffer): answer with a clear error, keep serving.
        envelope = wire.encode(wire.reply_error(None, wire.ErrorCode.MALFORMED,
                                                "comm message without an envelope buffer"))
        _send(envelope, (), comm)
        return
    supervisor.handle(buffers[0], buffers[1:], comm)


def _on_open(comm: Any, open_msg: Dict[str, Any]) -> None:
    with _lock:
        _state["comms"].append(comm)

    def on_close(_msg: Dict[str, Any]) -> None:
        with _lock:
            if comm in _state["comms"]:
                _state["comms"].remove(comm)

    comm.on_msg(lambda msg: _on_msg(comm, msg))
    comm.on_close(on_close)


async def park() -> None:
    """Hold the current subshell with a cell that never ends (until shutdown).

    ipykernel dispatches comm messages to a subshell whose cell is running without the
    busy/idle status pair it wraps around every other shell message. One iopub message per
    reply instead of three matters behind proxies: with Nagle left on by the server, the
    second small message of a burst waits ~40 ms for the proxy's delayed ACK.
    """
    import asyncio

    kernel = _kernel()
    parent = kernel.get_parent() or {}
    subshell_id = (parent.get("header") or {}).get("subshell_id")
    parked = _state.get("parked")
    if parked and parked["subshell_id"] == subshell_id:
        return  # two controllers parked at once: the first cell holds it already
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    _state["parked"] = {"subshell_id": subshell_id, "release": release, "loop": loop}
    try:
        await release.wait()
    finally:
        if _state.get("parked", {}) and _state["parked"].get("release") is release:
            _state["parked"] = None


def _unpark() -> None:
    parked = _state.get("parked")
    if parked:
        parked["loop"].call_soon_threadsafe(parked["release"].set)


def parked_subshell() -> Dict[str, Any]:
    parked = _state.get("parked")
    return {"parked_subshell_id": parked["subshell_id"] if parked else None}


def _hook_kernel_shutdown(kernel: Any) -> None:
    """Stop sending the moment the kernel is asked to shut down (restart included)."""
    handlers = getattr(kernel, "control_handlers", None)
    if not isinstance(handlers, dict) or handlers.get("shutdown_request") is None:
        return
    found: Any = handlers["shutdown_request"]
    original: Any = getattr(found, "_tether_original", found)  # an older payload's hook

    async def on_shutdown(*args: Any, **kwargs: Any) -> Any:
        _state["kernel_closing"] = True
        result = original(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    on_shutdown._tether_original = original  # type: ignore[attr-defined]
    handlers["shutdown_request"] = on_shutdown


def _is_our_comm_msg(parent: Any) -> bool:
    if not isinstance(parent, dict):
        return False
    header = parent.get("header") or {}
    content = parent.get("content") or {}
    if not isinstance(header, dict) or not isinstance(content, dict) \
            or header.get("msg_type") != "comm_msg":
        return False
    with _lock:
        return any(getattr(c, "comm_id", None) == content.get("comm_id") for c in _state["comms"])


def _quiet_comm_status(kernel: Any) -> None:
    """On kernels without subshells, publish no busy/idle pair around our comm messages.

    There every comm message goes through the main shell, which wraps it in a status pair:
    three iopub messages per reply, and behind a proxy the second small message of a burst
    waits ~40 ms for a delayed ACK (the server leaves Nagle on). Nobody needs that pair: the
    reply follows at once (the server still sees activity), and the kernel is idle before
    and after. Only messages on our own comms, only in the supervisor's kernel. With
    subshells the parked cell (``park``) does the same.
    """
    if getattr(kernel, "_supports_kernel_subshells", False):
        return
    found = getattr(kernel, "_publish_status", None)
    if found is None:
        return
    original: Any = getattr(found, "_tether_original", found)  # an older payload's hook

    def publish_status(status: Any, *args: Any, **kwargs: Any) -> Any:
        parent = kwargs.get("parent")
        if parent is None:
            parent = next((a for a in args if isinstance(a, dict)), None)
        if not parent:
            # ipykernel 6: _publish_status(status, channel, parent=None)
            channel = next((a for a in args if isinstance(a, str)), "shell")
            try:
                parent = kernel.get_parent(channel)
            except Exception:
                parent = None
        if _is_our_comm_msg(parent):
            return None
        return original(status, *args, **kwargs)

    publish_status._tether_original = original  # type: ignore[attr-defined]
    kernel._publish_status = publish_status


def start(payload_hash: str, config: Dict[str, Any]) -> Supervisor:
    """Create the supervisor and listen for client comms. Called once per install."""
    kernel = _kernel()
    supervisor = app.create_supervisor(
        _send,
        root_dir=config.get("root_dir") or os.getcwd(),
        state_dir=config.get("state_dir"),
        payload_hash=payload_hash,
    )
    _state["supervisor"] = supervisor
    supervisor.add_hello_extra(parked_subshell)
    _hook_kernel_shutdown(kernel)
    _quiet_comm_status(kernel)
    kernel.comm_manager.register_target(wire.COMM_TARGET, _on_open)
    return supervisor


def is_live() -> bool:
    supervisor = _state["supervisor"]
    return supervisor is not None and not getattr(supervisor, "_closed", True)


def shutdown() -> None:
    """Stop this supervisor (for an upgrade); jobs keep running and are re-adopted."""
    _unpark()
    supervisor = _state["supervisor"]
    _state["supervisor"] = None
    with _lock:
        comms = list(_state["comms"])
        _state["comms"] = []
    for comm in comms:
        try:
            comm.close()
        except Exception:
            pass
    try:
        _kernel().comm_manager.unregister_target(wire.COMM_TARGET, _on_open)
    except Exception:
        pass
    if supervisor is not None:
        supervisor.close()
