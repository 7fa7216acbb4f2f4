"""Through a real nginx shaped like Kaggle's proxy, on the latest server and on Kaggle's pins.

Every test runs twice: against ``jupyter_server`` + ipykernel from this environment
(``latest``) and from ``.venv-kaggle`` (``kaggle``: ``jupyter_server==2.12.5``,
``ipykernel==6.17.1``, no kernel subshells). The server is token-less behind nginx; the JWT in
the URL's path is the only credential (``tests/proxy_server.py``).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets.exceptions
import websockets.sync.client

from jupyter_tether import AuthError, LinkOptions, Tether

from .conftest import fast_options, iopub_seen
from .proxy_server import KaggleSite, kaggle_site, resolve_server_env, server_envs
from .remote_checks import (
    check_connect,
    check_exec,
    check_files,
    check_job_follow,
    check_reconnect,
)
from .test_cli import cli_env, one_error_line, tether_cli

#: nginx's proxy_read_timeout here (Kaggle's is 20 s): an idle test waits past it
READ_TIMEOUT_S = 3


@pytest.fixture(scope="module", params=server_envs())
def site(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[KaggleSite]:
    env = resolve_server_env(request.param)
    with kaggle_site(tmp_path_factory.mktemp(f"kaggle-{env.name}"), env,
                     read_timeout=READ_TIMEOUT_S) as running:
        yield running


@pytest.fixture
def t(site: KaggleSite, tmp_path: Path) -> Iterator[Tether]:
    """A controller given only the proxied URL, as a user pastes it from Kaggle."""
    with Tether(site.url, options=fast_options(), output_dir=tmp_path) as tether:
        yield tether


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


#: numbered lines written over ~3 s, then a burst, then exit 3: follow must see each byte once
SLOW_LINES, BURST_LINES = 30, 20_000
SLOW_JOB = ("python3 -c \"import sys, time\n"
            f"for i in range({SLOW_LINES}):\n    print('slow', i, flush=True); time.sleep(0.1)\n"
            f"for i in range({BURST_LINES}):\n    print('line', i)\n"
            "sys.exit(3)\"")


def slow_job_output() -> bytes:
    return ("".join(f"slow {i}\n" for i in range(SLOW_LINES))
            + "".join(f"line {i}\n" for i in range(BURST_LINES))).encode()


def test_connect_and_exec_through_the_proxy_on_the_environment_versions(
        site: KaggleSite, t: Tether) -> None:
    check_connect(t, site.server.root_dir)
    check_exec(t, site.server.root_dir)
    version = t.exec("import ipykernel; ipykernel.__version__").results[0]["data"]["text/plain"]
    if site.env.pins:
        assert version.strip("'") == site.env.pins["ipykernel"], "the pinned kernel runs"
        assert t.portal.call(t.aio.server_version)["version"] == site.env.pins["jupyter_server"]
    # The JWT is the credential: it never shows in what the controller reports.
    assert site.proxy.jwt not in str(t.status()) and site.proxy.jwt not in repr(t)


def test_each_supervisor_reply_is_one_websocket_message(t: Tether) -> None:
    """No busy/idle pair around replies, with or without kernel subshells: behind nginx the
    second small message of a burst waits ~40 ms for a delayed ACK."""
    for _ in range(3):
        t.ping()
    time.sleep(0.5)  # what connecting stirred up (the comm_open's status pair, events) is over
    with iopub_seen(t) as seen:
        for _ in range(20):
            t.ping()
            t.jobs.list()
    assert seen.count("comm_msg") >= 40  # the replies, and maybe an event
    assert "status" not in seen, seen[:12]


class CallCounter:
    """What one controller call costs: the supervisor ops it sends, the supervisor's
    websocket messages that come back, and the REST requests it makes."""

    def __init__(self, t: Tether) -> None:
        self.link = t.aio.link
        self.rest = t.aio.rest
        self.ops: list[str] = []
        self.messages: list[str] = []
        self.requests: list[str] = []

    def measure(self, action: Callable[[], Any]) -> tuple[list[str], int, list[str]]:
        """(ops, comm messages back, REST requests) of ``action``."""
        link, rest = self.link, self.rest
        sock = link._sock
        assert sock is not None
        call, route, request = link.call, sock._route, rest.request

        async def counted_call(op: str, *args: Any, **kwargs: Any) -> Any:
            self.ops.append(op)
            return await call(op, *args, **kwargs)

        def spy(msg: Any) -> None:
            if msg.channel == "iopub":
                self.messages.append(msg.msg_type)
            route(msg)

        async def counted_request(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
            self.requests.append(f"{method} {path}")
            return await request(method, path, *args, **kwargs)

        self.ops.clear()
        self.messages.clear()
        self.requests.clear()
        link.call, sock._route, rest.request = (  # type: ignore[method-assign]
            counted_call, spy, counted_request)
        try:
            action()
        finally:
            del link.call, sock._route, rest.request
        return list(self.ops), self.messages.count("comm_msg"), list(self.requests)


def test_small_calls_are_one_call_and_one_message_each(t: Tether) -> None:
    """Behind the proxy every message after the first of a burst waits ~40 ms for a
    delayed ACK, and a far link pays its round trip per call: ping (the server version is
    kept), tail (the job's state comes with it), a follow of an ended job (its end comes
    with the reply, no events, no unfollow) and a small exec (relayed by the supervisor)
    are each one supervisor call answered by one message, and no REST request."""
    job = t.jobs.start("printf 'a\\nb\\n'; exit 3")
    assert job.wait(30).exit_code == 3
    t.ping()
    t.exec("0")  # the default work kernel is there, the supervisor attached to it
    time.sleep(0.5)  # the job's end announced: nothing else is on its way
    counter = CallCounter(t)
    assert counter.measure(t.ping) == (["ping"], 1, [])
    assert counter.measure(lambda: job.tail(1)) == (["job_tail"], 1, [])
    assert job.info is not None and job.info.exit_code == 3
    followed: list[bytes] = []
    assert counter.measure(lambda: followed.extend(job.follow())) == (["job_follow"], 1, [])
    assert b"".join(followed) == b"a\nb\n"
    result: list[Any] = []
    assert counter.measure(lambda: result.append(t.exec("6 * 7"))) == (["kernel_exec"], 1, [])
    assert result[0].value == "42"
    assert t.aio._work_sockets == {}, "no websocket to the work kernel was needed"


def test_exec_streams_times_out_and_falls_back_to_the_websocket(
        site: KaggleSite, t: Tether) -> None:
    """Relayed exec keeps exec's semantics on both kernel lines; where the supervisor cannot
    reach the kernel (no connection file: a gateway's kernel) the websocket path runs it."""
    seen: list[str] = []
    result = t.exec("import time\nprint('start', flush=True)\ntime.sleep(30)", timeout=2,
                    on_output=lambda kind, text: seen.append(text))
    assert result.status == "timeout" and "start\n" in seen
    assert result.error is not None and result.error["ename"] == "KeyboardInterrupt"
    kernel_id = t.status()["work_kernel_id"]
    path = Path(str(t.exec("from ipykernel.connect import get_connection_file\n"
                           "get_connection_file()").value).strip("'"))
    assert path.name == f"kernel-{kernel_id}.json"
    path.rename(path.with_suffix(".away"))
    try:
        counter = CallCounter(t)
        ops, _, _ = counter.measure(lambda: seen.append(str(t.exec("2 + 2").value)))
        assert ops == ["kernel_exec"] and seen[-1] == "4"
        assert kernel_id in t.aio._work_sockets, "it ran over the work kernel's websocket"
    finally:
        path.with_suffix(".away").rename(path)


def test_job_follow_tail_and_list_through_the_proxy(t: Tether) -> None:
    check_job_follow(t)
    job = t.jobs.start("printf 'a\\nb\\nc\\n'")
    assert job.wait(30).exit_code == 0
    assert job.tail(2) == "b\nc\n"
    assert job.job_id in {info.job_id for info in t.jobs.list()}


def test_files_through_the_proxy(t: Tether, tmp_path: Path) -> None:
    check_files(t, tmp_path / "local", "proxied-files")


def test_reconnect_through_the_proxy(t: Tether) -> None:
    check_reconnect(t)


def test_direct_to_the_same_server_without_the_proxy(site: KaggleSite, tmp_path: Path) -> None:
    """The server on its own (no nginx): what the proxied figures are measured against."""
    with Tether(site.server.url, "", options=fast_options(), output_dir=tmp_path) as direct:
        check_connect(direct, site.server.root_dir)
        check_job_follow(direct)


def test_idle_link_outlives_the_proxy_read_timeout(site: KaggleSite, tmp_path: Path) -> None:
    """Default options: the keepalive keeps nginx from timing the idle websocket out."""
    with Tether(site.url, options=LinkOptions(), output_dir=tmp_path) as t:
        status = t.status()
        assert status["connected"]
        kernel_id = status["kernel_id"]
        # A control: the same path with no keepalive is cut by nginx's read timeout.
        ws_url = site.url.replace("http://", "ws://") + f"api/kernels/{kernel_id}/channels"
        with websockets.sync.client.connect(ws_url, ping_interval=None) as bare:
            time.sleep(2 * READ_TIMEOUT_S + 1)
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                while True:  # whatever the kernel said on connect, then the close
                    bare.recv(timeout=5)
        after = t.status()
        assert after["connected"] and after["reconnects"] == status["reconnects"], after
        assert after["last_drop"] == ""
        assert t.ping()["ok"]


def test_rotated_jwt_gives_fresh_url_error_and_the_fresh_url_finds_jobs_intact(
        site: KaggleSite, tmp_path: Path) -> None:
    old_jwt = site.proxy.jwt
    with Tether(site.url, options=fast_options(), output_dir=tmp_path / "old") as old:
        pid = old.info()["pid"]
        job = old.jobs.start(SLOW_JOB)
        site.proxy.rotate()  # nginx drops the old connections; the old URL answers 403
        wait_until(lambda: "fresh URL" in old.status()["last_error"], 15,
                   "the old URL's reconnect to be refused")
        with pytest.raises(AuthError, match="fresh URL") as caught:
            old.ping(timeout=30)
        assert "403" in str(caught.value) and old_jwt not in str(caught.value)
        assert old_jwt not in str(old.status())
    with Tether(site.url, options=fast_options(), output_dir=tmp_path / "new") as fresh:
        assert fresh.status()["install"] == "reused"
        assert fresh.info()["pid"] == pid, "the same supervisor"
        again = fresh.jobs.get(job.job_id)
        assert b"".join(again.follow()) == slow_job_output(), "the log is whole"
        info = again.wait(30)
        assert (info.state, info.exit_code) == ("exited", 3)


def test_nginx_killed_mid_follow_resumes_with_every_byte_once(
        site: KaggleSite, t: Tether) -> None:
    job = t.jobs.start(SLOW_JOB)
    received: list[bytes] = []
    killed = False
    with job.follow() as follower:
        for chunk in follower:
            received.append(chunk)
            if not killed:
                killed = True
                site.proxy.kill()  # every connection through nginx drops at once
                time.sleep(0.3)
                site.proxy.start()
    assert killed
    assert b"".join(received) == slow_job_output()
    assert job.wait(30).exit_code == 3
    assert t.status()["reconnects"] >= 1, "the follow went over a new connection"


def test_https_and_wss_trust_the_users_ca_and_refuse_an_unknown_one(site: KaggleSite) -> None:
    # One TLS context serves the REST calls (httpx2) and the kernel websocket (wss): both
    # must trust what SSL_CERT_FILE names, and a certificate nobody vouches for is refused.
    # A fresh process per case: the context is built once per process.
    without_ours = {k: v for k, v in cli_env().items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    ours = {**without_ours, "SSL_CERT_FILE": str(site.proxy.tls.ca_cert)}
    ran = tether_cli(None, "--url", site.proxy.https_url, "exec", "print(6 * 7)",
                     env=ours, process=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "42"
    refused = tether_cli(None, "--url", site.proxy.https_url, "status", env=without_ours,
                         process=True)
    assert refused.returncode == 1
    line = one_error_line(refused)
    assert "certificate" in line and "SSL_CERT_FILE" in line, line
    assert site.proxy.jwt not in refused.stderr


def test_mcp_server_connections_have_nagle_off() -> None:
    """Else every tool call over a real link waits ~40 ms more: the result event, written
    after the response head, sits in Nagle's buffer until the client's delayed ACK."""
    from jupyter_tether.mcp_server.server import listen_socket

    async def accepted_nodelay() -> int:
        listener = listen_socket("127.0.0.1", 0)
        port = listener.getsockname()[1]
        seen: list[int] = []

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        # As uvicorn serves a socket given to it: asyncio's server on that socket.
        server = await asyncio.start_server(on_connect, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            while not seen:
                await asyncio.sleep(0.01)
            writer.close()
        return seen[0]

    assert asyncio.run(accepted_nodelay()) != 0
