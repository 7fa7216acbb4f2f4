"""The MCP server as agents use it: a real server process, the real ``mcp`` client over
streamable HTTP (and once over stdio), a real Jupyter server behind it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from jupyter_tether.controller.embedded import LocalJupyterServer, free_port
from jupyter_tether.errors import ConfigError
from jupyter_tether.mcp_server import TOOL_NAMES, build_server, http_app

from . import loopback_http

pytestmark = pytest.mark.anyio

REQUIRED = object()
# The reference server's default exclude_globs_csv, written out (not imported from the
# implementation, which would make the contract compare the implementation with itself).
REFERENCE_EXCLUDE_GLOBS_CSV = (
    ".git/**,.hg/**,.svn/**,**/__pycache__/**,**/*.pyc,.venv/**,venv/**,build/**,dist/**,"
    "*.egg-info/**,.mypy_cache/**,.pytest_cache/**,.ruff_cache/**")
# The reference server's contract (docs/design.md, "The MCP server"): argument names and
# defaults.
REFERENCE: dict[str, dict[str, Any]] = {
    "jupyter_ping": {"server_url": None, "timeout_s": 30},
    "jupyter_env_snapshot": {"kernel_id": None, "server_url": None, "timeout_s": 120},
    "jupyter_list_kernels": {"server_url": None, "timeout_s": 30},
    "jupyter_list_sessions": {"server_url": None, "timeout_s": 30},
    "jupyter_start_kernel": {"kernel_name": "python3", "server_url": None, "timeout_s": 30},
    "jupyter_shutdown_kernel": {"kernel_id": REQUIRED, "now": True, "server_url": None,
                                "timeout_s": 30},
    "jupyter_exec_python": {"code": REQUIRED, "kernel_id": None, "timeout_s": 120,
                            "server_url": None},
    "jupyter_list_dir": {"path": "", "server_url": None, "timeout_s": 30},
    "jupyter_read_text": {"path": REQUIRED, "server_url": None, "timeout_s": 30},
    "jupyter_write_text": {"path": REQUIRED, "content": REQUIRED, "server_url": None,
                           "timeout_s": 30},
    "jupyter_upload_base64": {"path": REQUIRED, "content_base64": REQUIRED, "server_url": None,
                              "timeout_s": 60},
    "jupyter_upload_local_file": {"local_path": REQUIRED, "remote_path": REQUIRED,
                                  "server_url": None, "timeout_s": 120},
    "jupyter_download_base64": {"remote_path": REQUIRED, "server_url": None, "timeout_s": 120},
    "jupyter_download_to_local": {"remote_path": REQUIRED, "local_path": REQUIRED,
                                  "server_url": None, "timeout_s": 120},
    "jupyter_download_dir_to_local": {"remote_dir": REQUIRED, "local_dir": REQUIRED,
                                      "archive_remote_path": None, "kernel_id": None,
                                      "server_url": None, "timeout_s": 600},
    "jupyter_sync_dir": {"local_dir": REQUIRED, "remote_dir": REQUIRED,
                         "exclude_globs_csv": REFERENCE_EXCLUDE_GLOBS_CSV, "clean_remote": True,
                         "keep_archive": False, "max_bytes": 200 * 1024 * 1024,
                         "kernel_id": None, "server_url": None, "timeout_s": 600},
    "jupyter_run_commands": {"commands": REQUIRED, "cwd": "", "env_overrides": None,
                             "timeout_s_per_command": 600, "fail_fast": True,
                             "max_output_chars": 20000, "kernel_id": None, "server_url": None},
    "jupyter_job_start": {"command": REQUIRED, "kernel_id": None, "cwd": "",
                          "env_overrides": None, "log_path": None, "timeout_s": 60,
                          "server_url": None},
    "jupyter_job_status": {"job_id": REQUIRED, "timeout_s": 30},
    "jupyter_job_tail": {"job_id": REQUIRED, "lines": 200, "timeout_s": 30},
    "jupyter_job_kill": {"job_id": REQUIRED, "sig": 15, "timeout_s": 30},
    "jupyter_job_submit": {"spec": REQUIRED},
    "jupyter_job_collect": {"job_id": REQUIRED, "local_dir": REQUIRED, "require_done": True,
                            "timeout_s": 120},
}
NEW_TOOLS = {"jupyter_job_list", "jupyter_job_follow", "jupyter_job_wait", "jupyter_status",
             "jupyter_nb_read", "jupyter_nb_edit", "jupyter_nb_run", "jupyter_nb_start",
             "jupyter_port_forward", "jupyter_port_forward_list", "jupyter_port_forward_close",
             "jupyter_resources"}
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
       "rkJggg==")


class McpProcess:
    """``python -m jupyter_tether mcp`` on a free loopback port, stopped on close."""

    def __init__(self, server: LocalJupyterServer, state_dir: Path, log_path: Path,
                 *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.log_path = log_path
        # The token travels in the environment, never on the command line.
        env = {**os.environ, "REMOTE_JUPYTER_URL": server.url,
               "REMOTE_JUPYTER_TOKEN": server.token, "JUPYTER_TETHER_STATE_DIR": str(state_dir)}
        # The tests' local files live under pytest's base temp dir, outside this server's cwd
        # (the file tools' default root): allow it, unless the test names its own roots.
        roots = [] if "--local-root" in extra else ["--local-root", str(state_dir.parent)]
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jupyter_tether", "mcp", "--port", str(self.port),
                 "--output-dir", str(state_dir / "outputs"), *roots, *extra],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log_path.read_text()
            try:
                loopback_http.get(f"http://127.0.0.1:{self.port}/", timeout=1)
                return
            except httpx2.HTTPError:
                time.sleep(0.05)
        raise AssertionError(f"MCP server did not start: {log_path.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


def in_process(server: LocalJupyterServer, state_dir: Path,
               monkeypatch: pytest.MonkeyPatch) -> Client:
    """A client of the MCP server that ``McpProcess`` starts, built in this process instead:
    for tests of what its tools do, where a process of its own (~0.9 CPU-s to start, almost
    all of it importing ``mcp``) shows nothing more. Its own controller state, as there."""
    monkeypatch.setenv("JUPYTER_TETHER_STATE_DIR", str(state_dir))
    return Client(build_server(url=server.url, token=server.token,
                               output_dir=state_dir / "outputs", local_roots=[state_dir.parent]))


@pytest.fixture(scope="module")
def mcp_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Its own controller state: the MCP server is a separate controller from the tests' own.
    return tmp_path_factory.mktemp("mcp-state")


@pytest.fixture(scope="module")
def mcp_server(jupyter_server: LocalJupyterServer, mcp_state: Path) -> Iterator[McpProcess]:
    proc = McpProcess(jupyter_server, mcp_state, mcp_state / "mcp.log")
    yield proc
    proc.stop()
    # Nothing the server logged may carry the Jupyter token.
    assert jupyter_server.token not in (mcp_state / "mcp.log").read_text()


@asynccontextmanager
async def connect(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[Client]:
    # mcp's own client timeouts; our http client for its cheap TLS context (loopback_http)
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300),
                              verify=loopback_http.NO_TLS)
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        yield client


class Calls:
    """Calls tools and keeps every result's text, to check no secret ever shows up."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.texts: list[str] = []

    async def ok(self, name: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        result = await self.client.call_tool(name, args or {}, **kw)
        text = "".join(getattr(c, "text", "") for c in result.content)
        self.texts.append(text)
        assert not result.is_error, f"{name} failed: {text}"
        assert result.structured_content is not None, name
        return result.structured_content

    async def error(self, name: str, args: dict[str, Any]) -> str:
        result = await self.client.call_tool(name, args)
        text = "".join(getattr(c, "text", "") for c in result.content)
        self.texts.append(text)
        assert result.is_error, f"{name} should have failed: {text}"
        return text

    async def follow_all(self, job_id: str) -> str:
        text, offset = "", 0
        for _ in range(200):
            out = await self.ok("jupyter_job_follow", {"job_id": job_id, "offset": offset,
                                                       "wait_s": 5, "max_chars": 256})
            assert out["offset"] == offset
            text += out["text"]
            offset = out["next_offset"]
            if out["eof"]:
                return text
        raise AssertionError("follow never reached eof")


# --- contract ---------------------------------------------------------------------------------


async def test_tool_list_keeps_the_reference_contract(mcp_server: McpProcess) -> None:
    async with connect(mcp_server.url) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(REFERENCE) | NEW_TOOLS == set(tools) == set(TOOL_NAMES)
    for name, args in REFERENCE.items():
        schema = tools[name].input_schema
        props, required = schema["properties"], set(schema.get("required", []))
        for arg, default in args.items():
            assert arg in props, f"{name} lost argument {arg}"
            if default is REQUIRED:
                assert arg in required, f"{name}.{arg} must be required"
            else:
                assert arg not in required and props[arg].get("default") == default, \
                    f"{name}.{arg} default {props[arg].get('default')!r} != {default!r}"
        # Extra arguments are welcome, but never required ones.
        assert required <= {a for a, d in args.items() if d is REQUIRED}, name
    for tool in tools.values():
        assert tool.description, tool.name
        assert tool.annotations is not None and tool.annotations.read_only_hint is not None
    status_hints = tools["jupyter_job_status"].annotations
    kill_hints = tools["jupyter_shutdown_kernel"].annotations
    assert status_hints is not None and status_hints.read_only_hint is True
    assert kill_hints is not None and kill_hints.destructive_hint is True


async def test_tools_come_from_the_table_with_only_their_own_arguments() -> None:
    # In-process, no Jupyter needed: listing tools opens no tether.
    async with Client(build_server(url="http://127.0.0.1:9/")) as client:
        tools = (await client.list_tools()).tools
    # Names come from the table, in the order clients see them: none hand-kept.
    assert [t.name for t in tools] == list(TOOL_NAMES)
    for tool in tools:
        # What the server fills in itself (the tool context, the MCP context, the client's
        # roots) is never an argument a client could send.
        assert not {"tc", "ctx", "client_roots"} & set(tool.input_schema["properties"])
        # Descriptions carry no source indentation, on every Python version.
        assert tool.description and "\n " not in tool.description, tool.name


# The issue's bound: tools/list was 46 KB (about 12k tokens of every agent's context); 20 KB
# then, plus the four notebook tools (3.6 KB, bounded on their own in test_notebooks.py) and
# the three port forward tools (0.8 KB), and jupyter_resources (0.45 KB, with jupyter_status
# naming RAM, disk and GPUs).
TOOLS_LIST_MAX_BYTES = 24_800
COMPAT_ONLY = [("jupyter_env_snapshot", "kernel_id"), ("jupyter_run_commands", "kernel_id"),
               ("jupyter_job_start", "kernel_id"), ("jupyter_sync_dir", "kernel_id"),
               ("jupyter_sync_dir", "keep_archive"), ("jupyter_download_dir_to_local", "kernel_id"),
               ("jupyter_download_dir_to_local", "archive_remote_path")]


async def test_tool_list_is_small_and_the_details_are_said_once() -> None:
    async with Client(build_server(url="http://127.0.0.1:9/")) as client:
        listed = await client.list_tools()
        instructions = client.instructions or ""
        help_text = (await client.read_resource("jupyter-tether://help")).contents[0]
    size = len(listed.model_dump_json(by_alias=True, exclude_none=True).encode())
    assert size <= TOOLS_LIST_MAX_BYTES, f"tools/list is {size} bytes"
    props = {t.name: t.input_schema["properties"] for t in listed.tools}
    # Kept for agents written for the reference server, and said to be ignored.
    for name, arg in COMPAT_ONLY:
        assert props[name][arg]["description"] == "Ignored (compatibility).", (name, arg)
    # The shared arguments in a few words; what they leave out is in the instructions.
    shared = [p["server_url"] for p in props.values() if "server_url" in p]
    assert len(shared) == len(props) - 1  # all but jupyter_job_submit (its spec has one)
    assert all(arg["description"] == "URL or target name." for arg in shared)
    for detail in ("targets.toml", "REMOTE_JUPYTER_URL", "REMOTE_JUPYTER_TOKEN", "?token=",
                   "--allow-any-server", "timeout_s", "Ignored (compatibility)",
                   "allowed local roots", "--local-root", "ISO-8601", "jupyter_job_follow"):
        assert detail in instructions, detail
    assert getattr(help_text, "text", None) == instructions
    # No schema repeats what the property name says, and no optional argument spells "null".
    text = listed.model_dump_json(by_alias=True, exclude_none=True)
    assert '"title":"Server Url"' not in text and '{"type":"null"}' not in text


def test_schemas_and_results_take_one_compact_shape() -> None:
    from jupyter_tether.mcp_server.tools.shape import compact_schema, relative_to_root, shape

    schema = {"title": "fArguments", "type": "object", "properties": {
        "title": {"title": "Title", "type": "string", "minLength": 1},
        "when": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": None,
                 "title": "When", "description": "d"},
        "timeout_s": {"default": 30.0, "exclusiveMinimum": 0, "type": "number",
                      "maximum": 300}}}
    assert compact_schema(schema) == {"type": "object", "properties": {
        "title": {"type": "string"}, "when": {"type": "number", "description": "d"},
        "timeout_s": {"default": 30.0, "type": "number", "maximum": 300}}}

    root = "/srv/work"
    assert relative_to_root("/srv/work/a/b.txt", root) == "a/b.txt"
    assert relative_to_root("/srv/work", root) == "."
    assert relative_to_root("/srv/workshop/x", root) == "/srv/workshop/x"  # not under it
    assert relative_to_root("/etc/hosts", root) == "/etc/hosts"
    assert relative_to_root("/srv/work/x", "/") == "srv/work/x"
    user = {"application/json": {"created_at": 5, "path": "/srv/work/y"}}
    assert shape({"started_at": 0, "ended_at": None, "seconds": 1.23456, "waited_s": 2,
                  "log_path": "/srv/work/logs/j.log", "local_path": "/srv/work/x",
                  "jobs": [{"cwd": "/srv/work", "mtime": 1.5}],
                  "results": [{"data": user, "metadata": {"mtime": 1}}]}, root) == {
        "started_at": "1970-01-01T00:00:00.000Z", "ended_at": None, "seconds": 1.235,
        "waited_s": 2, "log_path": "logs/j.log", "local_path": "/srv/work/x",
        "jobs": [{"cwd": ".", "mtime": "1970-01-01T00:00:01.500Z"}],
        "results": [{"data": user, "metadata": {"mtime": 1}}]}


