"""Real Jupyter deployments for the tests: a Kernel Gateway and a JupyterHub, on loopback.

Each launcher starts the real program as a subprocess on random loopback ports, in its own
temporary directory (working dir, database, logs, runtime files), waits until it answers,
and stops it (and everything it spawned) at teardown.

- ``KernelGateway``: ``python -m kernel_gateway`` (jupyter_kernel_gateway 3, personality
  ``jupyter-websocket``) with an auth token; no contents API, and no sessions or kernels
  listing unless ``list_kernels=True``.
- ``JupyterHub``: ``python -m jupyterhub`` with configurable-http-proxy (from npm, see
  ``.ci/run``), ``DummyAuthenticator``, ``SimpleLocalProcessSpawner`` and an admin service
  token; ``start_server(user)`` creates the user, starts their single-user server through the
  hub REST API, waits until it is ready and returns a user API token for it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import TracebackType

import httpx2
import psutil

from jupyter_tether.controller.embedded import free_port, run_module_argv

from . import loopback_http

REPO = Path(__file__).resolve().parent.parent
#: where ``.ci/run`` installs configurable-http-proxy (``npm install --prefix .ci/node``)
CHP_PREFIX = REPO / ".ci" / "node"
CHP_ENV = "CONFIGPROXY_COMMAND"


def find_configurable_http_proxy() -> str | None:
    """The configurable-http-proxy command: $CONFIGPROXY_COMMAND, .ci/node, then PATH."""
    explicit = os.environ.get(CHP_ENV)
    if explicit:
        return explicit
    local = CHP_PREFIX / "node_modules" / ".bin" / "configurable-http-proxy"
    if local.exists():
        return str(local)
    return shutil.which("configurable-http-proxy")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    # The servers' kernels must not inherit the test run's controller state dir or target.
    for name in ("JUPYTER_TETHER_STATE_DIR", "REMOTE_JUPYTER_URL", "REMOTE_JUPYTER_TOKEN"):
        env.pop(name, None)
    return env


def _stop_tree(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM the process (it cleans up its kernels/servers), then KILL whatever is left."""
    if process is None:
        return
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    _, alive = psutil.wait_procs(children, timeout=3)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, *, timeout: float,
               headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200,)) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}:\n"
                               + log.read_text(errors="replace")[-3000:])
        try:
            if loopback_http.get(url, headers=headers, timeout=2).status_code in ok:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer in {timeout}s:\n"
                       + log.read_text(errors="replace")[-3000:])


class KernelGateway:
    """``with KernelGateway(workdir) as kg: Tether(kg.url, kg.token)``."""

    def __init__(self, workdir: Path, *, list_kernels: bool = False,
                 jupyter_path: Path | None = None) -> None:
        self.workdir = workdir
        self.jupyter_path = jupyter_path  # more kernelspecs (``<path>/kernels/<name>``)
        self.root = workdir / "root"  # the gateway's cwd: where its kernels start
        self.log_path = workdir / "kernel-gateway.log"
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.list_kernels = list_kernels
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> KernelGateway:
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [*run_module_argv(sys.executable, "kernel_gateway"),
                "--KernelGatewayApp.ip=127.0.0.1", f"--KernelGatewayApp.port={self.port}",
                "--KernelGatewayApp.port_retries=0",
                f"--JupyterWebsocketPersonality.list_kernels={self.list_kernels}"]
        env = _child_env()
        env["KG_AUTH_TOKEN"] = self.token  # kept out of the kernels' environment by KG
        if self.jupyter_path is not None:
            env["JUPYTER_PATH"] = str(self.jupyter_path)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.root, env=env, start_new_session=True)
        try:
            _wait_http(self.url + "api", self.process, self.log_path, timeout=60,
                       headers={"Authorization": f"token {self.token}"})
        except BaseException:
            self.stop()  # a start that failed leaves nothing running
            raise
        return self

    def kernel_pids(self) -> list[int]:
        """The kernels the gateway runs now (its child processes)."""
        assert self.process is not None
        return [p.pid for p in psutil.Process(self.process.pid).children()]

    def stop(self) -> None:
        _stop_tree(self.process)

    def __enter__(self) -> KernelGateway:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


