"""Finding and starting the kernels jupyter-tether owns on a server, by session name.

The supervisor and the default work kernel are registered as Jupyter sessions with fixed
names, so any later controller (after a restart, on another laptop) finds them again. They
are started with a root-level session path, so their working directory is the server root.
"""

from __future__ import annotations

from typing import Any

from ..errors import NotFound
from .rest import JupyterRest
from .state import TargetState

SUPERVISOR_SESSION = "jupyter-tether-supervisor"
WORK_SESSION = "jupyter-tether-work"


async def find_session_kernel(rest: JupyterRest, name: str) -> dict[str, Any] | None:
    """The live kernel of the named session, or None. Gateways (no sessions API) use state."""
    try:
        sessions = await rest.list_sessions()
    except NotFound:
        return None
    for session in sessions:
        kernel = session.get("kernel") or {}
        if session.get("name") == name and kernel.get("execution_state") != "dead":
            return dict(kernel)
    return None


async def find_or_start(rest: JupyterRest, name: str, *, kernel_name: str,
                        state: TargetState) -> tuple[str, bool]:
    """Return (kernel_id, started_now) for the named kernel, starting it if needed."""
    kernel = await find_session_kernel(rest, name)
    if kernel is not None:
        return str(kernel["id"]), False
    remembered = state.load().get(f"kernel:{name}")
    if remembered and await rest.get_kernel(remembered) is not None:
        return str(remembered), False
    try:
        session = await rest.create_session(name=name, path=name, kernel_name=kernel_name)
        kernel_id = str(session["kernel"]["id"])
    except NotFound:
        # No sessions API (Kernel Gateway): a bare kernel, remembered in local state.
        kernel_id = str((await rest.start_kernel(kernel_name))["id"])
    state.update(**{f"kernel:{name}": kernel_id})
    return kernel_id, True
