"""Credentials go only where they belong (issue 11, items 2, 3, 4 and 9).

The Jupyter token reaches only its own server's origin (a spy listener proves it, through
the real MCP client and the real CLI); a changed token is never hidden by a cached tether
(a live server whose token rotates); no token is in any process's argv; the MCP server's
off-loopback guard takes --allowed-host and says so in words the scrubber leaves whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import psutil
import pytest
from mcp import Client

from jupyter_tether import cli
from jupyter_tether.config import AUTH_TOKEN_ENV, resolve_auth_token, select_target
from jupyter_tether.controller.embedded import LocalJupyterServer, free_port
from jupyter_tether.controller.target import parse_target
from jupyter_tether.credentials import scrub_secrets
from jupyter_tether.errors import ConfigError
from jupyter_tether.mcp_server import build_server, http_app
from jupyter_tether.mcp_server.server import split_allowed_host

from . import loopback_http
from .cli_inprocess import run_cli
from .conftest import fast_options
from .test_cli import SCRIPT, cli_env, one_error_line
from .test_mcp import Calls, McpProcess, connect
from .token_rotation import PROVIDER, TOKEN_FILE_ENV

REPO = Path(__file__).resolve().parent.parent


# --- a spy: a second listener that records everything sent to it -----------------------------


class Spy:
    """An HTTP server on its own loopback port (another origin) that answers 403 to all."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        spy = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                spy.requests.append(f"{self.command} {self.path}\n{self.headers}\n{body!r}")
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def saw(self, secret: str) -> bool:
        return any(secret in request for request in self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def spy() -> Iterator[Spy]:
    listener = Spy()
    yield listener
    listener.close()


# --- item 2: the token goes only to its own origin ---------------------------------------------


def test_env_token_is_bound_to_the_env_urls_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_JUPYTER_URL", "http://box:8888/")
    monkeypatch.setenv("REMOTE_JUPYTER_TOKEN", "env-secret")
    assert parse_target(None).token == "env-secret"
    assert parse_target("http://BOX:8888/lab/tree/x").token == "env-secret"  # same origin
    for other in ("http://evil:8888/", "http://box:8889/", "https://box:8888/", "box:80"):
        assert parse_target(other).token == "", other
    assert parse_target("http://evil/?token=own").token == "own"  # a URL's own token
    assert parse_target("http://evil/", "typed").token == "typed"  # a token given with it
    monkeypatch.delenv("REMOTE_JUPYTER_URL")
    assert parse_target("http://box:8888/").token == ""  # bound to no server at all
    chosen = select_target("http://evil:1/", path=Path("/nonexistent.toml"))
    assert chosen.env_token_withheld and "REMOTE_JUPYTER_TOKEN" in chosen.auth_hint()


@pytest.mark.anyio
async def test_mcp_server_url_elsewhere_never_gets_the_token(
        jupyter_server: LocalJupyterServer, spy: Spy, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The MCP server in this process, as `jupyter-tether mcp` builds it from its environment
    # (the flags' mapping is test_cli's): what it refuses is its tools' rule, not the process's.
    monkeypatch.setenv("JUPYTER_TETHER_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("JUPYTER_TETHER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("REMOTE_JUPYTER_URL", jupyter_server.url)
    monkeypatch.setenv("REMOTE_JUPYTER_TOKEN", jupyter_server.token)
    token = jupyter_server.token
    async with Client(build_server(options=fast_options())) as client:
        calls = Calls(client)
        for server_url in (spy.url, f"127.0.0.1:{spy.port}", f"{spy.url}lab"):
            text = await calls.error("jupyter_ping", {"server_url": server_url,
                                                      "timeout_s": 10})
            assert "refused" in text and "--allow-any-server" in text, text
        text = await calls.error("jupyter_job_submit", {"spec": {
            "run": {"command": "true"}, "server_url": spy.url}})
        assert "refused" in text and "--allow-any-server" in text, text
        # The default server by another URL of its origin keeps its token.
        assert (await calls.ok("jupyter_ping", {"server_url": jupyter_server.url + "lab"}))["ok"]
    assert spy.requests == [], "nothing may be sent to a server that is not allowed"

    async with Client(build_server(options=fast_options(), allow_any_server=True)) as client:
        calls = Calls(client)
        assert "refused the credentials" in await calls.error(
            "jupyter_ping", {"server_url": spy.url, "timeout_s": 10})
        await calls.error("jupyter_job_submit", {"spec": {
            "run": {"command": "true"}, "server_url": spy.url}})
        await calls.error("jupyter_ping", {"server_url": f"{spy.url}?token=spy-own-token",
                                           "timeout_s": 10})
        assert all(token not in text for text in calls.texts)
    assert len(spy.requests) >= 3, "--allow-any-server lets the calls through"
    assert not spy.saw(token), "the Jupyter token went to another origin"
    assert spy.saw("spy-own-token"), "a URL's own token goes with it"


def test_cli_url_elsewhere_never_gets_the_env_token(jupyter_server: LocalJupyterServer,
                                                    spy: Spy, tmp_path: Path) -> None:
    token = jupyter_server.token
    no_config = str(tmp_path / "none.toml")

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), cli_env(JUPYTER_TETHER_CONFIG=no_config, **env))

    env = {"REMOTE_JUPYTER_URL": jupyter_server.url, "REMOTE_JUPYTER_TOKEN": token}
    proc = run("--url", spy.url, "status", **env)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "refused the credentials" in line
    assert f"$REMOTE_JUPYTER_TOKEN is sent only to REMOTE_JUPYTER_URL's server " \
           f"({jupyter_server.url})" in line and "--token" in line
    # A token with no REMOTE_JUPYTER_URL is bound to no server.
    proc = run("--url", spy.url, "status", REMOTE_JUPYTER_TOKEN=token)
    assert "REMOTE_JUPYTER_URL is not set" in one_error_line(proc)
    assert not spy.saw(token)
    # A token typed with --url goes with it, as before.
    assert run("--url", spy.url, "--token", "typed-spy-token", "status").returncode == 1
    assert spy.saw("typed-spy-token") and not spy.saw(token)
    # The env server by a browser URL (same origin): the env token still applies.
    proc = run("--url", jupyter_server.url + "lab", "--json", "status", **env)
    assert proc.returncode == 0, proc.stderr


# --- item 3: a changed credential is used, not hidden by the open tether ----------------------


@pytest.fixture
def rotating_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                    ) -> Iterator[tuple[LocalJupyterServer, Path]]:
    """A real jupyter_server whose accepted token is whatever its token file says."""
    token_file = tmp_path / "token"
    token_file.write_text("first-token-0123456789")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(token_file))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *sys.path]))
    server = LocalJupyterServer(tmp_path / "root", token="first-token-0123456789",
                                extra_args=[f"--ServerApp.identity_provider_class={PROVIDER}"],
                                log_path=tmp_path / "rotating.log")
    with server:
        yield server, token_file


