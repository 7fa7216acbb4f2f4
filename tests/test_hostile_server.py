"""A hostile or broken remote cannot exhaust the controller: every size it sends is bounded.

Fake peers speak just enough of the Jupyter kernel websocket protocol (legacy JSON) or of
HTTP over real sockets to let the controller in, then misbehave; the exec caps are checked
against a real kernel, and the link's limit against the real supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import websockets
from jupyter_server.services.kernels.connection.base import (
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)
from websockets.asyncio.server import ServerConnection, serve

from jupyter_tether import AsyncTether, LimitExceeded, Tether
from jupyter_tether.agent_payload import wire
from jupyter_tether.controller import kernel_ws
from jupyter_tether.controller import rest as rest_module
from jupyter_tether.controller.embedded import LocalJupyterServer
from jupyter_tether.controller.execute import EXEC_LIMITS, execute
from jupyter_tether.controller.kernel_requests import kernel_info
from jupyter_tether.controller.kernel_ws import KernelSocket, new_session_id
from jupyter_tether.controller.rest import MAX_REST_BODY_BYTES, JupyterRest
from jupyter_tether.controller.target import Target

from .conftest import fast_options, gated

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
Behaviour = Callable[[ServerConnection, dict[str, Any]], Awaitable[None]]


# --- a fake kernel websocket ----------------------------------------------------------------


def _message(parent: dict[str, Any], msg_type: str, content: dict[str, Any],
             channel: str = "iopub") -> str:
    return json.dumps({
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "session": "fake",
                   "username": "fake", "version": "5.3", "date": "2026-01-01T00:00:00Z"},
        "parent_header": parent["header"], "metadata": {}, "content": content,
        "channel": channel, "buffers": []})


async def _answer_kernel_info(ws: ServerConnection, request: dict[str, Any]) -> None:
    await ws.send(_message(request, "status", {"execution_state": "busy"}))
    await ws.send(_message(request, "kernel_info_reply", {"status": "ok"}, "shell"))
    await ws.send(_message(request, "status", {"execution_state": "idle"}))


async def _finish(ws: ServerConnection, request: dict[str, Any]) -> None:
    await ws.send(_message(request, "execute_reply", {"status": "ok", "execution_count": 1},
                           "shell"))
    await ws.send(_message(request, "status", {"execution_state": "idle"}))


@contextlib.asynccontextmanager
async def fake_kernel(on_execute: Behaviour) -> AsyncIterator[Target]:
    """A websocket server at ``/api/kernels/<id>/channels`` that answers kernel_info
    politely and every execute_request with ``on_execute``."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for frame in ws:
                request = json.loads(frame)
                kind = request["header"]["msg_type"]
                if kind == "kernel_info_request":
                    await _answer_kernel_info(ws, request)
                elif kind == "execute_request":
                    await on_execute(ws, request)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield Target(base_url=f"http://127.0.0.1:{port}/")


@contextlib.asynccontextmanager
async def open_socket(target: Target, **options: Any) -> AsyncIterator[KernelSocket]:
    async with anyio.create_task_group() as group:
        sock = KernelSocket(target, "fake-kernel", session_id=new_session_id(),
                            ping_interval=None, **options)
        await sock.open(group)
        try:
            yield sock
        finally:
            await sock.aclose()
            group.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def fake_v1_kernel(before_reply: list[bytes]) -> AsyncIterator[Target]:
    """A kernel websocket that speaks the v1 protocol: each execute_request gets the raw
    frames ``before_reply`` first, then a stream output and a normal reply."""

    def frame(request: dict[str, Any], msg_type: str, content: dict[str, Any],
              channel: str) -> bytes:
        msg = json.loads(_message(request, msg_type, content, channel))
        return serialize_msg_to_ws_v1([json.dumps(msg[k]).encode() for k in (
            "header", "parent_header", "metadata", "content")], channel)

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in ws:
                channel, parts = deserialize_msg_from_ws_v1(raw)
                request = {"header": json.loads(parts[0])}
                kind = request["header"]["msg_type"]
                if kind == "kernel_info_request":
                    await ws.send(frame(request, "kernel_info_reply", {"status": "ok"}, channel))
                    await ws.send(frame(request, "status", {"execution_state": "idle"}, "iopub"))
                elif kind == "execute_request":
                    for bad in before_reply:
                        await ws.send(bad)
                    await ws.send(frame(request, "stream", {"name": "stdout", "text": "fine\n"},
                                        "iopub"))
                    await ws.send(frame(request, "execute_reply", {"status": "ok"}, "shell"))
                    await ws.send(frame(request, "status", {"execution_state": "idle"}, "iopub"))

    async with serve(handler, "127.0.0.1", 0, subprotocols=[kernel_ws.V1_PROTOCOL]) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield Target(base_url=f"http://127.0.0.1:{port}/")