def test_a_tool_must_take_the_tool_context_first() -> None:
    from jupyter_tether.mcp_server.tools.common import ToolContext, bind

    async def jupyter_nothing(server_url: str | None = None) -> dict[str, Any]:
        return {}

    with pytest.raises(TypeError, match="tc: ToolContext"):
        bind(jupyter_nothing, ToolContext.__new__(ToolContext))


# --- server, kernels, exec --------------------------------------------------------------------


async def test_server_kernel_and_exec_tools(mcp_server: McpProcess,
                                            jupyter_server: LocalJupyterServer,
                                            server_root: Path) -> None:
    async with connect(mcp_server.url) as client:
        calls = Calls(client)
        ping = await calls.ok("jupyter_ping")
        assert ping["ok"] and ping["server_version"].startswith("2.") and ping["rtt_s"] > 0
        # A token in server_url is used and never shown.
        ping2 = await calls.ok("jupyter_ping", {
            "server_url": f"{jupyter_server.url}?token={jupyter_server.token}"})
        assert ping2["supervisor_pid"] == ping["supervisor_pid"]

        status = await calls.ok("jupyter_status")
        assert status["link"]["connected"] and status["reconnects"] == 0
        assert status["supervisor"]["root_dir"] == str(server_root)

        out = await calls.ok("jupyter_exec_python", {"code": "x = 6 * 7\nprint('hi')\nx"})
        assert (out["status"], out["stdout"]) == ("ok", "hi\n")
        assert out["results"][0]["data"]["text/plain"] == "42"
        again = await calls.ok("jupyter_exec_python", {"code": "x + 1"})
        assert again["results"][0]["data"]["text/plain"] == "43", "state persists"
        assert again["kernel_id"] == out["kernel_id"]
        failed = await calls.ok("jupyter_exec_python", {"code": "1/0"})
        assert failed["status"] == "error" and failed["error"]["ename"] == "ZeroDivisionError"
        big = await calls.ok("jupyter_exec_python",
                             {"code": "print('y' * 100000)", "max_output_chars": 500})
        assert big["truncated"] and len(big["stdout"]) < 700
        image = await calls.ok("jupyter_exec_python", {"code": (
            "from IPython.display import Image, display\nimport base64\n"
            f"display(Image(data=base64.b64decode('{PNG}')))")})
        assert Path(image["images"][0]).read_bytes()[:4] == b"\x89PNG"
        assert PNG[:20] not in calls.texts[-1], "images are never inlined"

        kernel = await calls.ok("jupyter_start_kernel")
        kernels = await calls.ok("jupyter_list_kernels")
        roles = {k["id"]: k["role"] for k in kernels["kernels"]}
        assert roles[kernel["kernel_id"]] is None and "supervisor" in roles.values()
        in_kernel = await calls.ok("jupyter_exec_python",
                                   {"code": "'x' in dir()", "kernel_id": kernel["kernel_id"]})
        assert in_kernel["results"][0]["data"]["text/plain"] == "False"
        sessions = await calls.ok("jupyter_list_sessions")
        assert sessions["count"] >= 1
        done = await calls.ok("jupyter_shutdown_kernel", {"kernel_id": kernel["kernel_id"]})
        assert done["shutdown"]
        kernels = await calls.ok("jupyter_list_kernels")
        assert kernel["kernel_id"] not in {k["id"] for k in kernels["kernels"]}
        refused = await calls.error("jupyter_shutdown_kernel",
                                    {"kernel_id": status["supervisor"]["kernel_id"]})
        assert "supervisor" in refused

        snap = await calls.ok("jupyter_env_snapshot")
        assert snap["cwd"] == str(server_root) and "nvidia_smi" in snap and "pip_freeze" in snap
        assert all(jupyter_server.token not in text for text in calls.texts)