def _value(out: dict[str, Any]) -> str:
    assert out["status"] == "ok", out
    return str(out["results"][0]["data"]["text/plain"])


@pytest.mark.anyio
async def test_a_changed_token_is_used_not_hidden_by_the_open_tether(
        rotating_server: tuple[LocalJupyterServer, Path],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    server, token_file = rotating_server
    monkeypatch.delenv("REMOTE_JUPYTER_URL", raising=False)
    monkeypatch.setenv("JUPYTER_TETHER_CONFIG", str(tmp_path / "none.toml"))
    first, fresh = "first-token-0123456789", "fresh-token-9876543210"
    async with Client(build_server(url=server.url, token=first,
                                   options=fast_options())) as client:
        calls = Calls(client)
        before = await calls.ok("jupyter_status")
        job = await calls.ok("jupyter_job_start", {"command": "echo made-before-rotation"})
        await calls.ok("jupyter_exec_python", {"code": "kept = 'state'"})
        # Kaggle rotates the URL: the old token stops working, the open tether still runs.
        token_file.write_text(fresh)
        text = await calls.error("jupyter_ping", {
            "server_url": f"{server.url}?token=wrong-token-000000000", "timeout_s": 30})
        assert "refused the credentials" in text, text
        # The failed try left the open tether alone.
        assert (await calls.ok("jupyter_ping"))["ok"]
        ping = await calls.ok("jupyter_ping", {"server_url": f"{server.url}?token={fresh}"})
        assert ping["supervisor_pid"] == before["supervisor"]["pid"], "same live supervisor"
        # From now on the fresh token's tether serves every call, with or without server_url.
        after = await calls.ok("jupyter_status")
        assert after["link"]["session_id"] != before["link"]["session_id"]
        assert after["supervisor"]["pid"] == before["supervisor"]["pid"]
        assert _value(await calls.ok("jupyter_exec_python", {"code": "kept"})) == "'state'"
        waited = await calls.ok("jupyter_job_wait", {"job_id": job["job_id"], "timeout_s": 30})
        assert waited["done"] and waited["job"]["exit_code"] == 0
        assert await calls.follow_all(job["job_id"]) == "made-before-rotation\n"
        opened = [row for row in after["mcp_server"]["targets"] if row["state"] == "open"]
        assert len(opened) == 1, after["mcp_server"]["targets"]
        for text in calls.texts:
            assert first not in text and fresh not in text and "wrong-token-0" not in text


# --- item 4: no secret in a process listing ---------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _argv_of(process: psutil.Process) -> str:
    try:
        return Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            "utf-8", "replace")
    except OSError:
        return ""  # gone meanwhile


