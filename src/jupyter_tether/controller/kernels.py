"""Finding and starting the kernels jupyter-tether owns on a server, by session name.

The supervisor and the default work kernel are registered as Jupyter sessions with fixed
names (and paths), so any later controller (after a restart, on another laptop) finds them
again. They are started with a root-level session path, so their working directory is the
server root.

A Kernel Gateway has no sessions it will list (``GET /api/sessions`` and ``/api/kernels``
answer 403 unless it runs with ``KG_LIST_KERNELS=True``), no contents API, and kernel models
that carry nothing but id, kernelspec name and state: nothing on the server itself says
which kernel is ours. There the durable record is a **marker file on the remote disk**,
``<root>/.jupyter_tether/kernels.json`` (beside the supervisor's default state dir),
mapping each name to its kernel id. A controller with no local state reads it from a fresh
kernel it starts anyway: if the recorded kernel is alive, the fresh one is shut down and
the recorded one is used; otherwise the fresh one claims the name (compare-and-set under a
file lock, so two controllers racing end up on one kernel). A gateway that does list
(``KG_LIST_KERNELS=True``) keeps a session's ``notebook.path`` and is served by sessions,
falling back to the marker where it refuses a second session on one path (HTTP 500).
Kernels a gateway starts elsewhere (Enterprise Gateway on Kubernetes or YARN) see the marker
only if they share the root's filesystem.
"""

from __future__ import annotations

import ast
import contextlib
import logging
from typing import Any

import anyio

from ..errors import ConnectionLost, KernelError, ServerError, TetherError
from .execute import execute
from .kernel_ws import OPEN_TIMEOUT_S, KernelSocket, new_session_id
from .rest import JupyterRest
from .state import TargetState

log = logging.getLogger(__name__)

SUPERVISOR_SESSION = "jupyter-tether-supervisor"
WORK_SESSION = "jupyter-tether-work"

#: where the marker lives, relative to the kernel's working directory (the server root)
MARKER_PATH = ".jupyter_tether/kernels.json"

# Runs in a kernel of the target (any Python >= 3.6, standard library only). With ``new``
# set it claims ``name`` for ``new`` if the marker still says ``expected``; either way it
# leaves the marker's current kernel id for ``name`` in ``_jupyter_tether_marker``.
_MARKER_CODE = """\
def _jupyter_tether_marker_op(name, new, expected, rel={rel!r}):
    import json, os, time
    try:
        import fcntl
    except ImportError:
        fcntl = None
    path = os.path.join(os.getcwd(), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            data = {{}}
        if not isinstance(data, dict):
            data = {{}}
        entry = data.get(name)
        current = entry.get("kernel_id") if isinstance(entry, dict) else None
        if new is not None and current == expected:
            data[name] = {{"kernel_id": new, "claimed_at": time.time()}}
            tmp = "%s.%d.tmp" % (path, os.getpid())
            with open(tmp, "w") as handle:
                json.dump(data, handle)
            os.replace(tmp, path)
            current = new
        return current
_jupyter_tether_marker = _jupyter_tether_marker_op({name!r}, {new!r}, {expected!r})
"""


def _session_matches(session: dict[str, Any], name: str) -> bool:
    # jupyter_server keeps name and path; a Kernel Gateway keeps only notebook.path.
    notebook = session.get("notebook") or {}
    return name in (session.get("name"), session.get("path"), notebook.get("path"))