async def test_bad_arguments_give_tool_errors_not_crashes(mcp_server: McpProcess,
                                                          jupyter_server: LocalJupyterServer
                                                          ) -> None:
    async with connect(mcp_server.url) as client:
        calls = Calls(client)
        assert "code" in await calls.error("jupyter_exec_python", {})
        assert "timeout_s" in await calls.error("jupyter_ping", {"timeout_s": "soon"})
        assert "commands" in await calls.error("jupyter_run_commands", {"commands": "ls"})
        text = await calls.error("jupyter_job_status", {"job_id": "jnope"})
        assert "jupyter_job_list" in text
        assert "base64" in await calls.error("jupyter_upload_base64",
                                             {"path": "x.bin", "content_base64": "@@not base64"})
        text = await calls.error("jupyter_job_submit", {"spec": {"run": {"cmd": "x"}}})
        assert "invalid job spec" in text and "run.command is required" in text
        text = await calls.error("jupyter_job_submit", {"spec": {"sync": "nope"}})
        assert "spec.run is required" in text and "spec.sync must be a list" in text
        text = await calls.error("jupyter_ping", {
            "server_url": f"http://127.0.0.1:9/?token={jupyter_server.token}", "timeout_s": 10})
        # Neither the default server nor a named target (an unreachable one is in
        # test_multi_target): refused before anything is sent.
        assert "refused" in text and "--allow-any-server" in text
        assert "job_id" in await calls.error("jupyter_job_follow", {"job_id": ""})
        assert "wait_s" in await calls.error("jupyter_job_follow",
                                             {"job_id": "j1", "wait_s": 3600})
        # The server is unharmed.
        assert (await calls.ok("jupyter_ping"))["ok"]
        assert all(jupyter_server.token not in text for text in calls.texts)


