"""What a new user meets in the CLI and the MCP server process (issue 13, items 4-11): the
real ``jupyter-tether`` command in a subprocess, against the shared Jupyter server or an
embedded one, and the MCP server with the real ``mcp`` client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from rich.progress import Progress

from jupyter_tether.cli.jobs import exit_fields, signal_name
from jupyter_tether.cli.output import _RateColumn, plural, rate
from jupyter_tether.controller.embedded import LocalJupyterServer, free_port
from jupyter_tether.controller.jobs import JobInfo
from jupyter_tether.mcp_server.calllog import scrub_arguments

from .test_cli import SCRIPT, cli_env, one_error_line, tether_cli


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- 4. put and get follow cp/scp -------------------------------------------------------------


def test_get_follows_cp_rules(jupyter_server: LocalJupyterServer, tmp_path: Path) -> None:
    remote = jupyter_server.root_dir / "fh-get"
    remote.mkdir()
    (remote / "f.txt").write_text("payload\n")
    # A trailing slash means a folder, created if missing: not a file named `dl`.
    got = tether_cli(jupyter_server, "get", "fh-get/f.txt", "dl/", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "dl").is_dir() and (tmp_path / "dl/f.txt").read_text() == "payload\n"
    # No local path: the basename, in the current folder.
    got = tether_cli(jupyter_server, "get", "fh-get/f.txt", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "f.txt").read_text() == "payload\n"
    # An existing folder means inside it; anything else is the new name.
    (tmp_path / "there").mkdir()
    assert tether_cli(jupyter_server, "get", "fh-get/f.txt", "there",
                      cwd=tmp_path).returncode == 0
    assert (tmp_path / "there/f.txt").is_file()
    assert tether_cli(jupyter_server, "get", "fh-get/f.txt", "renamed.txt",
                      cwd=tmp_path).returncode == 0
    assert (tmp_path / "renamed.txt").read_text() == "payload\n"
    # A folder goes under its own name too.
    assert tether_cli(jupyter_server, "get", "fh-get", "there", cwd=tmp_path).returncode == 0
    assert (tmp_path / "there/fh-get/f.txt").read_text() == "payload\n"


def test_put_follows_cp_rules(jupyter_server: LocalJupyterServer, tmp_path: Path) -> None:
    root = jupyter_server.root_dir
    (tmp_path / "f.txt").write_text("up\n")
    put = tether_cli(jupyter_server, "put", "f.txt", "fh-put/newdir/", cwd=tmp_path)
    assert put.returncode == 0, put.stderr
    assert (root / "fh-put/newdir").is_dir()
    assert (root / "fh-put/newdir/f.txt").read_text() == "up\n"
    # Onto an existing remote folder: inside it.
    assert tether_cli(jupyter_server, "put", "f.txt", "fh-put", cwd=tmp_path).returncode == 0
    assert (root / "fh-put/f.txt").read_text() == "up\n"
    # A new name, and no remote path at all (the server root).
    assert tether_cli(jupyter_server, "put", "f.txt", "fh-put/g.txt",
                      cwd=tmp_path).returncode == 0
    assert (root / "fh-put/g.txt").read_text() == "up\n"
    (tmp_path / "fh-put-rootfile.txt").write_text("at root\n")
    assert tether_cli(jupyter_server, "put", "fh-put-rootfile.txt", cwd=tmp_path).returncode == 0
    assert (root / "fh-put-rootfile.txt").read_text() == "at root\n"
    # A folder into an existing remote folder keeps its name.
    (tmp_path / "tree/sub").mkdir(parents=True)
    (tmp_path / "tree/sub/a.txt").write_text("a")
    assert tether_cli(jupyter_server, "put", "tree", "fh-put", cwd=tmp_path).returncode == 0
    assert (root / "fh-put/tree/sub/a.txt").read_text() == "a"


def test_get_of_a_folder_again_fetches_only_what_changed(
        jupyter_server: LocalJupyterServer, tmp_path: Path) -> None:
    remote = jupyter_server.root_dir / "fh-delta"
    for rel, data in {"a.txt": b"a" * 10, "sub/b.bin": os.urandom(3_000_000),
                      "sub/c.txt": b"c"}.items():
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_bytes(data)
    first = _json(tether_cli(jupyter_server, "--json", "get", "fh-delta", cwd=tmp_path))
    assert (first["files"], first["unchanged"]) == (3, 0)
    assert (tmp_path / "fh-delta/sub/b.bin").read_bytes() == (remote / "sub/b.bin").read_bytes()
    again = _json(tether_cli(jupyter_server, "--json", "get", "fh-delta", cwd=tmp_path))
    assert (again["files"], again["bytes"], again["unchanged"]) == (0, 0, 3)
    (remote / "sub/c.txt").write_bytes(b"changed")
    text = tether_cli(jupyter_server, "get", "fh-delta", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "1 file, 7 B, 2 unchanged" in text.stdout
    assert (tmp_path / "fh-delta/sub/c.txt").read_bytes() == b"changed"


# --- 5. one exit-status vocabulary ------------------------------------------------------------


def test_exit_fields_and_signal_names() -> None:
    assert exit_fields(JobInfo("j", "exited", exit_code=3)) == {"exit_code": 3, "signal": None}
    assert exit_fields(JobInfo("j", "killed", exit_code=-15, signal=15)) == \
        {"exit_code": None, "signal": "SIGTERM"}
    assert exit_fields(JobInfo("j", "killed", exit_code=-9)) == \
        {"exit_code": None, "signal": "SIGKILL"}
    assert exit_fields(JobInfo("j", "running")) == {"exit_code": None, "signal": None}
    # The remote's (Linux) numbering, whatever this machine's is.
    assert (signal_name(10), signal_name(34), signal_name(36)) == \
        ("SIGUSR1", "SIGRTMIN", "SIGRTMIN+2")


def test_run_logs_kill_and_jobs_say_the_same_thing(jupyter_server: LocalJupyterServer) -> None:
    ran = tether_cli(jupyter_server, "run", "echo out; exit 3")
    assert ran.returncode == 3
    job_id = re.search(r"job (\S+) started", ran.stderr)
    assert job_id, ran.stderr
    line = f"[job {job_id.group(1)} exited with code 3]"
    assert line in ran.stderr
    followed = tether_cli(jupyter_server, "logs", job_id.group(1), "-f")
    assert line in followed.stderr, followed.stderr
    as_json = _json(tether_cli(jupyter_server, "--json", "logs", job_id.group(1)))
    assert (as_json["exit_code"], as_json["signal"]) == (3, None)
    ran_json = json.loads(tether_cli(jupyter_server, "--json", "run", "exit 4").stdout)
    assert (ran_json["exit_code"], ran_json["signal"]) == (4, None)
    assert "exit_status" not in ran_json

    sleeper = _json(tether_cli(jupyter_server, "--json", "run", "-d", "sleep 60"))["job_id"]
    killed = tether_cli(jupyter_server, "kill", sleeper, "--grace", "1")
    assert killed.returncode == 0, killed.stderr
    assert killed.stdout.strip() == f"job {sleeper} killed by SIGTERM"
    rows = {r["job_id"]: r for r in _json(tether_cli(jupyter_server, "--json", "jobs"))}
    assert (rows[sleeper]["exit_code"], rows[sleeper]["signal"]) == (None, "SIGTERM")
    listed = tether_cli(jupyter_server, "jobs").stdout
    assert re.search(rf"^{sleeper}\s+killed\s+SIGTERM\s", listed, re.MULTILINE), listed
    followed = tether_cli(jupyter_server, "logs", sleeper, "-f")
    assert f"[job {sleeper} killed by SIGTERM]" in followed.stderr
    tail = tether_cli(jupyter_server, "--json", "logs", sleeper, "-f").stdout.splitlines()[-1]
    assert json.loads(tail)["job"]["signal"] == "SIGTERM"


# --- 6. --json errors -------------------------------------------------------------------------


def test_json_errors_are_json_on_stdout_and_text_on_stderr(
        jupyter_server: LocalJupyterServer, tmp_path: Path) -> None:
    cases = [  # (argv, exit code, code)
        (["--json", "logs", "jnosuchjob"], 1, "not_found"),
        (["--json", "exec", "--timeout", "soon", "1"], 2, "usage"),
        (["--json", "get", "fh-no-such-file", str(tmp_path)], 1, "not_found"),
    ]
    for argv, exit_code, code in cases:
        proc = tether_cli(jupyter_server, *argv)
        assert proc.returncode == exit_code, proc.stderr
        line = one_error_line(proc)
        assert json.loads(proc.stdout) == {"error": line.removeprefix("error: "), "code": code}
    config = tmp_path / "t.toml"
    config.write_text('[known]\nurl = "http://127.0.0.1:9/"\n')
    proc = tether_cli(None, "--target", "nope", "status", "--json",
                      env=cli_env(JUPYTER_TETHER_CONFIG=str(config)))
    assert proc.returncode == 2 and json.loads(proc.stdout)["code"] == "config"


# --- 7. wording -------------------------------------------------------------------------------


def test_counts_rates_and_units() -> None:
    assert (plural(1, "file"), plural(0, "file"), plural(2, "file")) == \
        ("1 file", "0 files", "2 files")
    assert rate(0, 1.5) == "" and rate(10, 0) == ""
    assert rate(3 * 1024 * 1024, 1.0) == ", 3.0 MiB/s"
    # The progress bar's rate column speaks the summaries' units (rich's own says MB/s).
    with Progress(_RateColumn()) as progress:
        task_id = progress.add_task("x", total=10)
        task = progress._tasks[task_id]
        task.finished_speed = 5 * 1024 * 1024
        assert _RateColumn().render(task).plain == "5.0 MiB/s"


def test_transfer_reports_say_1_file_and_no_zero_rate(jupyter_server: LocalJupyterServer,
                                                       tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one/only.txt").write_text("x")
    put = tether_cli(jupyter_server, "put", "one", "fh-words/", cwd=tmp_path)
    assert put.returncode == 0, put.stderr
    assert "1 file sent" in put.stdout and "1 files" not in put.stdout
    (tmp_path / "empty.txt").write_bytes(b"")
    empty = tether_cli(jupyter_server, "put", "empty.txt", "fh-words/", cwd=tmp_path)
    assert empty.returncode == 0, empty.stderr
    assert "B/s" not in empty.stdout, empty.stdout
    got = tether_cli(jupyter_server, "get", "fh-words/one", str(tmp_path / "back") + "/")
    assert "1 file, 1 B" in got.stdout and "1 files" not in got.stdout


def test_env_text_shows_every_field_of_the_json(jupyter_server: LocalJupyterServer) -> None:
    snap = _json(tether_cli(jupyter_server, "--json", "env"))
    plain = tether_cli(jupyter_server, "env")
    assert plain.returncode == 0, plain.stderr
    shown = {line.split()[0] for line in plain.stdout.splitlines() if line.strip()}
    assert set(snap) <= shown, set(snap) - shown
    assert re.search(r"^pip_freeze\s+\d+ packages", plain.stdout, re.MULTILINE)


# --- 9-11. the MCP server process -------------------------------------------------------------


def test_mcp_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = tether_cli(None, "mcp", "--port", str(port),
                          env=cli_env(XDG_DATA_HOME=str(tmp_path)), process=True)
    assert proc.returncode == 2
    assert one_error_line(proc) == \
        f"error: port {port} is in use (another jupyter-tether mcp?): pass --port"
    assert proc.stdout == ""


class McpServerProcess:
    """``jupyter-tether mcp`` on a free port, its stderr kept in a file."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.err_path = tmp_path / f"mcp-{self.port}.err"
        with open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(
                [str(SCRIPT), "mcp", "--port", str(self.port), *args],
                stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=tmp_path)
        deadline = time.monotonic() + 60
        while "Ctrl-C stops it" not in self.stderr:
            assert self.process.poll() is None, self.stderr
            assert time.monotonic() < deadline, self.stderr
            time.sleep(0.05)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.stderr


