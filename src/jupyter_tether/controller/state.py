"""Local state kept per target: the websocket session id and the kernels we own there.

A stable ``session_id`` lets the server replay what it buffered while we were away; the
kernel ids let a restarted controller find its supervisor without asking the server twice.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import platformdirs

STATE_DIR_ENV = "JUPYTER_TETHER_STATE_DIR"
_lock = threading.Lock()


def state_dir() -> Path:
    override = os.environ.get(STATE_DIR_ENV)
    return Path(override) if override else Path(platformdirs.user_state_dir("jupyter-tether"))


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

    def update(self, **changes: Any) -> dict[str, Any]:
        with _lock:
            data = self.load()
            data.update(changes)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=1)
            os.replace(tmp, self.path)
            return data