# --- jobs -------------------------------------------------------------------------------------


async def test_job_tools(mcp_server: McpProcess, server_root: Path) -> None:
    async with connect(mcp_server.url) as client:
        calls = Calls(client)
        run = await calls.ok("jupyter_run_commands", {
            "commands": ["echo $GREETING", "exit 3", "echo never"],
            "env_overrides": {"GREETING": "hello"}})
        assert [r["returncode"] for r in run["results"]] == [0, 3] and not run["ok"]
        assert run["results"][0]["stdout"] == "hello\n"

        script = "for i in $(seq 1 300); do echo \"line $i ü\"; sleep 0.002; done; exit 4"
        job = await calls.ok("jupyter_job_start", {"command": script, "name": "counter"})
        assert job["state"] == "running" and job["log_path"].endswith(".log")
        text = await calls.follow_all(job["job_id"])
        assert text.splitlines() == [f"line {i} ü" for i in range(1, 301)]
        status = await calls.ok("jupyter_job_status", {"job_id": job["job_id"]})
        assert (status["state"], status["exit_code"], status["alive"]) == ("exited", 4, False)
        tail = await calls.ok("jupyter_job_tail", {"job_id": job["job_id"], "lines": 2})
        assert tail["text"] == "line 299 ü\nline 300 ü\n"
        capped = await calls.ok("jupyter_job_tail", {"job_id": job["job_id"], "max_chars": 100})
        assert capped["truncated"] and job["log_path"] in capped["text"]

        sleeper = await calls.ok("jupyter_job_start", {"command": "echo start; sleep 60",
                                                       "cwd": "", "log_path": "logs/sleeper.log"})
        assert (server_root / "logs" / "sleeper.log").exists()
        progress: list[float] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        waited = await calls.ok("jupyter_job_wait", {"job_id": sleeper["job_id"],
                                                     "timeout_s": 2.5},
                                progress_callback=on_progress)
        assert not waited["done"] and 2 <= waited["waited_s"] < 10
        assert progress and progress == sorted(progress)
        listed = await calls.ok("jupyter_job_list", {"state": "running"})
        assert sleeper["job_id"] in {j["job_id"] for j in listed["jobs"]}
        killed = await calls.ok("jupyter_job_kill", {"job_id": sleeper["job_id"]})
        assert killed["state"] == "killed" and not killed["alive"]
        waited = await calls.ok("jupyter_job_wait", {"job_id": sleeper["job_id"]})
        assert waited["done"] and waited["job"]["state"] == "killed"


