"""The ``jupyter-tether`` command against the shared Jupyter server: in the test process, and
as the real console script wherever only a process shows the behaviour."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jupyter_tether import cli
from jupyter_tether.cli.jobs import job_exit_code
from jupyter_tether.config import resolve_name, select_target
from jupyter_tether.controller.embedded import LocalJupyterServer
from jupyter_tether.controller.jobs import JobInfo
from jupyter_tether.errors import ConfigError

from .cli_inprocess import run_cli

BIN = Path(sys.executable).parent
SCRIPT = BIN / "jupyter-tether"
COMMANDS = ["mcp", "status", "exec", "run", "jobs", "logs", "kill", "put", "get", "sync",
            "submit", "collect", "env", "targets"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("REMOTE_JUPYTER_URL", "REMOTE_JUPYTER_TOKEN", "JUPYTER_TETHER_CONFIG")}
    # The supervisor's local state (session ids) is per test run, as for the in-process tests.
    env["JUPYTER_TETHER_STATE_DIR"] = os.environ["JUPYTER_TETHER_STATE_DIR"]
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def tether_cli(server: LocalJupyterServer | None, *args: str, timeout: float = 60,
               env: dict[str, str] | None = None, cwd: Path | None = None,
               process: bool = False) -> subprocess.CompletedProcess[str]:
    """``jupyter-tether [--url --token] *args``: in this process (see ``cli_inprocess``), or
    as the console script in a subprocess with ``process=True`` (``timeout`` applies there;
    pytest-timeout bounds an in-process call)."""
    target = ["--url", server.url, "--token", server.token] if server else []
    if not process:
        return run_cli([*target, *args], env or cli_env(), cwd)
    return subprocess.run([str(SCRIPT), *target, *args], capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env(), cwd=cwd)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# --- help and usage ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_every_subcommand_has_examples(command: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"jupyter-tether {command}" in out and "examples:" in out
    assert "--json" in out and "--target" in out


def test_console_script_and_jupyter_subcommand_dispatch() -> None:
    proc = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True,
                          env=cli_env(), timeout=30)
    assert proc.returncode == 0 and "exit codes" in proc.stdout
    # `jupyter tether` finds `jupyter-tether` on PATH (jupyter_core's subcommand dispatch).
    env = cli_env(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    jupyter = shutil.which("jupyter", path=env["PATH"])
    assert jupyter is not None
    proc = subprocess.run([jupyter, "tether", "--version"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert proc.returncode == 0 and "jupyter-tether" in proc.stdout


@pytest.mark.parametrize("module", ["jupyter_tether", "jupyter_tether.cli"])
def test_python_dash_m_runs_the_command(module: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                          text=True, env=cli_env(), timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("jupyter-tether "), proc.stderr


def test_the_cli_loads_the_mcp_sdk_only_for_the_mcp_command() -> None:
    # Every other command's start stays fast: building the parser never imports the server.
    code = ("import sys; from jupyter_tether.cli.app import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('mcp', 'jupyter_tether.mcp'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_usage_errors_are_one_line_and_exit_2() -> None:
    proc = tether_cli(None, "nosuchcommand")
    assert proc.returncode == 2
    assert "nosuchcommand" in one_error_line(proc)
    proc = tether_cli(None, "exec", "--timeout", "soon", "1")
    assert proc.returncode == 2
    one_error_line(proc)


# --- targets ----------------------------------------------------------------------------------


def test_bad_targets_give_one_line_errors_and_nonzero_exits(
        jupyter_server: LocalJupyterServer, tmp_path: Path) -> None:
    bad_scheme = tether_cli(None, "--url", "ftp://example.org/", "status")
    assert bad_scheme.returncode == 2
    assert "ftp" in one_error_line(bad_scheme)

    unreachable = tether_cli(None, "--url", "http://127.0.0.1:9/", "status")
    assert unreachable.returncode == 1
    assert "cannot reach" in one_error_line(unreachable)

    secret = "not-the-right-token-1234"
    wrong = tether_cli(None, "--url", f"{jupyter_server.url}?token={secret}", "status")
    assert wrong.returncode == 1
    one_error_line(wrong)
    assert secret not in wrong.stderr + wrong.stdout

    config = tmp_path / "targets.toml"
    config.write_text('[known]\nurl = "http://127.0.0.1:9/"\n')
    missing = tether_cli(None, "--target", "nope", "status",
                         env=cli_env(JUPYTER_TETHER_CONFIG=str(config)))
    assert missing.returncode == 2
    assert "nope" in one_error_line(missing) and "known" in missing.stderr

    config.write_text("this is [not toml\n")
    broken = tether_cli(None, "--target", "x", "status",
                        env=cli_env(JUPYTER_TETHER_CONFIG=str(config)))
    assert broken.returncode == 2
    one_error_line(broken)


def test_named_target_from_the_config_file(jupyter_server: LocalJupyterServer,
                                           tmp_path: Path) -> None:
    config = tmp_path / "targets.toml"
    config.write_text(f'default = "lab"\n\n[lab]\nurl = "{jupyter_server.url}"\n'
                      f'token_env = "LAB_TOKEN"\n\n[other]\nurl = "http://h:1/?token=s3cret"\n')
    env = cli_env(JUPYTER_TETHER_CONFIG=str(config), LAB_TOKEN=jupyter_server.token)
    proc = tether_cli(None, "--target", "lab", "--json", "status", env=env)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["connected"] is True and status["name"] == "lab"
    # The config's default applies when nothing else is given.
    proc = tether_cli(None, "status", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["name"] == "lab"
    listing = tether_cli(None, "targets", "--json", env=env)
    rows = {row["name"]: row for row in json.loads(listing.stdout)["targets"]}
    assert rows["lab"]["token"] == "env:LAB_TOKEN" and rows["lab"]["default"]
    assert "s3cret" not in listing.stdout and rows["other"]["token"] == "none"
    for proc in (listing, tether_cli(None, "targets", env=env)):
        assert jupyter_server.token not in proc.stdout + proc.stderr


def test_target_selection_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text('default = "a"\n[a]\nurl = "http://a:1/"\ntoken = "ta"\n')
    monkeypatch.delenv("REMOTE_JUPYTER_URL", raising=False)
    monkeypatch.delenv("REMOTE_JUPYTER_TOKEN", raising=False)
    assert select_target(path=config).source == "default"
    assert select_target(path=tmp_path / "none.toml").target is None  # embedded server
    monkeypatch.setenv("REMOTE_JUPYTER_URL", "http://env:2/")
    chosen = select_target(path=config)
    assert (chosen.source, chosen.target and chosen.target.base_url) == ("env", "http://env:2/")
    chosen = select_target("http://flag:3/?token=tf", path=config)
    assert chosen.target is not None and chosen.target.token == "tf"
    assert "tf" not in chosen.cli_args()
    chosen = select_target(name="a", path=config)
    assert chosen.target is not None and chosen.target.token == "ta"
    assert chosen.cli_args() == " --target a"
    with pytest.raises(ConfigError, match="not both"):
        select_target("http://x/", name="a", path=config)


def test_a_server_url_may_name_a_target(tmp_path: Path) -> None:
    # What the MCP tools' server_url accepts: a URL as before, or a configured target's name.
    config = tmp_path / "t.toml"
    config.write_text('[gpu-box]\nurl = "http://gpu:8888/"\ntoken = "tg"\n'
                      '["lab.local"]\nurl = "http://lab:1/"\n')
    named = resolve_name(" gpu-box ", config)
    assert named is not None and (named.base_url, named.token, named.name) == \
        ("http://gpu:8888/", "tg", "gpu-box")
    assert resolve_name("lab.local", config) is not None  # a name wins over a host name
    for url in ("http://gpu-box:8888/", "gpu-box:8888", "some.host", "127.0.0.1:9/x"):
        assert resolve_name(url, config) is None, url
    with pytest.raises(ConfigError, match=r"'nope'.*known targets: gpu-box, lab.local"):
        resolve_name("nope", config)
    config.write_text("not [toml\n")
    assert resolve_name("host:8888", config) is None  # clearly a URL: a broken file is moot
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_name("gpu-box", config)


def test_job_exit_code_follows_shell_conventions() -> None:
    assert job_exit_code(JobInfo("j", "exited", exit_code=0)) == 0
    assert job_exit_code(JobInfo("j", "exited", exit_code=7)) == 7
    assert job_exit_code(JobInfo("j", "killed", exit_code=-15, signal=15)) == 143
    assert job_exit_code(JobInfo("j", "killed", exit_code=-9)) == 137
    assert job_exit_code(JobInfo("j", "lost")) == 1


# --- exec, status, jobs -----------------------------------------------------------------------


def test_json_output_parses_for_status_exec_and_jobs(jupyter_server: LocalJupyterServer) -> None:
    status = tether_cli(jupyter_server, "--json", "status")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["connected"] is True and data["server_version"].startswith("2.")
    assert jupyter_server.token not in status.stdout

    ran = tether_cli(jupyter_server, "exec", "--json", "print('hi'); 6 * 7")
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["status"] == "ok" and result["stdout"] == "hi\n"
    assert result["results"][0]["data"]["text/plain"] == "42"

    failed = tether_cli(jupyter_server, "exec", "--json", "raise ValueError('nope')")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["ename"] == "ValueError"

    jobs = tether_cli(jupyter_server, "jobs", "--json")
    assert jobs.returncode == 0, jobs.stderr
    assert isinstance(json.loads(jobs.stdout), list)


def test_exec_prints_streams_and_exits_1_on_error(jupyter_server: LocalJupyterServer,
                                                  tmp_path: Path) -> None:
    script = tmp_path / "code.py"
    script.write_text("import sys\nprint('out line')\nprint('err line', file=sys.stderr)\n40 + 2\n")
    ok = tether_cli(jupyter_server, "exec", "-f", str(script))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "out line\n42\n"
    assert "err line" in ok.stderr
    failed = tether_cli(jupyter_server, "exec", "1 / 0")
    assert failed.returncode == 1
    assert "ZeroDivisionError" in failed.stderr


# --- run, logs, kill --------------------------------------------------------------------------


def test_run_of_a_failing_command_exits_with_its_code(jupyter_server: LocalJupyterServer) -> None:
    proc = tether_cli(jupyter_server, "run", "echo before failing; exit 7")
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "before failing\n"
    ok = tether_cli(jupyter_server, "run", "printf", "%s|", "two words", "x")  # argv, quoted
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "two words|x|"


def test_logs_follow_after_a_detached_run_shows_the_whole_log(
        jupyter_server: LocalJupyterServer) -> None:
    started = tether_cli(jupyter_server, "run", "--detach",
                         "for i in $(seq 1 30); do echo line $i; sleep 0.05; done; exit 3")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    assert job_id and "logs " + job_id + " -f" in started.stderr
    followed = tether_cli(jupyter_server, "logs", job_id, "-f")
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == "".join(f"line {i}\n" for i in range(1, 31))
    assert f"[job {job_id} exited with code 3]" in followed.stderr
    last = tether_cli(jupyter_server, "logs", job_id, "-n", "2")
    assert last.stdout == "line 29\nline 30\n"
    last_then_follow = tether_cli(jupyter_server, "logs", job_id, "-f", "-n", "1")
    assert last_then_follow.stdout == "line 30\n", last_then_follow.stderr
    whole = tether_cli(jupyter_server, "--json", "logs", job_id)
    assert json.loads(whole.stdout)["log"] == followed.stdout
    listed = json.loads(tether_cli(jupyter_server, "--json", "jobs").stdout)
    row = next(r for r in listed if r["job_id"] == job_id)
    assert (row["state"], row["exit_code"]) == ("exited", 3)



def interrupt_after_line(server: LocalJupyterServer, args: list[str],
                         line: str) -> tuple[int, str]:
    """Run the CLI, wait for ``line`` on stdout, press Ctrl-C; (exit code, stderr)."""
    proc = subprocess.Popen(
        [str(SCRIPT), "--url", server.url, "--token", server.token, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_ctrl_c_detaches_from_run_and_the_job_keeps_running(
        jupyter_server: LocalJupyterServer) -> None:
    returncode, err = interrupt_after_line(jupyter_server, ["run", "echo started; sleep 60"],
                                           "started\n")
    assert returncode == 130, err
    assert "Traceback" not in err
    job_id = err.split("logs ")[-1].split()[0]
    assert f"jupyter-tether --url {jupyter_server.url} --token <TOKEN> logs {job_id} -f" in err
    listed = json.loads(tether_cli(jupyter_server, "--json", "jobs", "--state", "running").stdout)
    assert job_id in {r["job_id"] for r in listed}
    killed = tether_cli(jupyter_server, "--json", "kill", job_id, "--signal", "KILL")
    assert killed.returncode == 0, killed.stderr
    assert json.loads(killed.stdout)["state"] == "killed"


def test_unknown_job_is_a_one_line_error(jupyter_server: LocalJupyterServer) -> None:
    proc = tether_cli(jupyter_server, "logs", "jnosuchjob")
    assert proc.returncode == 1
    assert "jnosuchjob" in one_error_line(proc)


# --- files ------------------------------------------------------------------------------------


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha\n", "sub/b.bin": os.urandom(300_000), "sub/deeper/c.txt": b"c",
             "empty.txt": b"", "skip.pyc": b"compiled"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_sync_then_get_round_trips_a_tree(jupyter_server: LocalJupyterServer,
                                          tmp_path: Path) -> None:
    local = tmp_path / "src"
    files = _make_tree(local)
    synced = tether_cli(jupyter_server, "--json", "sync", str(local), "cli-sync/src",
                        "--exclude", "*.pyc")
    assert synced.returncode == 0, synced.stderr
    assert isinstance(json.loads(synced.stdout), dict)
    assert _tree(jupyter_server.root_dir / "cli-sync/src") == {
        k: v for k, v in files.items() if not k.endswith(".pyc")}

    back = tmp_path / "back"
    got = tether_cli(jupyter_server, "get", "cli-sync/src", str(back))
    assert got.returncode == 0, got.stderr
    assert _tree(back) == {k: v for k, v in files.items() if not k.endswith(".pyc")}

    # --delete removes what is gone locally; a second sync sends nothing new.
    (local / "a.txt").unlink()
    again = tether_cli(jupyter_server, "sync", str(local), "cli-sync/src", "--delete",
                       "--exclude", "*.pyc")
    assert again.returncode == 0, again.stderr
    assert not (jupyter_server.root_dir / "cli-sync/src/a.txt").exists()


def test_put_and_get_a_single_file(jupyter_server: LocalJupyterServer, tmp_path: Path) -> None:
    data = os.urandom(2_000_000)
    (tmp_path / "blob.bin").write_bytes(data)
    put = tether_cli(jupyter_server, "--json", "put", str(tmp_path / "blob.bin"),
                     "cli-files/blob.bin")
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["bytes"] == len(data)
    assert (jupyter_server.root_dir / "cli-files/blob.bin").read_bytes() == data
    into = tmp_path / "into"
    into.mkdir()
    got = tether_cli(jupyter_server, "get", "cli-files/blob.bin", str(into))  # like cp: into a dir
    assert got.returncode == 0, got.stderr
    assert (into / "blob.bin").read_bytes() == data
    assert "downloaded" in got.stdout
    missing = tether_cli(jupyter_server, "get", "cli-files/nope.bin", str(into))
    assert missing.returncode == 1
    one_error_line(missing)


def test_submit_follow_and_collect(jupyter_server: LocalJupyterServer, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "main.sh").write_text("mkdir -p out && echo result > out/r.txt && echo ran\n")
    spec = {"sync": [{"local_dir": str(project), "remote_dir": "cli-submit/proj"}],
            "run": {"cwd": "cli-submit/proj", "command": "sh main.sh"},
            "artifacts": ["cli-submit/proj/out/r.txt"],
            "idempotency_key": f"cli-test-{time.time_ns()}"}
    (tmp_path / "job.yaml").write_text(json.dumps(spec))  # JSON is YAML too
    submitted = tether_cli(jupyter_server, "submit", str(tmp_path / "job.yaml"), "--follow")
    assert submitted.returncode == 0, submitted.stderr
    assert "ran\n" in submitted.stdout
    found = re.search(r"job (\S+) submitted", submitted.stderr)
    assert found, submitted.stderr
    job_id = found.group(1)
    collected = tether_cli(jupyter_server, "--json", "collect", job_id, str(tmp_path / "res"))
    assert collected.returncode == 0, collected.stderr
    assert json.loads(collected.stdout)["ok"] is True
    assert (tmp_path / "res" / "r.txt").read_text() == "result\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    refused = tether_cli(jupyter_server, "submit", str(bad))
    assert refused.returncode == 2
    one_error_line(refused)


def test_mcp_passes_the_selected_target_to_serve(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    import jupyter_tether.mcp_server as mcp_server

    seen: dict[str, object] = {}
    monkeypatch.setattr(mcp_server, "serve", lambda **kwargs: seen.update(kwargs))
    config = tmp_path / "t.toml"
    config.write_text('[gpu]\nurl = "http://gpu:8888/"\ntoken = "tok"\n')
    monkeypatch.setenv("JUPYTER_TETHER_CONFIG", str(config))
    assert cli.main(["mcp", "--target", "gpu", "--port", "9100", "--auth-token", "a"]) == 0
    assert seen == {"transport": "streamable-http", "host": "127.0.0.1", "port": 9100,
                    "path": "/mcp", "url": "http://gpu:8888/", "token": "tok", "auth_token": "a",
                    "output_dir": None, "embedded_root": None, "local_roots": None,
                    "allowed_hosts": None, "allow_any_server": False, "verbosity": 1,
                    "cli_args": " --target gpu"}
    monkeypatch.delenv("REMOTE_JUPYTER_URL", raising=False)
    monkeypatch.setenv("JUPYTER_TETHER_CONFIG", str(tmp_path / "none.toml"))
    assert cli.main(["mcp", "--stdio"]) == 0
    assert seen["transport"] == "stdio" and seen["url"] is None


def test_env_snapshot_summary_and_json(jupyter_server: LocalJupyterServer) -> None:
    plain = tether_cli(jupyter_server, "env")
    assert plain.returncode == 0, plain.stderr
    assert "python" in plain.stdout and "torch" in plain.stdout
    assert not any(line != line.rstrip() for line in plain.stdout.splitlines())
    snap = json.loads(tether_cli(jupyter_server, "env", "--json").stdout)
    assert "pip_freeze" in snap and snap["root_dir"] == str(jupyter_server.root_dir)


# --- entry points, secrets, streaming ---------------------------------------------------------


def test_mcp_command_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import jupyter_tether.mcp_server as mcp_server

    seen: dict[str, object] = {}
    monkeypatch.setattr(mcp_server, "serve", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("JUPYTER_TETHER_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("REMOTE_JUPYTER_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["mcp", "--stdio", "--output-dir", "out", "--root", "root", "-q"]) == 0
    assert seen["transport"] == "stdio" and seen["url"] is None and seen["verbosity"] == 0
    assert (seen["output_dir"], seen["embedded_root"]) == ("out", str(tmp_path / "root"))
    assert seen["cli_args"] == f" --root {tmp_path / 'root'}"
    assert cli.main(["--url", "http://gpu:8888/", "--token", "tok", "mcp", "--port", "9101",
                     "-v"]) == 0
    assert (seen["url"], seen["token"], seen["port"]) == ("http://gpu:8888/", "tok", 9101)
    assert seen["verbosity"] == 2 and seen["embedded_root"] is None
    # The old spelling of --root still works.
    assert cli.main(["mcp", "--embedded-root", "r2"]) == 0
    assert seen["embedded_root"] == str(tmp_path / "r2")


def test_error_lines_never_show_the_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("REMOTE_JUPYTER_URL", "REMOTE_JUPYTER_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "targets.toml"
    config.write_text('[lab]\nurl = "http://127.0.0.1:9/"\ntoken = "named-target-secret"\n')
    monkeypatch.setenv("JUPYTER_TETHER_CONFIG", str(config))

    def error_for(*argv: str) -> str:
        code = cli.main(list(argv))
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        return err

    # Errors whose text holds the token itself, not as token=...: only *** is printed.
    err = error_for("--url", "http://127.0.0.1:9/", "--token", "flag-token-secret",
                    "put", str(tmp_path / "flag-token-secret"), "x")
    assert "flag-token-secret" not in err and "***" in err
    err = error_for("--url", "http://127.0.0.1:9/?token=url-token-secret",
                    "put", str(tmp_path / "url-token-secret.bin"), "x")
    assert "url-token-secret" not in err and "***" in err
    err = error_for("--target", "lab", "put", str(tmp_path / "named-target-secret"), "x")
    assert "named-target-secret" not in err and "***" in err
    monkeypatch.setenv("REMOTE_JUPYTER_TOKEN", "env-token-secret")
    err = error_for("put", str(tmp_path / "env-token-secret"), "x")
    assert "env-token-secret" not in err and "***" in err
    # argparse's own usage errors, which quote the bad value, too.
    with pytest.raises(SystemExit) as exited:
        cli.main(["--token", "argv-token-secret", "exec", "--timeout", "argv-token-secret", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argv-token-secret" not in err and "***" in err


def test_logs_streams_the_log_bytes_as_written(jupyter_server: LocalJupyterServer) -> None:
    # More than one 4 MiB read, with bytes that are not UTF-8: passed through untouched.
    script = ("import sys; out = sys.stdout.buffer; out.write(bytes([0xff, 0xfe]) + b'\\n'); "
              "[out.write(b'%07d ' % i + b'x' * 92 + b'\\n') for i in range(90000)]; "
              "out.write(b'end\\n')")
    started = tether_cli(jupyter_server, "--json", "run", "python3", "-c", script)
    assert started.returncode == 0, started.stderr
    job_id = json.loads(started.stdout)["job_id"]
    proc = subprocess.run([str(SCRIPT), "--url", jupyter_server.url, "--token",
                           jupyter_server.token, "logs", job_id], capture_output=True,
                          timeout=120, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    expected = bytes([0xff, 0xfe]) + b"\n" + b"".join(
        b"%07d " % i + b"x" * 92 + b"\n" for i in range(90000)) + b"end\n"
    assert len(expected) > 8 * 1024 * 1024
    assert proc.stdout == expected
    last = tether_cli(jupyter_server, "logs", job_id, "-n", "1")
    assert last.stdout == "end\n"


def test_ctrl_c_during_exec_interrupts_the_work_kernel(
        jupyter_server: LocalJupyterServer) -> None:
    returncode, err = interrupt_after_line(
        jupyter_server, ["exec", "import time\nprint('sleeping', flush=True)\ntime.sleep(120)"],
        "sleeping\n")
    assert returncode == 130, err
    # The cell was interrupted: the work kernel answers at once, not after the sleep.
    started = time.monotonic()
    after = tether_cli(jupyter_server, "exec", "print('free')", timeout=60)
    assert after.returncode == 0 and after.stdout == "free\n", after.stderr
    assert time.monotonic() - started < 45