@pytest.fixture
def embedded_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    # The user data dir (the embedded server's default root) lives under tmp_path.
    yield cli_env(XDG_DATA_HOME=str(tmp_path / "data"),
                  JUPYTER_TETHER_CONFIG=str(tmp_path / "none.toml"))


def test_embedded_server_roots_in_the_workspace_not_the_cwd(
        tmp_path: Path, embedded_env: dict[str, str]) -> None:
    start = tmp_path / "start"
    start.mkdir()
    workspace = tmp_path / "data/jupyter-tether/workspace"
    status = _json(tether_cli(None, "--json", "status", env=embedded_env, cwd=start,
                              timeout=120))
    assert status["embedded"] and status["root_dir"] == str(workspace)
    assert list(start.iterdir()) == []  # nothing written where it was started
    mine = tmp_path / "mine"
    ran = tether_cli(None, "--root", str(mine), "run", "pwd; echo hi > made.txt",
                     env=embedded_env, cwd=start, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert f"root: {mine}" in ran.stderr
    assert ran.stdout.strip() == str(mine) and (mine / "made.txt").read_text() == "hi\n"
    assert list(start.iterdir()) == []
    refused = tether_cli(None, "--root", str(mine), "--url", "http://127.0.0.1:9/", "status",
                         env=embedded_env)
    assert refused.returncode == 2 and "--root" in one_error_line(refused)


# A job that runs until a file `go` appears in its cwd (at most a minute).
RUNS_UNTIL_GO = 'echo started; timeout 60 sh -c "until [ -e go ]; do sleep .1; done"'


@pytest.mark.anyio
async def test_mcp_banner_call_log_and_the_jobs_left_running(
        tmp_path: Path, embedded_env: dict[str, str]) -> None:
    root = tmp_path / "work root"
    server = McpServerProcess(tmp_path, "--root", str(root), "-v", env=embedded_env)
    try:
        banner = server.stderr
        assert f"on {server.url}" in banner and f"root {root}" in banner
        assert f"claude mcp add --transport http jupyter-tether {server.url}" in banner
        async with Client(server.url) as client:
            started = await client.call_tool("jupyter_job_start", {
                "command": RUNS_UNTIL_GO,
                "env_overrides": {"API_TOKEN": "hunter2-secret", "MODE": "fast"}})
            assert not started.is_error
            job_id = (started.structured_content or {})["job_id"]
            missing = await client.call_tool("jupyter_job_status", {"job_id": "jnosuch"})
            assert missing.is_error
    finally:
        err = server.stop()
    assert server.process.returncode == 0, err
    # One line per call: tool, target, duration, ok/error; -v adds the arguments, scrubbed.
    call = re.search(r"^\d\d:\d\d:\d\d jupyter_job_start target=embedded \d+\.\d\ds ok "
                     r"args=(.*)$", err, re.MULTILINE)
    assert call, err
    args = json.loads(call.group(1))
    assert args["env_overrides"] == {"API_TOKEN": "***", "MODE": "fast"}
    assert "hunter2-secret" not in err
    assert re.search(r"^\d\d:\d\d:\d\d jupyter_job_status target=embedded \d+\.\d\ds error: ",
                     err, re.MULTILINE), err
    # At shutdown: which jobs still run, and the commands that reach them.
    assert f"1 job still running on the embedded local server (root {root})" in err
    assert re.search(rf"^  {job_id}  {re.escape(RUNS_UNTIL_GO)}$", err, re.MULTILINE), err
    again = f"jupyter-tether --root '{root}'"
    assert f"{again} jobs" in err and f"{again} logs JOB_ID -f" in err
    # ... and they do: the same root reaches the job, still running.
    try:
        listed = tether_cli(None, "--root", str(root), "--json", "jobs", env=embedded_env,
                            timeout=120)
        rows = {r["job_id"]: r for r in _json(listed)}
        assert rows[job_id]["state"] == "running"
    finally:
        (root / "go").touch()  # the job ends (each embedded call starts a server: no `kill`)


@pytest.mark.anyio
async def test_mcp_call_log_default_and_quiet(jupyter_server: LocalJupyterServer,
                                              tmp_path: Path) -> None:
    env = cli_env(REMOTE_JUPYTER_URL=jupyter_server.url,
                  REMOTE_JUPYTER_TOKEN=jupyter_server.token,
                  JUPYTER_TETHER_CONFIG=str(tmp_path / "none.toml"))
    for flag, logged in (None, True), ("-q", False):
        server = McpServerProcess(tmp_path, *([flag] if flag else []), env=env)
        try:
            async with Client(server.url) as client:
                assert not (await client.call_tool("jupyter_ping", {})).is_error
        finally:
            err = server.stop()
        line = re.search(r"^\d\d:\d\d:\d\d jupyter_ping target=(\S+) \d+\.\d\ds ok$", err,
                         re.MULTILINE)
        assert bool(line) is logged, err
        assert jupyter_server.token not in err
        if line:
            assert line.group(1) == jupyter_server.url  # the URL, no credential, no args
        assert "no jobs are running" in err


def test_call_log_arguments_are_scrubbed() -> None:
    args = {"server_url": "http://h:1/?token=abc123secret", "code": "x" * 500,
            "content_base64": "QUJD" * 10, "spec": {"env": {"GITHUB_TOKEN": "ghp_x"}},
            "note": "uses known-secret-value"}
    shown = scrub_arguments(args, lambda text: text.replace("known-secret-value", "***"))
    assert "abc123secret" not in json.dumps(shown) and "ghp_x" not in json.dumps(shown)
    assert shown["spec"]["env"]["GITHUB_TOKEN"] == "***"
    assert shown["note"] == "uses ***"
    assert shown["content_base64"] == "<40 base64 chars>"
    assert len(shown["code"]) < 260 and shown["code"].endswith("<500 chars>")