async def test_malformed_v1_frames_are_dropped_and_the_reply_still_comes() -> None:
    malformed = [
        # 2**62 offsets declared in 16 bytes: believing the count exhausts memory.
        struct.pack("<QQ", 1 << 62, 8),
        struct.pack("<7Q", 6, 56, 60, 70, 80, 90, 100),  # offsets past the frame's end
        serialize_msg_to_ws_v1([b"[]", b"{}", b"{}", b"{}"], "iopub"),  # header not an object
        serialize_msg_to_ws_v1([b"{", b"{}", b"{}", b"{}"], "iopub"),  # not JSON
    ]
    async with fake_v1_kernel(malformed) as target, open_socket(target) as sock:
        assert sock.protocol == "v1"
        with anyio.fail_after(20):
            result = await execute(sock, "1", timeout=20)
        assert result.status == "ok" and result.stdout == "fine\n"
        assert not sock.closed.is_set()


async def _claim_a_huge_frame(ws: ServerConnection, request: dict[str, Any]) -> None:
    # A binary frame header announcing 1 TiB; the payload never comes.
    ws.transport.write(b"\x82\x7f" + struct.pack("!Q", 1 << 40) + b"xxxx")


async def _polite(ws: ServerConnection, request: dict[str, Any]) -> None:
    await ws.send(_message(request, "stream", {"name": "stdout", "text": "fine\n"}))
    await _finish(ws, request)


async def test_a_frame_above_the_message_limit_ends_the_connection_with_a_clear_error() -> None:
    assert wire.MAX_KERNEL_MESSAGE_BYTES >= (wire.MAX_REPLY_ENVELOPE_BYTES
                                             + wire.MAX_MESSAGE_BLOB_BYTES)
    async with fake_kernel(_claim_a_huge_frame) as target, open_socket(target) as sock:
        assert sock.max_message_bytes == wire.MAX_KERNEL_MESSAGE_BYTES
        await kernel_info(sock, timeout=10)
        with anyio.fail_after(20), pytest.raises(LimitExceeded) as caught:
            await execute(sock, "1", timeout=None)
        assert caught.value.limit == "MAX_KERNEL_MESSAGE_BYTES"
        assert "MiB limit" in str(caught.value) and sock.closed.is_set()
    # This process is fine: a new connection to a well-behaved kernel works.
    async with fake_kernel(_polite) as target, open_socket(target) as sock:
        result = await execute(sock, "1", timeout=20)
        assert result.status == "ok" and result.stdout == "fine\n"


async def _endless_fragments(ws: ServerConnection, request: dict[str, Any]) -> None:
    async def fragments() -> AsyncIterator[bytes]:
        while True:
            yield b"\0" * (256 * 1024)

    await ws.send(fragments())


async def test_an_endless_fragmented_message_stops_at_the_limit() -> None:
    async with fake_kernel(_endless_fragments) as target, \
            open_socket(target, max_message_bytes=2 * MiB) as sock:
        with anyio.fail_after(20), pytest.raises(LimitExceeded, match="MAX_KERNEL_MESSAGE"):
            await execute(sock, "1", timeout=None)


async def test_websockets_buffers_a_bounded_number_of_frames() -> None:
    async with fake_kernel(_polite) as target, open_socket(target) as sock:
        # Past the high-water mark websockets stops reading the socket: TCP slows the server.
        assert sock._connection is not None
        assert sock._connection.recv_messages.high == kernel_ws.MAX_QUEUED_FRAMES


def _display(request: dict[str, Any], i: int) -> str:
    return _message(request, "display_data", {"data": {"text/plain": f"out {i}"},
                                              "metadata": {}})