def _embedded_token(tree: list[psutil.Process]) -> str:
    servers = [p for p in tree if "jupyter_server" in _argv_of(p)]
    assert servers, "the embedded Jupyter server was not started"
    token = str(servers[0].environ().get("JUPYTER_TOKEN", ""))
    assert len(token) >= 16, "the embedded server's token comes through its environment"
    return token


def _assert_no_secret_in_argv(tree: list[psutil.Process], secrets: list[str]) -> None:
    assert len(tree) >= 3, [_argv_of(p) for p in tree]  # the server, a kernel or two
    for process in tree:
        argv = _argv_of(process)
        for secret in secrets:
            assert secret not in argv, f"a secret is in the argv of pid {process.pid}: {argv}"


def test_local_jupyter_server_takes_its_token_from_the_environment(tmp_path: Path) -> None:
    with LocalJupyterServer(tmp_path, token="embedded-token-abcdef123456") as server:
        assert server.process is not None
        process = psutil.Process(server.process.pid)
        assert "embedded-token-abcdef123456" not in _argv_of(process)
        assert process.environ()["JUPYTER_TOKEN"] == "embedded-token-abcdef123456"
        assert loopback_http.get(server.url + "api/kernels").status_code == 403


@pytest.mark.anyio
async def test_mcp_server_and_what_it_starts_keep_tokens_out_of_argv(
        tmp_path: Path) -> None:
    auth_token = "mcp-auth-token-5f1e2d3c4b5a"
    work = tmp_path / "work"
    work.mkdir()
    port = free_port()
    env = cli_env(JUPYTER_TETHER_CONFIG=str(tmp_path / "none.toml"),
                  JUPYTER_TETHER_STATE_DIR=str(tmp_path / "state"), **{AUTH_TOKEN_ENV: auth_token})
    log = tmp_path / "mcp.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyter_tether", "mcp", "--port", str(port),
             "--output-dir", str(tmp_path / "outputs")],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                unauthorized = loopback_http.post(url, json={}, timeout=1)
                break
            except httpx2.HTTPError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        assert unauthorized.status_code == 401, "the auth token came from the environment"
        async with connect(url, {"Authorization": f"Bearer {auth_token}"}) as client:
            calls = Calls(client)
            assert (await calls.ok("jupyter_status"))["embedded"]
            job = await calls.ok("jupyter_job_start", {"command": "sleep 30"})
            tree = _tree(process.pid)
            _assert_no_secret_in_argv(tree, [auth_token, _embedded_token(tree)])
            await calls.ok("jupyter_job_kill", {"job_id": job["job_id"]})
    finally:
        process.terminate()
        process.wait(30)