async def test_follow_waits_for_new_output_and_never_splits_a_character(
        mcp_server: McpProcess) -> None:
    async with connect(mcp_server.url) as client:
        calls = Calls(client)
        job = await calls.ok("jupyter_job_start",
                             {"command": "sleep 1; printf 'é%.0s' $(seq 1 500); echo"})
        started = time.monotonic()
        first = await calls.ok("jupyter_job_follow", {"job_id": job["job_id"], "wait_s": 10,
                                                      "max_chars": 257})
        assert time.monotonic() - started >= 0.5, "waited for output"
        assert first["text"] and not first["eof"]
        # 257 bytes of two-byte characters: the cut falls on a character boundary.
        assert first["next_offset"] % 2 == 0 and "\ufffd" not in first["text"]
        rest = await calls.follow_all(job["job_id"])
        assert (rest == "é" * 500 + "\n") and first["text"] == rest[:len(first["text"])]


async def test_follow_gathers_a_short_job_whole_in_one_call(mcp_server: McpProcess) -> None:
    async with connect(mcp_server.url) as client:
        calls = Calls(client)
        # 3.6 s, a line every 0.6 s: one call brings all of it, eof with the last bytes (it
        # took six calls, the last one empty, when follow returned at the first new line).
        job = await calls.ok("jupyter_job_start", {
            "command": "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.6; done"})
        out = await calls.ok("jupyter_job_follow", {"job_id": job["job_id"], "wait_s": 10})
        assert out["text"] == "".join(f"line {i}\n" for i in range(1, 7)), out
        assert out["eof"] and (out["state"], out["exit_code"], out["remaining_bytes"]) == \
            ("exited", 0, 0)
        # A job still running: what wait_s gathered, and not eof.
        slow = await calls.ok("jupyter_job_start", {"command": "echo first; sleep 60"})
        out = await calls.ok("jupyter_job_follow", {"job_id": slow["job_id"], "wait_s": 1.5})
        assert (out["text"], out["eof"], out["state"]) == ("first\n", False, "running")
        await calls.ok("jupyter_job_kill", {"job_id": slow["job_id"], "sig": 9})


async def test_results_are_compact_json_with_utc_times_and_root_relative_paths(
        mcp_server: McpProcess, server_root: Path) -> None:
    from datetime import datetime

    def utc(text: str) -> datetime:
        assert text.endswith("Z"), text
        return datetime.fromisoformat(text[:-1] + "+00:00")

    async with connect(mcp_server.url) as client:
        calls = Calls(client)
        # An explicit null for an optional argument is still accepted.
        result = await client.call_tool("jupyter_job_start", {
            "command": "echo shaped", "log_path": "logs/shape.log", "server_url": None})
        job = result.structured_content
        assert job is not None and not result.is_error
        text = "".join(getattr(c, "text", "") for c in result.content)
        assert text == json.dumps(job, separators=(",", ":"), ensure_ascii=False)
        assert (job["log_path"], job["cwd"]) == ("logs/shape.log", ".")
        waited = await calls.ok("jupyter_job_wait", {"job_id": job["job_id"]})
        assert utc(waited["job"]["ended_at"]) >= utc(job["started_at"])
        assert isinstance(waited["waited_s"], float)
        wrote = await calls.ok("jupyter_write_text", {"path": "shape/a.txt", "content": "x"})
        assert wrote["resolved_path"] == "shape/a.txt"
        listing = await calls.ok("jupyter_list_dir", {"path": "shape"})
        (entry,) = listing["entries"]
        assert entry["path"] == "shape/a.txt" and utc(entry["mtime"]).year >= 2024
        status = await calls.ok("jupyter_status")
        assert utc(status["link"]["connected_since"]).year >= 2024
        assert status["supervisor"]["root_dir"] == str(server_root), "the root itself stays"
        assert all("\n" not in text for text in calls.texts)


# --- files, submit, collect -------------------------------------------------------------------


