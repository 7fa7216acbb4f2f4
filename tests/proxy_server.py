"""A real nginx shaped like Kaggle's notebook proxy, and the server environments to test.

``KaggleProxy`` runs the system's nginx (Debian package; ``.ci/run`` installs it) as a child
process in its own temporary prefix (config, pid, logs, temp dirs), listening on a random
loopback port, in front of a token-less ``jupyter_server``:

- the public URL is ``http://127.0.0.1:<port>/k/<run>/<jwt>/proxy/``; the JWT path segment is
  the credential: nginx compares it with the current one (kept in an include file) and
  answers 403 to any other, as Kaggle's proxy does once a URL has rotated;
- the server runs with ``base_url`` ``/k/<run>/<first jwt>/`` (what Kaggle starts it with)
  and nginx maps every valid ``/k/<run>/<jwt>/proxy/<rest>`` onto it, byte for byte (the raw
  request URI, never a decoded one), so a rotated URL reaches the same server;
- the same site also listens with TLS (``https_url``), its certificate signed by a throwaway
  CA (``tls.ca_cert``), as a private CA's would be: a client trusts it through
  ``SSL_CERT_FILE`` or not at all;
- stock proxy settings otherwise: HTTP/1.1 upstream with websocket upgrade, response
  buffering on, a default ``client_max_body_size``, and a short ``proxy_read_timeout``
  (``read_timeout``, 5 s here against Kaggle's 20 s, to keep idle tests short).

``rotate()`` issues a fresh JWT and reloads nginx (the old URL answers 403 from then on;
old workers close their connections within ``worker_shutdown_timeout``); ``kill()`` SIGKILLs
nginx, master and workers, which drops every connection at once, and ``start()`` brings it
back on the same port.

``ServerEnv`` names a Python environment to run the remote ``jupyter_server`` and its kernels
from: ``latest`` (this venv) and ``kaggle`` (``.venv-kaggle``, Kaggle's pins
``jupyter_server==2.12.5`` and ``ipykernel==6.17.1``, built by ``.ci/run``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx2
import pytest

from jupyter_tether.controller.embedded import LocalJupyterServer, free_port

from . import loopback_http
from .tls_certs import make_tls_files

REPO = Path(__file__).resolve().parent.parent
#: where ``.ci/run`` builds the environment with Kaggle's pins
KAGGLE_VENV = REPO / ".venv-kaggle"
KAGGLE_PINS = {"jupyter_server": "2.12.5", "ipykernel": "6.17.1"}
#: the python of the pinned environment, when it lives elsewhere
KAGGLE_PYTHON_ENV = "JUPYTER_TETHER_KAGGLE_PYTHON"
#: set by ``.ci/run``: a missing nginx or pinned environment fails the tests, not skips them
REQUIRE_ENV = "JUPYTER_TETHER_CI"
BUILD_HINT = ("build it with: python3 -m venv .venv-kaggle && .venv-kaggle/bin/python -m pip "
              "install " + " ".join(f"{k}=={v}" for k, v in KAGGLE_PINS.items())
              + " (what .ci/run does)")


@dataclass(frozen=True)
class ServerEnv:
    """A Python environment the remote ``jupyter_server`` (and its kernels) run from."""

    name: str
    python: str
    #: package -> version this environment must have (checked before use)
    pins: dict[str, str]

    def versions(self) -> dict[str, str]:
        code = ("import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
                "('jupyter_server', 'ipykernel')}))")
        out = subprocess.run([self.python, "-c", code], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        versions: dict[str, str] = json.loads(out)
        return versions


def skip_unless_ci(message: str) -> None:
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(message)
    pytest.skip(message)


def server_envs() -> list[str]:
    return ["latest", "kaggle"]


def resolve_server_env(name: str) -> ServerEnv:
    """The named environment, checked; skips (fails under ``.ci/run``) when it is not built."""
    if name == "latest":
        return ServerEnv("latest", sys.executable, {})
    python = os.environ.get(KAGGLE_PYTHON_ENV) or str(KAGGLE_VENV / "bin" / "python")
    if not Path(python).exists():
        skip_unless_ci(f"the pinned server environment is missing ({python}): {BUILD_HINT}")
    env = ServerEnv("kaggle", python, dict(KAGGLE_PINS))
    found = env.versions()
    if found != env.pins:
        pytest.fail(f"{python} has {found}, not Kaggle's pins {env.pins}: {BUILD_HINT}")
    return env


def fake_jwt() -> str:
    """A token shaped like a JWT (three base64url parts); nginx only compares it."""
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = {"run": secrets.token_hex(4), "exp": int(time.time()) + 3600}
    return ".".join([part(b'{"alg":"HS256","typ":"JWT"}'), part(json.dumps(claims).encode()),
                     part(secrets.token_bytes(32))])


_NGINX_CONF = """\
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
# Old workers keep a reload's open connections at most this long (rotation drops them).
worker_shutdown_timeout 1s;
events {{ worker_connections 512; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; "" close; }}
    # The part after /proxy, taken from the raw request URI (query included, not decoded).
    map $request_uri $upstream_tail {{
        "~^/k/[^/]+/[^/]+/proxy(?<tail>/.*)$" $tail;
        default /;
    }}
    include {prefix}/jwt.conf;
    server {{
        listen 127.0.0.1:{port};
        # Kaggle's own URL is https: the same site, over TLS, with a certificate of our CA.
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {tls_cert};
        ssl_certificate_key {tls_key};
        location ~ ^/k/{run}/(?<jwt>[^/]+)/proxy(/|$) {{
            if ($jwt != $valid_jwt) {{ return 403; }}
            proxy_pass http://127.0.0.1:{upstream_port}{upstream_base}$upstream_tail;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_read_timeout {read_timeout}s;
            proxy_send_timeout {read_timeout}s;
        }}
        location / {{ return 404; }}
    }}
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