def _live_session_kernel(sessions: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for session in sessions:
        kernel = session.get("kernel") or {}
        if _session_matches(session, name) and kernel.get("id") \
                and kernel.get("execution_state") != "dead":
            return dict(kernel)
    return None


async def _alive(rest: JupyterRest, kernel_id: str | None) -> bool:
    if not kernel_id:
        return False
    model = await rest.get_kernel(kernel_id)
    return model is not None and model.get("execution_state") != "dead"


async def _start_bare(rest: JupyterRest, kernel_name: str) -> str:
    # No ``env`` in the request: a Kernel Gateway would then give the kernel only PATH and
    # the KERNEL_* variables instead of its whole environment (HOME, CUDA_*, ...).
    return str((await rest.start_kernel(kernel_name, path=""))["id"])


class _FreshKernelFailed(Exception):
    """The fresh kernel did not come up: its websocket never opened, or it died or restarted
    before it answered; ``error`` says how it failed."""

    def __init__(self, error: TetherError) -> None:
        super().__init__(str(error))
        self.error = error


async def discard_failed_start(rest: JupyterRest, role: str, kernel_id: str,
                               error: BaseException) -> None:
    """Shut down a kernel we started just now that did not come up, so that the caller can
    start another (once). jupyter_client picks a kernel's ports by binding port 0 and letting
    go; another process may take one first, and ipykernel then hangs without answering (the
    server's restarter leaves it, and found again it would fail every connect) or dies at
    each restart until the server drops it."""
    log.warning("the %s kernel %s just started on %s did not come up (%s); starting another",
                role, kernel_id, rest.target.display_url, error)
    with anyio.CancelScope(shield=True), anyio.move_on_after(10), \
            contextlib.suppress(TetherError):
        await rest.shutdown_kernel(kernel_id)


async def find_or_start(rest: JupyterRest, name: str, *, kernel_name: str,
                        state: TargetState,
                        open_timeout: float = OPEN_TIMEOUT_S) -> tuple[str, bool]:
    """Return (kernel_id, started_now) for the named kernel, starting it if needed."""
    sessions = await rest.listable_sessions()
    kernel = _live_session_kernel(sessions or [], name)
    if kernel is not None:
        kernel_id, started = str(kernel["id"]), False
    else:
        remembered = state.load().get(f"kernel:{name}")
        if await _alive(rest, remembered):
            return str(remembered), False
        kernel_id = ""
        if sessions is not None:
            # A server that lists its sessions: the session itself is the durable record.
            try:
                began = anyio.current_time()
                session = await rest.create_session(name=name, path=name, kernel_name=kernel_name)
                kernel_id, started = str(session["kernel"]["id"]), True
                kernel_id = await _converge(rest, name, str(session["id"]), kernel_id,
                                            settle=anyio.current_time() - began)
                started = kernel_id == str(session["kernel"]["id"])
            except ServerError as exc:
                # Kernel Gateway 3 answers 500 to a second session on one path.
                log.info("cannot register the %s session (%s); using the marker", name, exc)
        if not kernel_id:
            kernel_id, started = await _find_or_claim_by_marker(rest, name, kernel_name,
                                                                open_timeout)
    state.update(**{f"kernel:{name}": kernel_id})
    return kernel_id, started


async def _converge(rest: JupyterRest, name: str, session_id: str, kernel_id: str, *,
                    settle: float) -> str:
    """Two controllers that both found no live session may both create one: keep one.

    The server lists a session only once its kernel has started, so a rival that began its
    create just before ours appeared may show up to one kernel start later: each creator
    waits as long as its own create took (plus a margin), lists the sessions, and picks
    the same winner (the smallest session id). A loser deletes its own session, kernel and
    all, before anything was injected into it, so jobs are never adopted twice.
    """
    await anyio.sleep(min(settle, 5.0) + 0.3)
    sessions = await rest.listable_sessions() or []
    live = [s for s in sessions if _session_matches(s, name) and (s.get("kernel") or {}).get("id")
            and (s.get("kernel") or {}).get("execution_state") != "dead"]
    if len(live) <= 1:
        return kernel_id
    winner = min(live, key=lambda s: str(s.get("id")))
    if str(winner.get("id")) == session_id:
        return kernel_id
    log.info("another controller started the %s kernel at the same time; using theirs", name)
    with contextlib.suppress(TetherError):
        await rest.delete_session(session_id)
    return str(winner["kernel"]["id"])


async def _find_or_claim_by_marker(rest: JupyterRest, name: str, kernel_name: str,
                                   open_timeout: float) -> tuple[str, bool]:
    """Gateways: read the marker from a fresh kernel; re-use its kernel or let the fresh one claim.

    A fresh kernel that never answers its websocket, or dies or restarts before its first
    answer (one can hang or die as it starts: see ``discard_failed_start``), is shut down
    and a second one tried."""
    for attempt in (1, 2):
        try:
            return await _claim_in_fresh(rest, name, kernel_name, open_timeout)
        except _FreshKernelFailed as exc:
            if attempt == 2:
                raise exc.error from None
            log.warning("a fresh %s kernel on %s did not come up (%s); starting another",
                        kernel_name, rest.target.display_url, exc)
    raise AssertionError("unreachable")


async def _claim_in_fresh(rest: JupyterRest, name: str, kernel_name: str,
                          open_timeout: float) -> tuple[str, bool]:
    fresh = await _start_bare(rest, kernel_name)
    chosen: str | None = None
    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            sock = KernelSocket(rest.target, fresh, session_id=new_session_id(),
                                cookies=rest.cookie_header, ping_interval=None,
                                open_timeout=open_timeout)
            try:
                try:
                    await sock.open(tg)
                    chosen = await _claim(rest, sock, name, fresh)
                except (ConnectionLost, KernelError) as exc:
                    if isinstance(exc, KernelError) and not sock.kernel_lost:
                        raise
                    raise _FreshKernelFailed(exc) from exc
            except _MarkerUnavailable as exc:
                # A read-only root, say: the fresh kernel serves, found again only through
                # this controller's local state.
                log.warning("no durable marker for the %s kernel on %s: %s", name,
                            rest.target.display_url, exc)
                chosen = fresh
            except Exception as exc:
                error = exc  # raised below, outside the task group (not as an ExceptionGroup)
            finally:
                await sock.aclose()
        if error is not None:
            raise error
    finally:
        if chosen != fresh:
            with anyio.CancelScope(shield=True) as scope, contextlib.suppress(TetherError):
                scope.deadline = anyio.current_time() + 10
                await rest.shutdown_kernel(fresh)
    assert chosen is not None
    return chosen, chosen == fresh


async def _claim(rest: JupyterRest, sock: KernelSocket, name: str, fresh: str) -> str:
    expected = await _marker_op(sock, name, None, None)
    for _ in range(5):
        if expected is not None and await _alive(rest, expected):
            return expected
        current = await _marker_op(sock, name, fresh, expected)
        if current == fresh:
            return fresh
        expected = current  # another controller claimed it first: check theirs
    raise KernelError(f"could not claim the {name} kernel on {rest.target.display_url}: "
                      "its marker keeps changing")


class _MarkerUnavailable(KernelError):
    """The marker file could not be read or written in the kernel."""


async def _marker_op(sock: KernelSocket, name: str, new: str | None,
                     expected: str | None) -> str | None:
    code = _MARKER_CODE.format(rel=MARKER_PATH, name=name, new=new, expected=expected)
    result = await execute(sock, code, timeout=60, silent=True, store_history=False,
                               wait_for_outputs=False,
                           user_expressions={"marker": "_jupyter_tether_marker"})
    if result.status != "ok":
        detail = result.error or {}
        raise _MarkerUnavailable(f"{MARKER_PATH}: {detail.get('ename')}: {detail.get('evalue')}")
    outcome = result.user_expressions.get("marker") or {}
    if outcome.get("status") != "ok":
        raise _MarkerUnavailable(f"{MARKER_PATH}: {outcome.get('ename')}: {outcome.get('evalue')}")
    text = (outcome.get("data") or {}).get("text/plain", "None")
    value = ast.literal_eval(text)
    return str(value) if value else None
