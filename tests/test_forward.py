"""Port forwarding through the comm: real servers started as remote jobs, reached through
``t.forward`` on 127.0.0.1, across resets and blackholes of the link.

The first part drives the supervisor's stream service directly (``InProcess``: no Jupyter)
for what a hostile or broken client may send; the rest goes through a real Jupyter server.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx2
import psutil
import pytest
import websockets.sync.client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hyp

from jupyter_tether import ConfigError, Tether
from jupyter_tether.agent_payload import stream_state as st
from jupyter_tether.agent_payload import streams
from jupyter_tether.agent_payload.wire import ErrorCode, Op
from jupyter_tether.controller.embedded import free_port
from jupyter_tether.controller.forward import BlockingPortForward

from . import loopback_http
from .conftest import fast_options
from .inprocess import InProcess, remote_fixture, until
from .netfault import FaultProxy, proxied_server
from .server_extensions import extension_site, server_with_extension

__all__ = ["proxied_server", "remote_fixture"]  # fixtures: imported for pytest

MIB = 1024 * 1024
OWNER = "test-owner"


# --- the pure credit windows ------------------------------------------------------------------


def test_credit_reports_each_quarter_window_and_refuses_overruns() -> None:
    send, receive = st.SendCredit(1000), st.ReceiveCredit(1000)
    send.on_sent(1000)
    assert send.available == 0
    assert receive.on_data(1000)
    assert receive.on_consumed(249) is None, "no report before a quarter window"
    total = receive.on_consumed(1)
    assert total == 250 and send.on_ack(total) and send.available == 250
    assert not send.on_ack(5000), "an ack beyond what was sent is impossible"
    assert not send.on_ack(True)
    assert receive.on_data(250) and not receive.on_data(1), "one byte past the window"


# --- the supervisor's stream service, driven directly ------------------------------------------


class EchoServer:
    """A loopback TCP server that echoes, or (``record``) keeps what it receives."""

    def __init__(self, host: str = "127.0.0.1", record: bool = False) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.closed = threading.Event()
        self._record = record
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            with conn:
                while data := conn.recv(65536):
                    self.received += data
                    if not self._record:
                        conn.sendall(data)
        self.closed.set()

    def close(self) -> None:
        self.sock.close()


def stream_items(remote: InProcess, sid: int) -> list[tuple[str, Any, bytes]]:
    """Every (kind, value, blob) the supervisor pushed for stream ``sid`` so far."""
    found = []
    for envelope, blobs in list(remote.replies):
        if envelope.get("type") != st.ENVELOPE_TYPE:
            continue
        blob_index = 0
        for item_sid, kind, value in envelope["items"]:
            blob = b""
            if kind == st.DATA:
                blob = blobs[blob_index]
                blob_index += 1
            if item_sid == sid:
                found.append((kind, value, blob))
    return found


def open_args(port: int, sid: int = 1, **extra: Any) -> dict[str, Any]:
    return {"owner": OWNER, "sid": sid, "port": port, **extra}


def test_stream_carries_bytes_both_ways_and_half_close(remote: InProcess) -> None:
    server = EchoServer()
    result = remote.ok(Op.STREAM_OPEN, open_args(server.port))
    assert result["window"] == st.DEFAULT_WINDOW
    remote.submit(Op.STREAM_WRITE, {"owner": OWNER, "sid": 1}, [b"hello ", b"world"])
    until(lambda: b"".join(b for k, _, b in stream_items(remote, 1) if k == st.DATA)
          == b"hello world")
    remote.submit(Op.STREAM_CLOSE, {"owner": OWNER, "sid": 1, "how": "eof"})
    until(lambda: any(k == st.EOF for k, _, _ in stream_items(remote, 1)))
    assert server.closed.wait(5), "the remote end saw our half-close, then closed"
    assert remote.ok(Op.STREAM_SYNC, {"owner": OWNER, "live": [1]})["unknown"] == [1]
    server.close()


@pytest.mark.parametrize("connected_at_once", [True, False])
def test_bytes_that_ride_with_a_quiet_open_reach_the_remote_and_come_back(
        remote: InProcess, monkeypatch: pytest.MonkeyPatch, connected_at_once: bool) -> None:
    # A loopback connect is usually done when the open is handled (its bytes go at once);
    # otherwise the I/O thread finishes the connect and sends them.
    if not connected_at_once:
        monkeypatch.setattr(streams, "connect_done", lambda sock: False)
    server = EchoServer()
    remote.submit(Op.STREAM_OPEN, open_args(server.port, sid=7, quiet=True), [b"GET / ", b"x"])
    until(lambda: b"".join(b for k, _, b in stream_items(remote, 7) if k == st.DATA)
          == b"GET / x")
    assert not [v for k, v, _ in stream_items(remote, 7) if k == st.RESET]
    server.close()


def test_stream_refuses_other_hosts_unless_asked_and_bad_ports(remote: InProcess) -> None:
    server = EchoServer(host="127.0.0.2")  # loopback, but not the remote's "own" address
    error = remote.fails(ErrorCode.PERMISSION_DENIED, Op.STREAM_OPEN,
                         open_args(server.port, host="127.0.0.2"))
    assert "allow_remote_host=True" in error.message
    remote.ok(Op.STREAM_OPEN, open_args(server.port, host="127.0.0.2", allow_remote_host=True))
    for port in (0, 65536, -1, "80", True, None, 2.5):
        remote.fails(ErrorCode.INVALID_ARGUMENT, Op.STREAM_OPEN, open_args(port, sid=2))  # type: ignore[arg-type]
    # Control characters never make a host: refused, not echoed into a terminal line.
    for host in ("", "a/b", "x" * 300, 7, "evil\x1b[2J", "a\nb", "h\x7f"):
        remote.fails(ErrorCode.INVALID_ARGUMENT, Op.STREAM_OPEN,
                     open_args(server.port, sid=3, host=host))
    closed = free_port()
    error = remote.fails(ErrorCode.NOT_FOUND, Op.STREAM_OPEN, open_args(closed, sid=4))
    assert f"nothing listens on 127.0.0.1:{closed}" in error.message
    server.close()


def test_supervisor_survives_whatever_a_client_sends_to_streams(remote: InProcess) -> None:
    server = EchoServer(record=True)
    remote.ok(Op.STREAM_OPEN, open_args(server.port, window=st.MIN_WINDOW))
    junk: list[dict[str, Any]] = [
        {}, {"owner": 5}, {"owner": OWNER, "sid": "x"}, {"owner": OWNER, "sid": 2**60},
        {"owner": OWNER, "acks": "no"}, {"owner": OWNER, "acks": [[1], [None, 3], "z", [1, "a"]]},
        {"owner": OWNER, "sid": 1, "how": "sideways"}, {"owner": "o" * 100, "sid": 1},
        {"owner": OWNER, "live": list(range(st.MAX_STREAMS + 1))},
    ]
    for op in (Op.STREAM_WRITE, Op.STREAM_ACK, Op.STREAM_CLOSE, Op.STREAM_SYNC, Op.STREAM_OPEN):
        for args in junk:
            remote.submit(op, args, [b"junk"])
    remote.submit(Op.STREAM_WRITE, {"owner": OWNER, "sid": 99}, [b"to nobody"])
    assert remote.ok(Op.PING)["pong"]
    until(lambda: any(k == st.RESET for k, _, _ in stream_items(remote, 99)))
    # An ack for bytes never sent is a broken client: its stream is reset, nothing else.
    other = EchoServer(record=True)
    remote.ok(Op.STREAM_OPEN, open_args(other.port, sid=2))
    remote.submit(Op.STREAM_ACK, {"owner": OWNER, "acks": [[2, 12345]]})
    until(lambda: any(k == st.RESET for k, _, _ in stream_items(remote, 2)))
    assert other.closed.wait(5)
    assert remote.ok(Op.PING)["pong"]


_values = hyp.one_of(hyp.none(), hyp.booleans(), hyp.integers(-2**63, 2**63 - 1),
                     hyp.text(max_size=80), hyp.binary(max_size=64),
                     hyp.lists(hyp.lists(hyp.integers(-5, 2**40), max_size=3), max_size=4))
_stream_args = hyp.fixed_dictionaries({}, optional={
    key: _values for key in ("owner", "sid", "port", "host", "window", "how", "acks", "live",
                             "reset_below", "quiet", "allow_remote_host")})


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=hyp.sampled_from([Op.STREAM_OPEN, Op.STREAM_WRITE, Op.STREAM_ACK, Op.STREAM_CLOSE,
                            Op.STREAM_SYNC]),
       args=_stream_args, blobs=hyp.lists(hyp.binary(max_size=256), max_size=3))
def test_stream_ops_survive_any_arguments(remote: InProcess, op: str, args: dict[str, Any],
                                          blobs: list[bytes]) -> None:
    remote.submit(op, args, blobs)
    assert remote.ok(Op.PING)["pong"]
    remote.clear_replies()


def test_a_quiet_open_that_fails_says_why_in_the_stream(remote: InProcess) -> None:
    closed = free_port()
    remote.submit(Op.STREAM_OPEN, open_args(closed, sid=1, quiet=True))
    remote.submit(Op.STREAM_OPEN, open_args(closed, sid=2, quiet=True, host="127.0.0.2"))
    until(lambda: all(any(k == st.RESET for k, _, _ in stream_items(remote, sid))
                      for sid in (1, 2)))
    assert f"nothing listens on 127.0.0.1:{closed}" in stream_items(remote, 1)[0][1]
    assert "allow_remote_host=True" in stream_items(remote, 2)[0][1]


def test_a_client_overrunning_its_window_gets_a_reset_not_our_memory(remote: InProcess) -> None:
    server = EchoServer(record=True)
    remote.ok(Op.STREAM_OPEN, open_args(server.port, window=st.MIN_WINDOW))
    # A window, then twice more: however much of the first the remote has written out (and
    # so credited back) by then, the second overruns.
    for size in (st.MIN_WINDOW, 2 * st.MIN_WINDOW):
        remote.submit(Op.STREAM_WRITE, {"owner": OWNER, "sid": 1}, [b"x" * size])
    until(lambda: [v for k, v, _ in stream_items(remote, 1) if k == st.RESET])
    reasons = [v for k, v, _ in stream_items(remote, 1) if k == st.RESET]
    assert "overran" in reasons[0]
    remote.fails(ErrorCode.TOO_LARGE, Op.STREAM_WRITE, {"owner": OWNER, "sid": 1},
                 [b"y" * (st.MAX_WRITE_BYTES + 1)])


def test_stream_counts_are_bounded(remote: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "MAX_STREAMS_PER_OWNER", 2)
    server = EchoServer()
    remote.ok(Op.STREAM_OPEN, open_args(server.port, sid=1))
    remote.ok(Op.STREAM_OPEN, open_args(server.port, sid=2))
    error = remote.fails(ErrorCode.TOO_LARGE, Op.STREAM_OPEN, open_args(server.port, sid=3))
    assert "limit per controller" in error.message
    remote.fails(ErrorCode.CONFLICT, Op.STREAM_OPEN, open_args(server.port, sid=2))
    server.close()


def stream_service(remote: InProcess) -> streams.StreamService:
    (service,) = [getattr(c, "__self__", None) for c in remote.supervisor._closers
                  if isinstance(getattr(c, "__self__", None), streams.StreamService)]
    return service


def test_first_bytes_over_the_window_are_refused_before_any_connect(remote: InProcess) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(2)
    port = listener.getsockname()[1]
    remote.submit(Op.STREAM_OPEN, open_args(port, window=st.MIN_WINDOW, quiet=True),
                  [b"x" * (st.MIN_WINDOW + 1)])
    until(lambda: [v for k, v, _ in stream_items(remote, 1) if k == st.RESET])
    assert "window" in stream_items(remote, 1)[0][1]
    error = remote.fails(ErrorCode.TOO_LARGE, Op.STREAM_OPEN,
                         open_args(port, sid=2, window=st.MIN_WINDOW),
                         [b"x" * (st.MIN_WINDOW + 1)])
    assert "window" in error.message
    with pytest.raises(TimeoutError):  # a refused stream reaches nothing on the remote
        listener.accept()
    listener.close()


@pytest.mark.parametrize("quiet", [True, False])
def test_a_connect_that_cannot_start_fails_the_stream_and_frees_it(
        remote: InProcess, monkeypatch: pytest.MonkeyPatch, quiet: bool) -> None:
    def no_ipv6(host: str, port: int, family: int) -> Any:  # a remote with IPv6 disabled
        raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))

    monkeypatch.setattr(streams, "start_connect", no_ipv6)
    args = open_args(80, host="::1", quiet=quiet)
    if quiet:
        remote.submit(Op.STREAM_OPEN, args)
        until(lambda: [v for k, v, _ in stream_items(remote, 1) if k == st.RESET])
        reason = stream_items(remote, 1)[0][1]
    else:
        reason = remote.fails(ErrorCode.NOT_FOUND, Op.STREAM_OPEN, args).message
    assert "cannot connect to ::1:80 on the remote" in reason
    assert remote.ok(Op.STREAM_SYNC, {"owner": OWNER, "live": [1]})["unknown"] == [1]


def test_connects_by_name_are_bounded_and_skipped_once_reset(
        remote: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "MAX_STREAMS", 16)
    release, calls = threading.Event(), []

    def slow_resolver(host: str, port: int) -> socket.socket:  # a resolver that hangs
        calls.append(host)
        release.wait(20)
        raise OSError(errno.ECONNREFUSED, "refused")

    monkeypatch.setattr(streams, "connect_by_name", slow_resolver)
    try:
        for sid in range(1, streams.CONNECTORS + 1):  # every connector thread busy
            remote.submit(Op.STREAM_OPEN, open_args(80, sid=sid, host="localhost", quiet=True))
        until(lambda: len(calls) == streams.CONNECTORS)
        for sid in range(100, 140):  # opened and reset at once, again and again
            remote.submit(Op.STREAM_OPEN, open_args(80, sid=sid, host="localhost", quiet=True))
            remote.submit(Op.STREAM_CLOSE, {"owner": OWNER, "sid": sid, "how": "reset"})
        refused = until(lambda: [v for k, v, _ in stream_items(remote, 139) if k == st.RESET])
        assert "retry" in refused[0], "the connect queue is bounded"
    finally:
        release.set()
    until(lambda: stream_service(remote)._resolving == 0)
    assert len(calls) == streams.CONNECTORS, "no connect for a stream already reset"
    assert remote.ok(Op.PING)["pong"]


def test_a_host_name_that_cannot_be_resolved_at_all_fails_its_stream(
        remote: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    for sid, host in enumerate(("a..b", "x" * 64), 1):  # getaddrinfo raises UnicodeError
        error = remote.fails(ErrorCode.INVALID_ARGUMENT, Op.STREAM_OPEN,
                             open_args(80, sid=sid, host=host, allow_remote_host=True))
        assert "not a valid host name" in error.message
    # Whatever else the resolver raises ends the stream too, not the connector thread.
    monkeypatch.setattr(streams, "connect_by_name", lambda host, port: 1 / 0)
    remote.submit(Op.STREAM_OPEN, open_args(80, sid=3, host="localhost", quiet=True))
    reason = until(lambda: [v for k, v, _ in stream_items(remote, 3) if k == st.RESET])[0]
    assert "cannot connect to localhost:80 on the remote" in reason
    assert remote.ok(Op.STREAM_SYNC, {"owner": OWNER, "live": [3]})["unknown"] == [3]


def test_owners_a_client_makes_up_do_not_grow_the_supervisor(
        remote: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "MAX_STREAMS", 8)
    closed = free_port()
    for i in range(40):
        for op, args in ((Op.STREAM_SYNC, {"live": []}), (Op.STREAM_WRITE, {"sid": 1}),
                         (Op.STREAM_ACK, {"acks": []}), (Op.STREAM_CLOSE, {"sid": 1})):
            remote.submit(op, {"owner": f"{op}-{i}", **args})
        remote.fails(ErrorCode.NOT_FOUND, Op.STREAM_OPEN, {"owner": f"open-{i}", "sid": 1,
                                                           "port": closed})
    assert remote.ok(Op.PING)["pong"]
    assert len(stream_service(remote)._leases) <= st.MAX_STREAMS + 1


def test_streams_of_a_silent_controller_are_reset_when_its_lease_ends(
        remote: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "OWNER_LEASE_S", 0.5)
    monkeypatch.setattr(streams, "LEASE_CHECK_S", 0.1)
    server = EchoServer(record=True)
    remote.ok(Op.STREAM_OPEN, open_args(server.port))
    assert server.closed.wait(10), "the remote connection was closed when the lease ran out"
    assert remote.ok(Op.STREAM_SYNC, {"owner": OWNER, "live": [1]})["unknown"] == [1]


def test_streams_their_controller_no_longer_lists_are_dropped(
        remote: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    # A connection cancelled while its open was on the way: the controller forgot it, the
    # supervisor holds it, and the lease (renewed by the other connections) never runs out.
    server = EchoServer(record=True)
    remote.ok(Op.STREAM_OPEN, open_args(server.port))
    remote.ok(Op.STREAM_OPEN, {**open_args(server.port), "sid": 2})
    fresh = remote.ok(Op.STREAM_SYNC, {"owner": OWNER, "live": [2]})
    assert fresh["open"] == 2, "a fresh stream is kept: its open may be in flight"
    monkeypatch.setattr(streams, "UNLISTED_S", 0.0)
    assert remote.ok(Op.STREAM_SYNC, {"owner": OWNER, "live": [2]})["open"] == 1
    assert server.closed.wait(10), "the unlisted stream's remote connection was closed"
    assert remote.ok(Op.STREAM_SYNC, {"owner": OWNER, "live": [2]})["unknown"] == []


# --- through a real Jupyter server: servers started as remote jobs -----------------------------


@contextlib.contextmanager
def remote_job(t: Tether, command: str, port: int) -> Iterator[BlockingPortForward]:
    """Start ``command`` as a remote job, forward ``port``, wait until it listens there."""
    job = t.jobs.start(command)
    try:
        with t.forward(port) as fwd:
            deadline = time.monotonic() + 30
            while not fwd.probe():
                assert job.status().state == "running", job.tail()
                assert time.monotonic() < deadline, "the remote server never listened"
                time.sleep(0.2)
            yield fwd
    finally:
        job.kill(grace=1)


@pytest.fixture(scope="module")
def web_root(server_root: Path) -> Path:
    folder = server_root / "forward-web"
    folder.mkdir(exist_ok=True)
    with open(folder / "big.bin", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MIB))
    for i in range(50):
        (folder / f"small-{i}.txt").write_text(f"file {i} " * (i + 1))
    return folder


@pytest.fixture(scope="module")
def http_forward(tether: Tether, web_root: Path) -> Iterator[BlockingPortForward]:
    port = free_port()
    command = f"{sys.executable} -m http.server {port} --bind 127.0.0.1 --directory {web_root}"
    with remote_job(tether, command, port) as fwd:
        yield fwd


def test_forward_listens_on_loopback_only_and_lists_itself(
        tether: Tether, http_forward: BlockingPortForward) -> None:
    assert http_forward.url == f"http://127.0.0.1:{http_forward.local_port}/"
    with socket.socket() as probe:  # not on the machine's other addresses
        hostname_ip = socket.gethostbyname(socket.gethostname())
        if not hostname_ip.startswith("127."):
            assert probe.connect_ex((hostname_ip, http_forward.local_port)) != 0
    listed = [f for f in tether.forwards() if f["local_port"] == http_forward.local_port]
    assert listed and listed[0]["remote_listening"] is True


def test_get_of_64_mib_file_through_forward_is_byte_equal(
        http_forward: BlockingPortForward, web_root: Path) -> None:
    expected = hashlib.sha256((web_root / "big.bin").read_bytes()).hexdigest()
    digest = hashlib.sha256()
    size = 0
    with loopback_http.stream("GET", http_forward.url + "big.bin", timeout=120) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
    assert size == 64 * MIB and digest.hexdigest() == expected
    info = http_forward.info()
    assert info["bytes_down"] >= 64 * MIB and info["connections"] >= 1


def test_fifty_concurrent_small_gets_are_all_correct(
        http_forward: BlockingPortForward, web_root: Path) -> None:
    def get(i: int) -> bool:
        response = loopback_http.get(f"{http_forward.url}small-{i}.txt", timeout=60)
        return response.text == (web_root / f"small-{i}.txt").read_text()

    with ThreadPoolExecutor(50) as pool:
        assert all(pool.map(get, range(50)))
    until(lambda: http_forward.info()["active"] == 0)


WS_ECHO = """
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), max_size=None):
        await asyncio.Future()

