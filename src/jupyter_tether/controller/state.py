"""Local state kept per target: the websocket session id and the kernels we own there.

A stable ``session_id`` lets the server replay what it buffered while we were away; the
kernel ids let a restarted controller find its supervisor without asking the server twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: threads are still serialised by _lock
    fcntl = None  # type: ignore[assignment]

import platformdirs

STATE_DIR_ENV = "JUPYTER_TETHER_STATE_DIR"
_lock = threading.Lock()


def state_dir() -> Path:
    override = os.environ.get(STATE_DIR_ENV)
    return Path(override) if override else Path(platformdirs.user_state_dir("jupyter-tether"))


_SESSIONS_IN_USE: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TargetState:
    """A small JSON file per target; writes are atomic, reads tolerate a missing file."""

    def __init__(self, key: str, directory: Path | None = None) -> None:
        self.path = (directory or state_dir()) / f"target-{key}.json"

    def load(self) -> dict[str, Any]:
        try:
            value = json.loads(self.path.read_text())
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive across threads and, where flock exists, across processes."""
        with _lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(str(self.path) + ".lock", "a") as lock_file:
                if fcntl is not None:
                    fcntl.flock(lock_file, fcntl.LOCK_EX)
                yield

    def _write(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
        os.replace(tmp, self.path)

    def update(self, **changes: Any) -> dict[str, Any]:
        with self._locked():
            data = self.load()
            data.update(changes)
            self._write(data)
            return data

    def claim_session_id(self, channel: str) -> str:
        """The saved websocket session id for ``channel``, unless another live controller holds it.

        The server replays buffered messages to a returning session id, but two live sockets
        with one id make the server drop one of them, so concurrent controllers (two
        processes, or two tethers in one) each need their own.
        """
        from .kernel_ws import new_session_id

        with self._locked():  # two processes starting together must not take one id
            saved = self.load()
            session_id = saved.get(f"ws_session:{channel}")
            owner = saved.get(f"ws_owner:{channel}")
            taken = session_id in _SESSIONS_IN_USE or (
                isinstance(owner, int) and owner != os.getpid() and _pid_alive(owner))
            if not session_id or taken:
                session_id = new_session_id()
            _SESSIONS_IN_USE.add(session_id)
            if not taken:
                saved.update({f"ws_session:{channel}": session_id, f"ws_owner:{channel}": os.getpid()})
                self._write(saved)
        return str(session_id)

    @staticmethod
    def release_session_id(session_id: str) -> None:
        _SESSIONS_IN_USE.discard(session_id)