async def _twenty_thousand_outputs(ws: ServerConnection, request: dict[str, Any]) -> None:
    for i in range(20_000):
        await ws.send(_display(request, i))
    await ws.send(_message(request, "execute_result", {
        "data": {"text/plain": "'the value'"}, "metadata": {}, "execution_count": 1}))
    await _finish(ws, request)


async def test_a_flood_of_outputs_returns_a_bounded_result_with_a_count() -> None:
    async with fake_kernel(_twenty_thousand_outputs) as target, open_socket(target) as sock:
        with anyio.fail_after(60):
            result = await execute(sock, "1", timeout=None)
    cap = EXEC_LIMITS.max_results
    assert result.status == "ok" and result.truncated
    assert len(result.results) == cap + 2  # the kept ones, the marker, the cell's value
    assert result.results[0]["data"]["text/plain"] == "out 0"
    marker = result.results[cap]
    assert marker["type"] == "omitted" and marker["count"] == 20_000 - cap
    assert f"{20_000 - cap:,} more outputs not shown" in marker["data"]["text/plain"]
    assert result.results[-1]["data"]["text/plain"] == "'the value'"
    assert result.omitted_results == 20_000 - cap


async def _flood_forever(ws: ServerConnection, request: dict[str, Any]) -> None:
    i = 0
    while True:  # never a reply: ends when the client hangs up
        await ws.send(_display(request, i))
        i += 1


async def test_an_endless_flood_nobody_reads_ends_the_connection() -> None:
    async with fake_kernel(_flood_forever) as target, open_socket(target) as sock:

        async def slow_interrupt() -> None:
            # An interrupt that takes its time (a slow REST call) while the flood goes on.
            with anyio.move_on_after(30):
                await sock.closed.wait()

        with anyio.fail_after(60), pytest.raises(LimitExceeded) as caught:
            await execute(sock, "1", timeout=0.5, interrupt=slow_interrupt)
        assert caught.value.limit == "MAX_UNREAD_MESSAGES"
        assert f"{kernel_ws.MAX_UNREAD_MESSAGES:,} messages" in str(caught.value)