def _project(root: Path) -> Path:
    proj = root / "proj"
    (proj / "pkg").mkdir(parents=True)
    (proj / "train.py").write_text(
        "import os, pathlib\n"
        "out = pathlib.Path('out'); (out / 'plots').mkdir(parents=True, exist_ok=True)\n"
        "for step in range(5):\n"
        "    print(f'step {step} loss {1 / (step + 1):.3f}', flush=True)\n"
        "(out / 'model.pt').write_bytes(os.urandom(300000))\n"
        "(out / 'plots' / 'loss.txt').write_text('1.0 0.5 0.33')\n"
        "(out / 'plots' / 'acc.txt').write_text('0.1 0.5 0.9')\n"
        "print('GREETING', os.environ['GREETING'])\n")
    (proj / "pkg" / "__init__.py").write_text("VERSION = 1\n")
    (proj / ".git").mkdir()
    (proj / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return proj


async def test_file_tools(mcp_server: McpProcess, server_root: Path, tmp_path: Path) -> None:
    async with connect(mcp_server.url) as client:
        calls = Calls(client)
        wrote = await calls.ok("jupyter_write_text", {"path": "notes/a.txt", "content": "hé\n"})
        assert wrote["path"] == "notes/a.txt"
        assert (server_root / "notes" / "a.txt").read_text() == "hé\n"
        read = await calls.ok("jupyter_read_text", {"path": "notes/a.txt"})
        assert read["content"] == "hé\n" and not read["truncated"]
        (server_root / "notes" / "long.txt").write_text("z" * 5000)
        read = await calls.ok("jupyter_read_text", {"path": "notes/long.txt", "max_chars": 100})
        assert read["truncated"] and "jupyter_download_to_local" in read["content"]
        listing = await calls.ok("jupyter_list_dir", {"path": "notes"})
        assert {e["name"] for e in listing["entries"]} == {"a.txt", "long.txt"}

        blob = bytes(range(256)) * 10
        await calls.ok("jupyter_upload_base64", {"path": "notes/blob.bin",
                                                 "content_base64": base64.b64encode(blob).decode()})
        assert (server_root / "notes" / "blob.bin").read_bytes() == blob
        down = await calls.ok("jupyter_download_base64", {"remote_path": "notes/blob.bin"})
        assert base64.b64decode(down["content_base64"]) == blob
        assert "download_to_local" in await calls.error(
            "jupyter_download_base64", {"remote_path": "notes/blob.bin", "max_bytes": 100})

        local = tmp_path / "big.bin"
        local.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
        progress: list[float] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        up = await calls.ok("jupyter_upload_local_file",
                            {"local_path": str(local), "remote_path": "data/big.bin"},
                            progress_callback=on_progress)
        assert up["bytes"] == local.stat().st_size and len(up["sha256"]) == 64
        assert (server_root / "data" / "big.bin").read_bytes() == local.read_bytes()
        back = tmp_path / "back.bin"
        down = await calls.ok("jupyter_download_to_local",
                              {"remote_path": "data/big.bin", "local_path": str(back)})
        assert back.read_bytes() == local.read_bytes() and down["sha256"] == up["sha256"]
        assert progress == sorted(progress)

        proj = _project(tmp_path)
        synced = await calls.ok("jupyter_sync_dir", {"local_dir": str(proj),
                                                     "remote_dir": "synced"})
        assert synced["remote_dir"] == "synced", synced
        assert (server_root / "synced" / "pkg" / "__init__.py").read_text() == "VERSION = 1\n"
        assert not (server_root / "synced" / ".git").exists(), "reference excludes apply"
        again = await calls.ok("jupyter_sync_dir", {"local_dir": str(proj),
                                                    "remote_dir": "synced"})
        assert again["uploaded"] == 0 and again["unchanged"] == synced["uploaded"], "a delta"
        fetched = await calls.ok("jupyter_download_dir_to_local",
                                 {"remote_dir": "synced", "local_dir": str(tmp_path / "copy")})
        assert fetched["local_dir"] == str(tmp_path / "copy")
        assert (tmp_path / "copy" / "train.py").read_text() == (proj / "train.py").read_text()
        assert "local" in await calls.error("jupyter_upload_local_file", {
            "local_path": str(tmp_path / "missing.bin"), "remote_path": "x.bin"})
        assert "not_found" in await calls.error("jupyter_read_text", {"path": "no/such.txt"}) \
            or "jupyter_list_dir" in calls.texts[-1]


async def test_submit_follow_collect_and_a_running_job_across_an_mcp_server_restart(
        jupyter_server: LocalJupyterServer, mcp_state: Path, server_root: Path,
        tmp_path: Path) -> None:
    # Jobs belong to the supervisor, not to the MCP server: a job submitted, or one still
    # running, before a restart is followed, tailed and collected after it.
    proj = _project(tmp_path)
    spec = {
        "sync": [{"local_dir": str(proj), "remote_dir": "sub/proj", "clean_remote": True}],
        "bootstrap": {"cwd": "sub/proj", "commands": ["python -V", "test -f pkg/__init__.py"]},
        "run": {"cwd": "sub/proj", "command": "python train.py", "log_path": "logs/sub_run.log",
                "env_overrides": {"GREETING": "from-spec"}},
        "artifacts": ["logs/sub_run.log", {"remote_path": "sub/proj/out/model.pt"},
                      {"remote_dir": "sub/proj/out/plots", "local_subdir": "plots"},
                      "sub/proj/out/never-written.txt"],
    }
    first = McpProcess(jupyter_server, mcp_state, tmp_path / "first.log")
    try:
        async with connect(first.url) as client:
            calls = Calls(client)
            submitted = await calls.ok("jupyter_job_submit", {"spec": spec})
            assert submitted["ok"] and not submitted["reused"] and submitted["job_id"]
            assert [r["returncode"] for r in submitted["bootstrap"]["results"]] == [0, 0]
            job_id = submitted["job_id"]
            # The client retried (same spec, same files): the run is not started twice.
            retried = await calls.ok("jupyter_job_submit", {"spec": spec})
            assert retried["reused"] and retried["job_id"] == job_id
            log = await calls.follow_all(job_id)
            assert log.splitlines()[:5] == [f"step {i} loss {1 / (i + 1):.3f}" for i in range(5)]
            assert "GREETING from-spec" in log
            ticking = (await calls.ok("jupyter_job_start", {
                "command": "for i in 1 2 3; do echo tick $i; sleep 0.3; done"}))["job_id"]
    finally:
        first.stop()

    second = McpProcess(jupyter_server, mcp_state, tmp_path / "second.log")
    try:
        async with connect(second.url) as client:
            calls = Calls(client)
            status = await calls.ok("jupyter_job_status", {"job_id": job_id})
            assert (status["state"], status["exit_code"]) == ("exited", 0)
            local = tmp_path / "artifacts"
            collected = await calls.ok("jupyter_job_collect", {"job_id": job_id,
                                                               "local_dir": str(local)})
            assert not collected["ok"] and collected["missing"] == ["sub/proj/out/never-written.txt"]
            assert (local / "sub_run.log").read_text() == log
            assert (local / "model.pt").read_bytes() == \
                (server_root / "sub" / "proj" / "out" / "model.pt").read_bytes()
            assert sorted(p.name for p in (local / "plots").iterdir()) == ["acc.txt", "loss.txt"]
            # A stored record leaves the secrets of env_overrides out.
            record = json.loads((server_root / ".jupyter_tether" / "submits" /
                                 f"{job_id}.json").read_text())
            assert record["spec"]["run"]["env_overrides"] == {"GREETING": "***"}

            running = await calls.ok("jupyter_job_submit", {"spec": {
                "run": {"command": "sleep 30"}, "artifacts": ["logs/x.log"]}})
            text = await calls.error("jupyter_job_collect", {"job_id": running["job_id"],
                                                             "local_dir": str(local)})
            assert "still running" in text and "require_done" in text
            await calls.ok("jupyter_job_kill", {"job_id": running["job_id"], "sig": 9})
            failed = await calls.ok("jupyter_job_submit", {"spec": {
                "bootstrap": {"commands": ["exit 5"]}, "run": {"command": "echo no"}}})
            assert not failed["ok"] and failed["job_id"] is None and "exit" in failed["error"]

            waited = await calls.ok("jupyter_job_wait", {"job_id": ticking, "timeout_s": 30})
            assert waited["done"]
            assert (waited["job"]["state"], waited["job"]["exit_code"]) == ("exited", 0)
            tail = await calls.ok("jupyter_job_tail", {"job_id": ticking, "lines": 10})
            assert tail["text"] == "tick 1\ntick 2\ntick 3\n"
            listed = await calls.ok("jupyter_job_list", {})
            assert ticking in json.dumps(listed)
    finally:
        second.stop()


# --- transports and security ------------------------------------------------------------------


async def test_foreign_host_or_origin_is_refused(mcp_server: McpProcess) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "probe", "version": "0"}}}
    headers = {"Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient(timeout=10) as http:
        evil_host = await http.post(mcp_server.url, json=body,
                                    headers={**headers, "Host": "evil.example:8009"})
        assert evil_host.status_code == 421
        evil_origin = await http.post(mcp_server.url, json=body,
                                      headers={**headers, "Origin": "http://evil.example"})
        assert evil_origin.status_code == 403
        other_port = await http.post(mcp_server.url, json=body,
                                     headers={**headers, "Host": "127.0.0.1:1"})
        assert other_port.status_code == 421
        good = await http.post(mcp_server.url, json=body, headers={
            **headers, "Origin": f"http://localhost:{mcp_server.port}"})
        assert good.status_code == 200


async def test_bearer_token_is_required_when_set_and_for_non_loopback_binds(
        jupyter_server: LocalJupyterServer, mcp_state: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bearer token"):
        http_app(build_server(url=jupyter_server.url), host="0.0.0.0", port=8009)
    guarded = McpProcess(jupyter_server, mcp_state, tmp_path / "guarded.log",
                         "--auth-token", "s3cret-token")
    try:
        async with httpx2.AsyncClient(timeout=10) as http:
            for auth in (None, "Bearer wrong", "Basic s3cret-token"):
                response = await http.post(guarded.url, json={}, headers={
                    "Authorization": auth} if auth else {})
                assert response.status_code == 401
        async with connect(guarded.url, {"Authorization": "Bearer s3cret-token"}) as client:
            assert (await Calls(client).ok("jupyter_ping"))["ok"]
    finally:
        guarded.stop()


async def test_stdio_transport(jupyter_server: LocalJupyterServer, mcp_state: Path,
                               mcp_server: McpProcess) -> None:
    async with connect(mcp_server.url) as client:
        job = await Calls(client).ok("jupyter_job_start", {"command": "echo over-http"})
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "jupyter_tether", "mcp", "--stdio"],
        env={"REMOTE_JUPYTER_URL": jupyter_server.url,
             "REMOTE_JUPYTER_TOKEN": jupyter_server.token,
             "JUPYTER_TETHER_STATE_DIR": str(mcp_state), "PYTHONPATH": os.pathsep.join(sys.path)})
    async with Client(params) as client:
        calls = Calls(client)
        assert set(TOOL_NAMES) == {t.name for t in (await client.list_tools()).tools}
        assert (await calls.ok("jupyter_ping"))["ok"]
        # A job started by another MCP server process is known here: the registry is remote.
        waited = await calls.ok("jupyter_job_wait", {"job_id": job["job_id"]})
        assert waited["done"] and waited["job"]["exit_code"] == 0
        assert (await calls.follow_all(job["job_id"])) == "over-http\n"