def test_cli_and_what_it_starts_keep_tokens_out_of_argv(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    code = ("import pathlib, time\npathlib.Path('started').touch()\n"
            "while not pathlib.Path('go').exists(): time.sleep(0.05)\nprint('done')")
    process = subprocess.Popen(
        [str(SCRIPT), "--root", str(work), "exec", code], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=work,
        env=cli_env(JUPYTER_TETHER_CONFIG=str(tmp_path / "none.toml")))
    try:
        deadline = time.monotonic() + 90
        while not (work / "started").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        tree = _tree(process.pid)
        _assert_no_secret_in_argv(tree, [_embedded_token(tree)])
        (work / "go").touch()
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert out.strip() == b"done"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_mcp_auth_token_from_a_file_or_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import jupyter_tether.mcp_server as mcp_server

    seen: dict[str, Any] = {}
    monkeypatch.setattr(mcp_server, "serve", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("JUPYTER_TETHER_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("REMOTE_JUPYTER_URL", raising=False)
    monkeypatch.delenv(AUTH_TOKEN_ENV, raising=False)
    token_file = tmp_path / "mcp-token"
    token_file.write_text("from-the-file-token\n")
    assert cli.main(["mcp", "--auth-token-file", str(token_file)]) == 0
    assert seen["auth_token"] == "from-the-file-token"
    monkeypatch.setenv(AUTH_TOKEN_ENV, "from-the-env-token")
    assert cli.main(["mcp"]) == 0
    assert seen["auth_token"] == "from-the-env-token"
    assert resolve_auth_token(None, token_file) == "from-the-file-token"  # the file wins
    assert resolve_auth_token("typed", None) == "typed"
    monkeypatch.delenv(AUTH_TOKEN_ENV)
    assert resolve_auth_token() is None
    token_file.write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_auth_token(None, token_file)
    with pytest.raises(ConfigError, match="not both"):
        resolve_auth_token("typed", token_file)
    capsys.readouterr()
    # A mistyped option next to --auth-token: argparse's error never quotes the token.
    with pytest.raises(SystemExit):
        cli.main(["mcp", "--auth-token", "argv-auth-secret", "--port", "argv-auth-secret"])
    err = capsys.readouterr().err
    assert "argv-auth-secret" not in err and "***" in err


# --- item 9: beyond loopback, usable and still safe -------------------------------------------


MISSING_TOKEN = (
    "error: {exposure} would let anyone who reaches it run code on the Jupyter server and read "
    "and write this machine's files: require a bearer token with --auth-token-file PATH or "
    "$JUPYTER_TETHER_AUTH_TOKEN (clients send 'Authorization: Bearer <token>'), or serve on "
    "127.0.0.1 only\n")


def test_missing_auth_token_message_is_exact_whatever_the_secrets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("JUPYTER_TETHER_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("REMOTE_JUPYTER_URL", raising=False)
    monkeypatch.delenv(AUTH_TOKEN_ENV, raising=False)
    # Short, common tokens, all inside words of the message: none may garble it.
    monkeypatch.setenv("REMOTE_JUPYTER_TOKEN", "auth")
    for argv, exposure in (
            (["mcp", "--host", "0.0.0.0", "--url", "http://127.0.0.1:9/", "--token", "bear"],
             "binding the MCP server to 0.0.0.0"),
            (["mcp", "--allowed-host", "mcp.example.org", "--url", "127.0.0.1:9",
              "--token", "each"],
             "--allowed-host mcp.example.org (clients reaching this server by that name, "
             "through a LAN or a reverse proxy)")):
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == MISSING_TOKEN.format(exposure=exposure)
    # Loopback names only: no token needed.
    http_app(build_server(url="http://127.0.0.1:9/"), allowed_hosts=["localhost:9000", "::1"])
    assert scrub_secrets("tests latest test, token=abc", ["test"]) == "tests latest ***, token=***"


def test_allowed_host_values() -> None:
    assert split_allowed_host("MCP.example.org") == ("mcp.example.org", None)
    assert split_allowed_host("proxy:8443") == ("proxy", 8443)
    assert split_allowed_host("[fd00::1]:9000") == ("fd00::1", 9000)
    assert split_allowed_host("fd00::1") == ("fd00::1", None)
    for bad in ("", "a/b", "*", "host:port", "host:0", "[::1]x", "user@host"):
        with pytest.raises(ConfigError, match="allowed-host"):
            split_allowed_host(bad)


@pytest.mark.anyio
async def test_allowed_host_behind_a_proxy(jupyter_server: LocalJupyterServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTH_TOKEN_ENV, "proxy-bearer-token-1234")
    proc = McpProcess(jupyter_server, tmp_path / "state", tmp_path / "mcp.log",
                      "--allowed-host", "mcp.example.org", "--allowed-host", "10.1.2.3:8443")
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "probe", "version": "0"}}}
    headers = {"Content-Type": "application/json",
               "Accept": "application/json, text/event-stream",
               "Authorization": "Bearer proxy-bearer-token-1234"}
    try:
        async with httpx2.AsyncClient(timeout=10) as http:
            async def status(**extra: str) -> int:
                response = await http.post(proc.url, json=body, headers={**headers, **extra})
                return response.status_code

            assert await status(Host="mcp.example.org") == 200  # a proxy's default port
            assert await status(Host=f"mcp.example.org:{proc.port}") == 200
            assert await status(Host="10.1.2.3:8443") == 200
            assert await status(Host="mcp.example.org", Origin="https://mcp.example.org") == 200
            assert await status(Host="10.1.2.3") == 421  # only the port it was given
            assert await status(Host="evil.example") == 421
            assert await status(Host="mcp.example.org", Origin="https://evil.example") == 403
            assert await status(Host="mcp.example.org", Authorization="Bearer wrong") == 401
    finally:
        proc.stop()