# --- a fake REST server -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_http(body: Callable[[asyncio.StreamWriter], Awaitable[None]],
                    headers: str) -> AsyncIterator[str]:
    """An HTTP server answering every request with ``headers`` then ``body(writer)``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 200 OK\r\n{headers}\r\n".encode())
            await body(writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"


async def _endless_chunked_json(writer: asyncio.StreamWriter) -> None:
    chunk = b"[" + b'{"id": "k", "name": "python3"},' * 30_000
    while True:
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()


async def test_an_endless_rest_answer_is_refused_at_the_cap() -> None:
    headers = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    async with fake_http(_endless_chunked_json, headers) as url:
        rest = JupyterRest(Target(base_url=url, token="t"))
        try:
            with anyio.fail_after(60), pytest.raises(LimitExceeded) as caught:
                await rest.list_kernels()
        finally:
            await rest.aclose()
    assert caught.value.limit == "MAX_REST_BODY_BYTES"
    assert caught.value.value == MAX_REST_BODY_BYTES
    # Connecting to such a server fails the same way, at its first answer.
    async with fake_http(_endless_chunked_json, headers) as url:
        with anyio.fail_after(60), pytest.raises(LimitExceeded, match="MAX_REST_BODY_BYTES"):
            async with AsyncTether(url, "t"):
                pass


async def test_a_compressed_rest_answer_is_capped_after_decompression() -> None:
    bomb = gzip.compress(b"[" + b" " * (MAX_REST_BODY_BYTES + MiB) + b"]", compresslevel=1)
    assert len(bomb) < MAX_REST_BODY_BYTES // 100

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(bomb)
        await writer.drain()

    headers = (f"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
               f"Content-Length: {len(bomb)}\r\n")
    async with fake_http(send, headers) as url:
        rest = JupyterRest(Target(base_url=url, token="t"))
        try:
            with anyio.fail_after(60), pytest.raises(LimitExceeded, match="MAX_REST_BODY"):
                await rest.list_sessions()
        finally:
            await rest.aclose()


async def test_rest_answers_within_the_cap_still_parse() -> None:
    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(gzip.compress(b'[{"id": "k1"}]'))
        await writer.drain()

    body_len = len(gzip.compress(b'[{"id": "k1"}]'))
    headers = (f"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
               f"Content-Length: {body_len}\r\n")
    async with fake_http(send, headers) as url:
        rest = JupyterRest(Target(base_url=url, token="t"))
        try:
            assert await rest.list_kernels() == [{"id": "k1"}]
        finally:
            await rest.aclose()


# --- the real kernel: exec caps -----------------------------------------------------------------


def test_a_huge_exception_value_returns_a_small_result(tether: Tether) -> None:
    result = tether.exec("raise ValueError('x' * 3_000_000)", max_output_chars=2000)
    assert result.status == "error" and result.truncated
    assert result.error is not None and result.error["ename"] == "ValueError"
    assert len(json.dumps(result.to_dict())) < 16 * 1024
    assert "more chars not shown (3,000,000 in all)" in result.error["evalue"]
    assert sum(len(line) for line in result.error["traceback"]) < 3000
    assert "ValueError" in result.error["traceback"][-1]


def test_three_thousand_displays_do_not_return_three_thousand_results(tether: Tether) -> None:
    result = tether.exec("from IPython.display import display\n"
                         "for i in range(3000):\n    display(i)")
    cap = EXEC_LIMITS.max_results
    assert result.status == "ok" and result.truncated
    assert len(result.results) == cap + 1
    assert [r["data"]["text/plain"] for r in result.results[:3]] == ["0", "1", "2"]
    marker = result.results[cap]
    # The server's iopub rate limit may drop some of them; the count says how many came.
    assert marker["type"] == "omitted" and 0 < marker["count"] <= 3000 - cap
    assert result.omitted_results == marker["count"]
    assert "more outputs not shown" in marker["data"]["text/plain"]


def test_huge_json_output_is_cut_with_its_size(tether: Tether) -> None:
    result = tether.exec(
        "from IPython.display import display\n"
        "display({'application/json': {'k': 'x' * 1_000_000}, 'text/plain': 'j'}, raw=True)",
        max_output_chars=2000)
    value = result.results[0]["data"]["application/json"]
    assert isinstance(value, str) and len(value) < 2200 and result.truncated
    assert value.startswith('{"k":"xxx') and "application/json" in value
    assert "(1,000,008 in all)" in value  # {"k":"...."} compact
    small = tether.exec("from IPython.display import display\n"
                        "display({'application/json': {'k': [1, 2]}}, raw=True)")
    assert small.results[0]["data"]["application/json"] == {"k": [1, 2]}


def test_saved_images_are_capped_in_number(tether: Tether) -> None:
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
    result = tether.exec("from IPython.display import display\n"
                         f"for _ in range(25):\n    display({{'image/png': '{png}'}}, raw=True)")
    assert len(result.images) == EXEC_LIMITS.max_images and result.truncated
    assert all(Path(p).is_file() for p in result.images)
    late = result.results[-1]["data"]["image/png"]
    assert "saved_to" not in late and "at most 20 images" in late["note"]


# --- the real supervisor: a reply above the link's limit ------------------------------------


async def test_a_reply_above_the_link_limit_fails_the_call_and_the_link_recovers(
        jupyter_server: LocalJupyterServer, server_root: Path) -> None:
    (server_root / "hostile-big.bin").write_bytes(b"\x01" * (3 * MiB))
    options = fast_options(max_message_bytes=2 * MiB)
    async with AsyncTether(jupyter_server.url, jupyter_server.token, options=options) as t:
        with anyio.fail_after(30), pytest.raises(LimitExceeded) as caught:
            await t.link.call("fs_read", {"path": "hostile-big.bin", "max_bytes": 3 * MiB})
        assert caught.value.limit == "MAX_KERNEL_MESSAGE_BYTES"
        assert "2 MiB limit" in str(caught.value)
        # The link came back and serves calls that fit.
        with anyio.fail_after(60):
            reply = await t.link.call("fs_read", {"path": "hostile-big.bin",
                                                  "max_bytes": MiB})
        assert reply.buffers[0] == b"\x01" * MiB


async def test_another_controllers_reply_above_our_limit_costs_a_reconnect_not_our_call(
        jupyter_server: LocalJupyterServer, server_root: Path, tmp_path: Path) -> None:
    # iopub goes to every client of a kernel: a big reply to another controller on the same
    # supervisor reaches this one too, above its limit, and closes its connection. Our call
    # in flight then is sent again, not failed (it was, as if the reply had been its own).
    (server_root / "hostile-theirs.bin").write_bytes(b"\x02" * (3 * MiB))
    gate = tmp_path / "gate"
    url, token = jupyter_server.url, jupyter_server.token
    async with AsyncTether(url, token, options=fast_options(max_message_bytes=2 * MiB)) as ours, \
            AsyncTether(url, token, options=fast_options()) as theirs:
        job = await ours.jobs.start(gated(gate, "echo done"))
        done: list[Any] = []

        async def wait() -> None:
            done.append(await job.wait(timeout=60))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait)
                while not any(c.op == "job_wait" and c.sent_generation >= 0
                              for c in ours.link._pending._calls.values()):
                    await anyio.sleep(0.01)  # our wait is in flight
                reply = await theirs.link.call("fs_read", {"path": "hostile-theirs.bin",
                                                           "max_bytes": 3 * MiB})
                assert len(reply.buffers[0]) == 3 * MiB
                while ours.link.last_drop_at is None:
                    await anyio.sleep(0.01)
                gate.touch()
        assert "2 MiB limit" in str(ours.link.last_drop)
        assert done[0].exit_code == 0


async def test_a_new_controller_is_not_sent_the_events_from_before_it_came(
        jupyter_server: LocalJupyterServer) -> None:
    # Every connect asked the supervisor to replay its whole event ring (up to 32 MiB), to
    # the new controller and, iopub being broadcast, to every one attached beside it. Here a
    # 3 MB output event from before is above the new controller's limit: it closed it.
    url, token = jupyter_server.url, jupyter_server.token
    async with AsyncTether(url, token, options=fast_options()) as theirs:
        cell = ("from IPython.display import display\n"
                "display({'text/plain': 'y' * 3_000_000}, raw=True)\n"
                "import time\ntime.sleep(1)")
        seen: list[str] = []
        stop = theirs.link.add_listener(lambda event: seen.append(event.name))
        try:
            assert (await theirs.exec(cell)).status == "ok"
        finally:
            stop()
        assert "exec_output" in seen  # the output went out as an event while the cell ran
    async with AsyncTether(url, token, options=fast_options(max_message_bytes=2 * MiB)) as ours:
        for _ in range(3):
            await ours.link.call("ping")
            await anyio.sleep(0.3)
        assert ours.link.last_drop_at is None, ours.link.last_drop


@contextlib.asynccontextmanager
async def flaky_proxy(failures: int, status: int = 502) -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP peer that answers the first ``failures`` requests with ``status`` (a proxy
    whose upstream is briefly away), then ``{"version": "2.12.5"}``; and the request lines."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head.split(b"\r\n", 1)[0].decode())
            body = b'{"version": "2.12.5"}'
            line = f"{status} Bad Gateway" if len(seen) <= failures else "200 OK"
            writer.write(f"HTTP/1.1 {line}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/", seen


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_the_version_lookup_is_tried_again_when_the_proxy_says_its_upstream_is_away(
        status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rest_module, "RETRY_PAUSES_S", (0.01, 0.01))
    async with flaky_proxy(failures=2, status=status) as (url, seen):
        rest = JupyterRest(Target(base_url=url, token="t"))
        try:
            assert (await rest.version())["version"] == "2.12.5"
        finally:
            await rest.aclose()
    assert seen == ["GET /api HTTP/1.1"] * 3


async def test_the_version_lookup_gives_up_after_its_retries_and_nothing_else_retries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_tether.errors import ServerError

    monkeypatch.setattr(rest_module, "RETRY_PAUSES_S", (0.01, 0.01))
    async with flaky_proxy(failures=10) as (url, seen):
        rest = JupyterRest(Target(base_url=url, token="t"))
        try:
            with pytest.raises(ServerError, match="HTTP 502"):
                await rest.version()
            assert len(seen) == 3
            with pytest.raises(ServerError, match="HTTP 502"):
                await rest.start_kernel()  # a POST may have been done upstream: once only
            with pytest.raises(ServerError, match="HTTP 502"):
                await rest.list_kernels()  # the link's reconnect loop retries on its own
            assert [line.split()[:2] for line in seen[3:]] == [["POST", "/api/kernels"],
                                                              ["GET", "/api/kernels"]]
        finally:
            await rest.aclose()