async def test_embedded_server_by_default_and_closed_with_the_mcp_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REMOTE_JUPYTER_URL", raising=False)
    async with Client(build_server(embedded_root=tmp_path)) as client:
        status = await Calls(client).ok("jupyter_status")
        assert status["embedded"] and status["supervisor"]["root_dir"] == str(tmp_path)
        supervisor_pid = status["supervisor"]["pid"]
        os.kill(supervisor_pid, 0)
    # The lifespan owned the tether: leaving it stopped the embedded server and its kernels.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(supervisor_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError("the embedded server's kernels outlived the MCP server")


# --- bounds, timeouts, env values -------------------------------------------------------------


async def test_bounded_converts_only_its_own_deadline() -> None:
    import anyio

    from jupyter_tether.errors import TetherTimeout
    from jupyter_tether.mcp_server.limits import BoundExceeded, bounded
    from jupyter_tether.mcp_server.tool_errors import _hint

    # The link's own timeout (a TimeoutError subclass) is not the tool's timeout_s.
    with pytest.raises(TetherTimeout):
        async with bounded(30, "x"):
            raise TetherTimeout("the supervisor did not answer within 2s")
    with pytest.raises(BoundExceeded) as exceeded:
        async with bounded(0.2, "x"):
            await anyio.sleep(10)
    assert exceeded.value.seconds == 0.2
    assert "raise timeout_s" in _hint(exceeded.value, "")
    hint = _hint(TetherTimeout("the supervisor did not answer within 2s"), "")
    assert "did not answer within 2s" in hint and "may still be running" in hint