asyncio.run(main())
"""


def test_websocket_echo_of_1000_messages_round_trips(tether: Tether, server_root: Path) -> None:
    script = server_root / "ws_echo.py"
    script.write_text(WS_ECHO)
    port = free_port()
    rng = random.Random(7)
    with remote_job(tether, f"{sys.executable} {script} {port}", port) as fwd, \
            websockets.sync.client.connect(f"ws://127.0.0.1:{fwd.local_port}/",
                                           max_size=None) as ws:
        for i in range(1000):
            message: str | bytes = rng.randbytes(rng.randint(1, 64 * 1024)) if i % 2 \
                else f"message {i}"
            ws.send(message)
            assert ws.recv(timeout=30) == message


ENDLESS = """
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
block = b"x" * 65536
while True:
    conn, _ = server.accept()
    try:
        while True:
            conn.sendall(block)
    except OSError:
        conn.close()
"""


def test_slow_local_reader_grows_neither_supervisor_nor_controller_memory(
        tether: Tether, server_root: Path) -> None:
    script = server_root / "endless.py"
    script.write_text(ENDLESS)
    port = free_port()
    supervisor = psutil.Process(tether.info()["pid"])
    controller = psutil.Process()
    with remote_job(tether, f"{sys.executable} {script} {port}", port) as fwd, \
            socket.create_connection(("127.0.0.1", fwd.local_port)) as sock:
        read = 0
        while read < 8 * MIB:  # at full speed first: the windows are open and warm
            read += len(sock.recv(MIB))
        before = (supervisor.memory_info().rss, controller.memory_info().rss)
        deadline = time.monotonic() + 4  # then slowly: ~1 MiB/s against ~100+ MiB/s on offer
        while time.monotonic() < deadline:
            read += len(sock.recv(64 * 1024))
            time.sleep(0.05)
        after = (supervisor.memory_info().rss, controller.memory_info().rss)
        ahead = fwd.info()["bytes_down"] - read
    growth = [(b - a) / MIB for a, b in zip(before, after, strict=True)]
    print(f"\n[forward] slow reader: supervisor +{growth[0]:.1f} MiB, controller "
          f"+{growth[1]:.1f} MiB, forwarded ahead of the reader {ahead / MIB:.1f} MiB")
    # Without flow control 4 s at full speed would be hundreds of MiB in one of them.
    assert growth[0] < 48 and growth[1] < 48


def test_closing_a_forward_resets_its_connections_and_bounds_them(
        tether: Tether, server_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_tether.controller import forward as forward_module

    monkeypatch.setattr(forward_module, "MAX_CONNECTIONS", 1)
    script = server_root / "endless.py"
    script.write_text(ENDLESS)
    port = free_port()
    with remote_job(tether, f"{sys.executable} {script} {port}", port) as fwd:
        held = socket.create_connection(("127.0.0.1", fwd.local_port))
        held.settimeout(30)
        assert held.recv(65536)
        with socket.create_connection(("127.0.0.1", fwd.local_port)) as extra:
            extra.settimeout(30)
            with pytest.raises(ConnectionResetError):
                while extra.recv(65536):
                    pass
        assert "more than 1 connections at once" in fwd.info()["last_error"]
        fwd.close()
        with pytest.raises(ConnectionResetError):
            while held.recv(MIB):
                pass
        held.close()


def test_remote_port_closed_refuses_local_connection_with_clear_message(tether: Tether) -> None:
    port = free_port()
    with tether.forward(port) as fwd:
        assert fwd.remote_listening is False
        with socket.create_connection(("127.0.0.1", fwd.local_port)) as sock:
            sock.settimeout(30)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass  # reset: the client sees the connection refused, as a closed port does
        until(lambda: fwd.info()["failed"] == 1)
        assert f"nothing listens on 127.0.0.1:{port} on the remote" in fwd.info()["last_error"]


def test_forward_arguments_are_checked_before_anything_listens(tether: Tether) -> None:
    for bad in (0, 70000, "6006"):
        with pytest.raises(ConfigError, match="remote_port must be a TCP port"):
            tether.forward(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="allow_remote_host=True"):
        tether.forward(80, remote_host="10.0.0.1")
    before = len(tether.forwards())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="already in use"):
            tether.forward(free_port(), local_port=busy.getsockname()[1])
    assert len(tether.forwards()) == before


def test_forwards_of_one_tether_are_bounded(tether: Tether,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_tether.controller import forward as forward_module

    monkeypatch.setattr(forward_module, "MAX_FORWARDS", len(tether.forwards()) + 1)
    with tether.forward(free_port()), pytest.raises(ConfigError, match="close one"):
        tether.forward(free_port())
    tether.forward(free_port()).close()  # closing one makes room again


def test_remote_reset_reasons_become_one_bounded_clean_line() -> None:
    from jupyter_tether.controller.forward_streams import ByteCounters, StreamMux

    async def main() -> None:
        # Only routing runs here: no link or socket is touched on a reset.
        mux = StreamMux(None)  # type: ignore[arg-type]
        counters = ByteCounters()
        mux.new(None, counters)  # type: ignore[arg-type]
        hostile = "\x1b]0;owned\x07\x1b[2J\r\nfake prompt$ " + "x" * 10_000
        mux._on_message({"owner": mux.owner, "items": [[1, st.RESET, hostile]]}, [])
        assert counters.last_error.isprintable() and len(counters.last_error) <= 400
        assert "fake prompt" in counters.last_error

    anyio.run(main)


_item = hyp.one_of(hyp.tuples(hyp.integers(0, 3), hyp.sampled_from([*st.KINDS, "x"]),
                              _values).map(list),
                   hyp.lists(hyp.one_of(hyp.integers(0, 3), _values), max_size=4), _values)


@settings(max_examples=300, deadline=None)
@given(items=hyp.one_of(hyp.lists(_item, max_size=6), _values),
       blobs=hyp.lists(hyp.binary(max_size=8), max_size=4), ours=hyp.booleans())
def test_controller_survives_whatever_the_remote_pushes(items: Any, blobs: list[bytes],
                                                         ours: bool) -> None:
    from jupyter_tether.controller.forward_streams import ByteCounters, StreamMux

    async def main() -> None:
        mux = StreamMux(None)  # type: ignore[arg-type]
        for _ in range(2):
            mux.new(None, ByteCounters())  # type: ignore[arg-type]
        mux._on_message({"owner": mux.owner if ours else "other", "items": items}, blobs)

    anyio.run(main)  # the link logs what a handler raises: here it must raise nothing


def test_no_jupyter_server_proxy_means_no_proxy_url(http_forward: BlockingPortForward) -> None:
    assert http_forward.proxy_url is None  # the test server has no jupyter-server-proxy


# --- across drops -----------------------------------------------------------------------------


def open_streams(t: Tether) -> int:
    """How many streams the supervisor holds open (all controllers)."""
    reply = t.portal.call(lambda: t.aio.link.call(Op.STREAM_SYNC, {"owner": "counter",
                                                                   "live": []}))
    return int(reply.result["open"])


@pytest.mark.parametrize("fault", ["reset", "blackhole"])
def test_forward_keeps_working_after_a_fault_of_the_link(
        proxied_server: tuple[FaultProxy, str, str], server_root: Path, web_root: Path,
        tmp_path: Path, fault: str) -> None:
    proxy, url, token = proxied_server
    endless = server_root / "endless.py"
    endless.write_text(ENDLESS)
    web_port, endless_port = free_port(), free_port()
    with Tether(url, token, options=fast_options(), output_dir=tmp_path) as t:
        web = f"{sys.executable} -m http.server {web_port} --bind 127.0.0.1 --directory {web_root}"
        with remote_job(t, web, web_port) as fwd, \
                remote_job(t, f"{sys.executable} {endless} {endless_port}", endless_port) as busy:
            assert loopback_http.get(fwd.url + "small-3.txt", timeout=30).status_code == 200
            held = socket.create_connection(("127.0.0.1", busy.local_port))
            held.settimeout(60)
            assert len(held.recv(65536)) > 0
            baseline = open_streams(t)
            getattr(proxy, fault)()
            # The connection open during the drop ends with a reset, not a hang or an EOF.
            with pytest.raises(ConnectionResetError):
                while held.recv(MIB):
                    pass
            held.close()
            proxy.heal()
            # New connections work again, with no call from the user.
            response = loopback_http.get(fwd.url + "small-7.txt", timeout=60)
            assert response.text == (web_root / "small-7.txt").read_text()
            until(lambda: open_streams(t) < baseline, timeout=20)
            assert t.status()["reconnects"] >= 1


# --- the CLI --------------------------------------------------------------------------------


def test_cli_forward_prints_urls_as_json_forwards_until_ctrl_c(
        jupyter_server: Any, http_forward: BlockingPortForward, web_root: Path) -> None:
    import signal
    import subprocess

    from .test_cli import SCRIPT, cli_env

    remote_port = http_forward.aio.remote_port
    proc = subprocess.Popen(
        [str(SCRIPT), "--url", jupyter_server.url, "--token", jupyter_server.token, "--json",
         "forward", f"0:{remote_port}", f"0:{remote_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert proc.stdout is not None
        text = ""
        for line in proc.stdout:  # the JSON document, then it keeps forwarding
            text += line
            if line.rstrip() == "}":
                break
        forwards = json.loads(text)["forwards"]
        assert len(forwards) == 2 and forwards[0]["local_port"] != forwards[1]["local_port"]
        for row in forwards:
            assert row["url"].startswith("http://127.0.0.1:") and row["remote_listening"]
            body = loopback_http.get(row["url"] + "small-5.txt", timeout=30).text
            assert body == (web_root / "small-5.txt").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:  # deaf to Ctrl-C: the test fails, nothing is left running
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    with pytest.raises(httpx2.ConnectError):  # Ctrl-C closed the listeners
        loopback_http.get(forwards[0]["url"], timeout=5)


def test_cli_forward_spec_parsing() -> None:
    from jupyter_tether.cli.context import UsageError
    from jupyter_tether.cli.forward import parse_spec

    assert parse_spec("6006") == (None, 6006)
    assert parse_spec("8080:7860") == (8080, 7860)
    assert parse_spec("0:80") == (0, 80)
    for bad in ("x", "80:", "0", "70000", "1:2:3", "-1:80"):
        with pytest.raises(UsageError):
            parse_spec(bad)


# --- the MCP tools: forwards live in the MCP server's process ------------------------------------


@pytest.mark.anyio
async def test_mcp_port_forward_tools_open_list_and_close(
        jupyter_server: Any, tmp_path_factory: pytest.TempPathFactory,
        http_forward: BlockingPortForward, web_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_mcp import in_process

    state = tmp_path_factory.mktemp("mcp-forward")
    async with in_process(jupyter_server, state, monkeypatch) as client, \
            httpx2.AsyncClient(timeout=30) as http:
        opened = await client.call_tool("jupyter_port_forward",
                                        {"remote_port": http_forward.aio.remote_port})
        row = opened.structured_content
        assert not opened.is_error and row and row["remote_listening"] is True
        body = (await http.get(row["url"] + "small-9.txt")).text
        assert body == (web_root / "small-9.txt").read_text()
        listed = (await client.call_tool("jupyter_port_forward_list", {})).structured_content
        assert listed and [f["local_port"] for f in listed["forwards"]] == [row["local_port"]]
        assert listed["forwards"][0]["bytes_down"] >= len(body)
        closed = await client.call_tool("jupyter_port_forward_close",
                                        {"local_port": row["local_port"]})
        assert not closed.is_error and closed.structured_content["closed"] is True
        with pytest.raises(httpx2.ConnectError):
            await http.get(row["url"])
        again = await client.call_tool("jupyter_port_forward_close",
                                       {"local_port": row["local_port"]})
        assert again.is_error and "jupyter_port_forward_list" in again.content[0].text
        refused = await client.call_tool("jupyter_port_forward", {
            "remote_port": http_forward.aio.remote_port, "local_port": 70000})
        assert refused.is_error and "local_port" in refused.content[0].text


# --- jupyter-server-proxy: offered where the server has it --------------------------------------

SERVER_PROXY_ENV = "JUPYTER_TETHER_SERVER_PROXY_EXT"
SERVER_PROXY_PACKAGES = ["jupyter-server-proxy==4.6.0", "simpervisor==1.0.0"]


@pytest.fixture(scope="module")
def proxy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # Its aiohttp is already in this environment: the two packages are all it adds.
    site = extension_site(SERVER_PROXY_ENV, "jupyter-tether-server-proxy-4.6.0",
                          SERVER_PROXY_PACKAGES, "jupyter_server_proxy")
    with server_with_extension(site, "jupyter_server_proxy",
                               tmp_path_factory.mktemp("server-proxy-root"),
                               "server-proxy.log") as server:
        yield server


def test_server_proxy_url_is_offered_where_the_server_has_it(
        proxy_server: Any, web_root: Path, tmp_path: Path) -> None:
    port = free_port()
    web = f"{sys.executable} -m http.server {port} --bind 127.0.0.1 --directory {web_root}"
    with Tether(proxy_server.url, proxy_server.token, options=fast_options(),
                output_dir=tmp_path) as t:
        with t.forward(free_port()) as closed:
            assert closed.proxy_url is None  # the proxy answers, but nothing is behind it
        with remote_job(t, web, port) as fwd:
            assert fwd.url.startswith("http://127.0.0.1:")  # the comm tunnel, either way
            assert fwd.proxy_url == f"{proxy_server.url.rstrip('/')}/proxy/{port}/"
            through_proxy = loopback_http.get(fwd.proxy_url + "small-1.txt",
                                       params={"token": proxy_server.token}, timeout=30)
            assert through_proxy.text == (web_root / "small-1.txt").read_text()
