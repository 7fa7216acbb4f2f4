"""A local Jupyter server that jupyter-tether starts and stops itself (the no-URL default).

Also what the test suite runs against: a real ``jupyter_server`` process on a free loopback
port, with a random token and its own root directory.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx2

from ..config import default_root
from ..errors import TetherError
from ..lean_imports import FORMAT_CHECKERS
from .target import Target, tls_context


def run_module_argv(python: str | os.PathLike[str], module: str) -> list[str]:
    """``python -m module``, started as if jsonschema's format checkers were not installed
    (``lean_imports``): a Jupyter server, Kernel Gateway or JupyterHub starts 1-2 CPU-s
    faster."""
    return [os.fspath(python), "-c",
            f"import runpy, sys; sys.modules.update(dict.fromkeys({FORMAT_CHECKERS!r})); "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"]


def _ephemeral_low() -> int:
    """Where the system's ephemeral ports start (outgoing connections' source ports)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port for a server to bind, below the ephemeral range: a port the
    system hands out (``bind(0)``) is also a source port for outgoing connections, and one
    may take it before the server binds it (seen: a test JupyterHub's proxy, EADDRINUSE)."""
    high = _ephemeral_low() - 1
    for _ in range(50):
        port = secrets.randbelow(max(1, high - 20000)) + 20000 if high > 21000 else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    with socket.socket() as sock:  # all taken: any free port
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalJupyterServer:
    """``with LocalJupyterServer() as server: connect(server.url, server.token)``."""

    def __init__(self, root_dir: str | os.PathLike[str] | None = None, *, port: int | None = None,
                 token: str | None = None, extra_args: list[str] | None = None,
                 log_path: str | os.PathLike[str] | None = None,
                 python: str | os.PathLike[str] | None = None, base_url: str = "/") -> None:
        self.root_dir = Path(root_dir).expanduser().absolute() if root_dir else default_root()
        self.port = port or free_port()
        self.token = secrets.token_hex(16) if token is None else token
        self.extra_args = extra_args or []
        #: the server's log; by default in a private folder of its own (``mkdtemp``: 0700
        #: and an unguessable name, so no other local user reads it or plants a link at its
        #: name), removed when the server stops unless its start failed
        self._log_arg = Path(log_path) if log_path else None
        self.log_path = self._log_arg
        self._log_dir: Path | None = None
        #: the interpreter that runs ``jupyter_server`` (and, through its kernelspec, the
        #: kernels): another environment's python runs the server versions installed there
        # (absolute: the server starts in root_dir; not resolved: a venv's python is a link)
        self.python = os.path.abspath(python) if python else sys.executable
        #: the path the server answers under (``ServerApp.base_url``), as behind a proxy
        self.base_url = "/" + base_url.strip("/") + "/" if base_url.strip("/") else "/"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_url}"

    @property
    def target(self) -> Target:
        return Target(self.url, self.token, name="local")

    def start(self, timeout: float = 60.0) -> LocalJupyterServer:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            *run_module_argv(self.python, "jupyter_server"),
            "--no-browser",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.root_dir={self.root_dir}",
            f"--ServerApp.base_url={self.base_url}",
            "--ServerApp.open_browser=False",
            *self.extra_args,
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            argv.append("--allow-root")  # containers and CI run as root
        env = dict(os.environ)
        # The token goes in the environment (jupyter_server reads JUPYTER_TOKEN), never in
        # argv, which every local user can read in the process list.
        env.pop("JUPYTER_TOKEN_FILE", None)
        if self.token:
            env["JUPYTER_TOKEN"] = self.token
        else:  # an empty JUPYTER_TOKEN would mean "generate one": no token is said in argv
            env.pop("JUPYTER_TOKEN", None)
            argv.append("--IdentityProvider.token=")
        # Keep user-level config out of what we start.
        env.setdefault("JUPYTER_PLATFORM_DIRS", "1")
        if self._log_arg is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="jupyter-tether-server-"))
            self.log_path = self._log_dir / "server.log"
        else:
            self.log_path = self._log_arg
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.root_dir, env=env, start_new_session=True)
        finally:
            os.close(log)
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"token {self.token}"} if self.token else {}
        with httpx2.Client(headers=headers, timeout=2, verify=tls_context()) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    self._log_dir = None  # kept: the error points at it
                    raise TetherError(
                        f"the local Jupyter server exited with {self.process.returncode}; "
                        f"see {self.log_path}"
                    )
                try:
                    if http.get(self.url + "api/status").status_code == 200:
                        return self
                except httpx2.HTTPError:
                    pass
                time.sleep(0.1)
        self._log_dir = None  # kept: the error points at it
        self.stop()
        raise TetherError(f"the local Jupyter server did not start in {timeout}s; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()  # jupyter_server shuts its kernels down on SIGTERM
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        log_dir, self._log_dir = self._log_dir, None
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)

    def __enter__(self) -> LocalJupyterServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