class KaggleProxy:
    """``with KaggleProxy(workdir, upstream_port, run, first_jwt) as proxy: Tether(proxy.url)``."""

    def __init__(self, workdir: Path, upstream_port: int, run: str, jwt: str, *,
                 read_timeout: float = 5.0, nginx: str | None = None) -> None:
        found = nginx or find_nginx()
        if found is None:
            raise RuntimeError("nginx is not installed: apt-get install -y nginx "
                               "(what .ci/run does)")
        self.nginx = found
        self.prefix = workdir
        self.port = free_port()
        self.upstream_port = upstream_port
        self.run = run
        self.jwt = jwt
        self.read_timeout = read_timeout
        self.tls_port = free_port()
        self.tls = make_tls_files(workdir / "tls")
        self.process: subprocess.Popen[bytes] | None = None
        self.rotations = 0

    @property
    def url(self) -> str:
        """The URL a user copies: the current JWT in its path, no other credential."""
        return self.url_for(self.jwt)

    def url_for(self, jwt: str) -> str:
        return f"http://127.0.0.1:{self.port}/k/{self.run}/{jwt}/proxy/"

    @property
    def https_url(self) -> str:
        """The same URL over TLS: its certificate is signed by ``tls.ca_cert`` only."""
        return f"https://127.0.0.1:{self.tls_port}/k/{self.run}/{self.jwt}/proxy/"

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    def _write_config(self, upstream_base: str) -> None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        # A root master hands its workers to ``nobody`` unless told otherwise (CI runs as root).
        user = "user root root;" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
        (self.prefix / "nginx.conf").write_text(textwrap.dedent(_NGINX_CONF.format(
            user=user, prefix=self.prefix, port=self.port, run=self.run,
            tls_port=self.tls_port, tls_cert=self.tls.server_cert, tls_key=self.tls.server_key,
            upstream_port=self.upstream_port, upstream_base=upstream_base.rstrip("/"),
            read_timeout=max(1, round(self.read_timeout)))))
        self._write_jwt()

    def _write_jwt(self) -> None:
        (self.prefix / "jwt.conf").write_text(f'map "" $valid_jwt {{ default "{self.jwt}"; }}\n')

    def configure(self, upstream_base: str) -> None:
        self._write_config(upstream_base)

    def start(self, timeout: float = 20.0) -> KaggleProxy:
        """Start nginx (again, after ``kill``) on the same port; return once it answers."""
        argv = [self.nginx, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"),
                "-e", str(self.error_log), "-g", "daemon off;"]
        with open(self.prefix / "nginx.out", "ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait(lambda status: status == 200, timeout, "nginx to answer")
        return self

    def _status(self, url: str) -> int | None:
        try:
            return loopback_http.get(url + "api/status", timeout=2).status_code
        except httpx2.HTTPError:
            return None

    def _wait(self, ok: Callable[[int | None], bool], timeout: float, what: str,
              url: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n"
                                   + self._logs())
            if ok(self._status(url or self.url)):
                return
            time.sleep(0.05)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}:\n" + self._logs())

    def _logs(self) -> str:
        text = ""
        for name in ("nginx.out", "error.log"):
            path = self.prefix / name
            if path.exists():
                text += f"--- {name}\n" + path.read_text(errors="replace")[-2000:]
        return text

    def rotate(self) -> str:
        """Issue a fresh JWT and reload nginx; return once the old URL answers 403.

        Connections made with the old JWT are closed by their (old) worker within a second,
        so a client holding one finds out on its next connect.
        """
        assert self.process is not None and self.process.poll() is None
        old = self.url
        self.jwt = fake_jwt()
        self._write_jwt()
        self.process.send_signal(signal.SIGHUP)
        self._wait(lambda status: status == 403, 20, "the old URL to be refused", url=old)
        self._wait(lambda status: status == 200, 20, "the fresh URL to answer")
        self.rotations += 1
        return self.url

    def kill(self) -> None:
        """SIGKILL nginx, master and workers: every connection through it drops at once."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # fast shutdown, workers included
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> KaggleProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass
class KaggleSite:
    """A token-less server from ``env`` behind a ``KaggleProxy``; ``server.url`` is direct."""

    env: ServerEnv
    server: LocalJupyterServer
    proxy: KaggleProxy

    @property
    def url(self) -> str:
        return self.proxy.url


@contextlib.contextmanager
def kaggle_site(workdir: Path, env: ServerEnv, *, read_timeout: float = 5.0) -> Iterator[KaggleSite]:
    """Start the server (base_url ``/k/<run>/<first jwt>/``, no token) and nginx in front."""
    if find_nginx() is None:
        skip_unless_ci("nginx is not installed: apt-get install -y nginx (what .ci/run does)")
    run = str(100_000_000 + secrets.randbelow(900_000_000))
    jwt = fake_jwt()
    root = workdir / "root"
    root.mkdir(parents=True, exist_ok=True)
    (workdir / "nginx").mkdir(exist_ok=True)
    server = LocalJupyterServer(root, token="", python=env.python, base_url=f"/k/{run}/{jwt}/",
                                log_path=workdir / "jupyter-server.log")
    proxy = KaggleProxy(workdir / "nginx", server.port, run, jwt, read_timeout=read_timeout)
    proxy.configure(server.base_url)
    with server, proxy:
        yield KaggleSite(env, server, proxy)