@asynccontextmanager
async def _stuck_pool(monkeypatch: pytest.MonkeyPatch, behaviour: str) -> AsyncIterator[Calls]:
    """An in-process server whose targets never open ('hang') or whose link times out."""
    import anyio

    from jupyter_tether.errors import TetherTimeout
    from jupyter_tether.mcp_server.pool import TetherPool

    async def get(self: TetherPool, server_url: str | None = None) -> Any:
        if behaviour == "hang":
            await anyio.sleep_forever()
        raise TetherTimeout("the supervisor did not answer within 2s")

    monkeypatch.setattr(TetherPool, "get", get)
    async with Client(build_server(url="http://127.0.0.1:9/")) as client:
        yield Calls(client)


async def test_a_link_timeout_keeps_its_own_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import anyio

    async with _stuck_pool(monkeypatch, "link-timeout") as calls:
        for name, args in [("jupyter_ping", {}), ("jupyter_job_status", {"job_id": "j1"}),
                           ("jupyter_job_wait", {"job_id": "j1"}),
                           ("jupyter_job_submit", {"spec": {"run": {"command": "true"}}})]:
            with anyio.fail_after(20):
                text = await calls.error(name, args)
            assert "did not answer within 2s" in text and "may still be running" in text, text
            assert "did not finish within timeout_s" not in text, text


async def test_opening_the_target_counts_against_timeout_s(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import anyio

    async with _stuck_pool(monkeypatch, "hang") as calls:
        for name, args in [
                ("jupyter_job_submit", {"spec": {"run": {"command": "true"}}, "timeout_s": 0.5}),
                ("jupyter_job_status", {"job_id": "j1", "timeout_s": 0.5}),
                ("jupyter_ping", {"timeout_s": 0.5})]:
            started = time.monotonic()
            with anyio.fail_after(20):
                text = await calls.error(name, args)
            assert "did not finish within timeout_s=0.5" in text, text
            assert time.monotonic() - started < 10


async def test_submit_reports_progress_through_bootstrap_and_takes_timeout_s(
        mcp_server: McpProcess, tmp_path: Path) -> None:
    import uuid

    proj = _project(tmp_path)
    spec = {"sync": [{"local_dir": str(proj), "remote_dir": f"prog/{tmp_path.name}"}],
            "bootstrap": {"commands": ["sleep 2.5"]},
            "run": {"command": "echo $N-$B", "env_overrides": {"N": 0, "B": True}},
            "idempotency_key": uuid.uuid4().hex}
    messages: list[str] = []
    values: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        values.append(value)
        messages.append(message or "")

    async with connect(mcp_server.url) as client:
        calls = Calls(client)
        out = await calls.ok("jupyter_job_submit", {"spec": spec, "timeout_s": 120},
                             progress_callback=on_progress)
        assert out["ok"] and out["job_id"]
        assert any(m.startswith("bootstrap: 0 of 1 commands done") for m in messages), messages
        assert values == sorted(values)
        assert await calls.follow_all(out["job_id"]) == "0-True\n"
        # Its own bound: a bootstrap longer than timeout_s gives up, saying the work may go on.
        slow = {**spec, "bootstrap": {"commands": ["sleep 20"]},
                "idempotency_key": uuid.uuid4().hex}
        text = await calls.error("jupyter_job_submit", {"spec": slow, "timeout_s": 2})
        assert "did not finish within timeout_s=2" in text


async def test_env_overrides_take_numbers_and_booleans(mcp_server: McpProcess) -> None:
    async with connect(mcp_server.url) as client:
        calls = Calls(client)
        env = {"CUDA_VISIBLE_DEVICES": 0, "RATE": 1.5, "DEBUG": True, "NAME": "x"}
        run = await calls.ok("jupyter_run_commands", {
            "commands": ["echo $CUDA_VISIBLE_DEVICES $RATE $DEBUG $NAME"], "env_overrides": env})
        assert run["ok"] and run["results"][0]["stdout"] == "0 1.5 True x\n"
        job = await calls.ok("jupyter_job_start", {"command": "echo $CUDA_VISIBLE_DEVICES",
                                                   "env_overrides": env})
        assert await calls.follow_all(job["job_id"]) == "0\n"
        assert "env_overrides" in await calls.error("jupyter_run_commands", {
            "commands": ["true"], "env_overrides": {"X": [1]}})
