"""A Jupyter server with one extra server extension, installed in a folder of its own.

The extension goes on that one server's ``PYTHONPATH`` only, so the other test servers stay
stock. The folder comes from an environment variable (``.ci/run`` prepares it) or is
pip-installed into ``$TMPDIR`` on first use, under a lock: pytest-xdist workers may ask at
the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from jupyter_tether.controller.embedded import LocalJupyterServer


def extension_site(env_var: str, folder: str, packages: list[str], module: str) -> Path:
    """The folder holding ``module``: ``$env_var`` as prepared (``.ci/run``), else
    ``$TMPDIR/folder``, pip-installed there once."""
    prepared = os.environ.get(env_var)
    if prepared:
        if not (Path(prepared) / module).is_dir():
            raise RuntimeError(f"${env_var}={prepared} holds no {module}: see .ci/run")
        return Path(prepared)
    site = Path(os.environ.get("TMPDIR", "/tmp")) / folder
    site.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{site}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (site / module).is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                            "--target", str(site), *packages], check=True, timeout=600)
    return site


@contextlib.contextmanager
def server_with_extension(site: Path, extension: str, root: Path,
                          log_name: str) -> Iterator[LocalJupyterServer]:
    """A running server whose ``PYTHONPATH`` has ``site`` and that enables ``extension``."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), old) if p)
    try:
        server = LocalJupyterServer(root, log_path=root.parent / log_name, extra_args=[
            f'--ServerApp.jpserver_extensions={{"{extension}": True}}'])
        server.start()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    try:
        yield server
    finally:
        server.stop()