_HUB_CONFIG = """\
c = get_config()  # noqa
c.JupyterHub.bind_url = {bind_url!r}
c.JupyterHub.hub_bind_url = {hub_bind_url!r}
c.JupyterHub.db_url = {db_url!r}
c.JupyterHub.cookie_secret_file = {cookie_secret_file!r}
c.JupyterHub.pid_file = {pid_file!r}
c.JupyterHub.cleanup_servers = True
c.JupyterHub.cleanup_proxy = True
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {home_template!r}
c.Spawner.cmd = {spawner_cmd!r}
c.Spawner.args = {spawner_args!r}
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 60
c.Spawner.env_keep = ["PATH", "PYTHONPATH", "LANG", "LC_ALL", "JUPYTER_PLATFORM_DIRS"]
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.ConfigurableHTTPProxy.api_url = {proxy_api_url!r}
c.ConfigurableHTTPProxy.auth_token = {proxy_token!r}
c.ConfigurableHTTPProxy.pid_file = {proxy_pid_file!r}
c.ConfigurableHTTPProxy.debug = False
c.JupyterHub.services = [{{"name": "tether-tests", "api_token": {admin_token!r}}}]
c.JupyterHub.load_roles = [{{
    "name": "tether-tests-admin",
    "scopes": ["admin:users", "admin:servers", "tokens", "access:servers"],
    "services": ["tether-tests"],
}}]
"""


class JupyterHub:
    """A real JupyterHub behind configurable-http-proxy; ``start_server(name)`` spawns a user."""

    def __init__(self, workdir: Path, chp: str) -> None:
        self.workdir = workdir
        self.chp = chp
        self.port = free_port()
        self.hub_port = free_port()
        self.proxy_api_port = free_port()
        self.admin_token = secrets.token_hex(16)
        self.log_path = workdir / "jupyterhub.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The public URL (the proxy)."""
        return f"http://127.0.0.1:{self.port}/"

    def home(self, user: str) -> Path:
        return self.workdir / "home" / user

    def start(self) -> JupyterHub:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = ["--ServerApp.ip=127.0.0.1"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-root")  # containers and CI run as root
        config = _HUB_CONFIG.format(
            bind_url=self.url, hub_bind_url=f"http://127.0.0.1:{self.hub_port}",
            db_url=f"sqlite:///{self.workdir / 'jupyterhub.sqlite'}",
            cookie_secret_file=str(self.workdir / "jupyterhub_cookie_secret"),
            pid_file=str(self.workdir / "jupyterhub.pid"),
            home_template=str(self.workdir / "home" / "{username}"),
            spawner_cmd=run_module_argv(sys.executable, "jupyterhub.singleuser"),
            spawner_args=args, chp=self.chp,
            proxy_api_url=f"http://127.0.0.1:{self.proxy_api_port}",
            proxy_token=secrets.token_hex(16),
            proxy_pid_file=str(self.workdir / "proxy.pid"),
            admin_token=self.admin_token)
        config_path = self.workdir / "jupyterhub_config.py"
        config_path.write_text(textwrap.dedent(config))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*run_module_argv(sys.executable, "jupyterhub"), "-f", str(config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=_child_env(),
                start_new_session=True)
        # Through the proxy: both the hub and the proxy's route to it are up.
        try:
            _wait_http(self.url + "hub/api/", self.process, self.log_path, timeout=60)
        except BaseException:
            self.stop()  # a start that failed leaves nothing running (the hub, its proxy)
            raise
        return self

    def api(self, method: str, path: str, **kwargs: object) -> httpx2.Response:
        response = loopback_http.request(method, self.url + "hub/api/" + path.lstrip("/"),
                                         headers={"Authorization": f"token {self.admin_token}"},
                                         timeout=30, **kwargs)  # type: ignore[arg-type]
        if response.status_code >= 400:
            raise RuntimeError(f"{method} hub/api/{path}: HTTP {response.status_code}: "
                               f"{response.text[:500]}")
        return response

    def start_server(self, user: str, timeout: float = 60.0) -> tuple[str, str]:
        """Create ``user``, spawn their server, wait for it; return (server URL, user token)."""
        self.api("POST", f"users/{user}")
        self.api("POST", f"users/{user}/server")
        deadline = time.monotonic() + timeout
        while True:
            model = self.api("GET", f"users/{user}").json()
            server = (model.get("servers") or {}).get("", {})
            if server.get("ready"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server of {user} did not become ready in {timeout}s:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        token = self.api("POST", f"users/{user}/tokens",
                         json={"note": "jupyter-tether tests", "expires_in": 3600}).json()["token"]
        return f"{self.url}user/{user}/", str(token)

    def stop(self) -> None:
        _stop_tree(self.process, timeout=20)

    def __enter__(self) -> JupyterHub:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
