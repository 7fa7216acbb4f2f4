"""Connect, inject the supervisor, attach again, and use the first operations."""

from __future__ import annotations

import asyncio
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_tether import (
    AsyncTether,
    AuthError,
    ConfigError,
    ConnectionLost,
    KernelError,
    RemoteError,
    Tether,
    connect,
)
from jupyter_tether.agent_payload import bundle, wire
from jupyter_tether.controller.embedded import LocalJupyterServer, free_port
from jupyter_tether.controller.kernel_requests import control_request
from jupyter_tether.controller.kernels import SUPERVISOR_SESSION, WORK_SESSION

from . import loopback_http
from .conftest import (
    dies_at_first_cell_kernelspec,
    dies_once_kernelspec,
    fast_options,
    hangs_once_kernelspec,
    iopub_seen,
)


def test_connect_injects_supervisor_and_says_hello(tether: Tether, server_root: Path) -> None:
    facts = tether.info()
    assert facts["protocol"] == wire.PROTOCOL_VERSION
    assert facts["payload_hash"] == bundle.payload_hash()
    assert facts["root_dir"] == str(server_root)
    assert facts["capabilities"]["msgpack"] is True
    assert {"ping", "hello", "env_snapshot"} <= set(facts["ops"])
    status = tether.status()
    assert status["connected"] and status["protocol"] == "v1" and status["codec"] == "msgpack"
    # ipykernel >= 7 advertises subshells; comm traffic is routed to one.
    assert status["subshell_id"]


def test_supervisor_runs_in_a_named_session_at_the_root(tether: Tether) -> None:
    sessions = [s for s in tether.list_sessions() if s["name"] == SUPERVISOR_SESSION]
    assert len(sessions) == 1
    assert sessions[0]["kernel"]["id"] == tether.status()["kernel_id"]


def test_second_controller_reuses_the_live_supervisor(
        tether: Tether, jupyter_server: LocalJupyterServer) -> None:
    first = tether.info()
    with connect(jupyter_server.url, jupyter_server.token, options=fast_options()) as second:
        assert second.status()["install"] == "reused"
        assert second.info()["instance_id"] == first["instance_id"]
        assert second.info()["pid"] == first["pid"]
        assert second.ping()["ok"]
    # The first controller is unaffected by the second one leaving.
    assert tether.ping()["ok"]


def test_ping_reports_round_trip_and_server_version(tether: Tether) -> None:
    result = tether.ping()
    assert result["ok"] is True
    assert result["rtt_ms"] > 0
    assert result["server_version"].startswith("2.")


def test_malformed_and_unknown_requests_get_errors_and_supervisor_keeps_serving(
        tether: Tether) -> None:
    link = tether.aio.link

    async def abuse() -> list[str]:
        codes = []
        for op, args in [("no_such_op", {}), ("events_since", {"seq": "x"}),
                         ("hello", {"protocol": 999})]:
            try:
                await link.call(op, args, timeout=10)
            except RemoteError as exc:
                codes.append(exc.code)
        return codes

    codes = tether.portal.call(abuse)
    assert codes == ["unknown_op", "invalid_argument", "conflict"]
    # Raw garbage on the comm: the supervisor must answer, not die.
    sup_pid = tether.info()["pid"]

    async def send_garbage() -> None:
        sock = link._sock
        assert sock is not None
        for payload in (b"\xc1garbage", b"{not json", b"[1,2]", b""):
            msg = sock.build("comm_msg", {"comm_id": link.comm_id, "data": {"tether": 1}})
            await sock.send(msg, [payload] if payload else [])

    tether.portal.call(send_garbage)
    assert tether.ping()["ok"]
    assert tether.info()["pid"] == sup_pid


def test_exec_returns_stdout_results_and_errors_with_traceback(tether: Tether) -> None:
    result = tether.exec("print('hello'); 6 * 7")
    assert result.status == "ok"
    assert result.stdout == "hello\n"
    assert result.results[0]["data"]["text/plain"] == "42"
    failed = tether.exec("def f():\n    raise ValueError('bad value')\nf()")
    assert failed.status == "error"
    assert failed.error is not None and failed.error["ename"] == "ValueError"
    assert any("bad value" in line for line in failed.error["traceback"])


def test_exec_runs_in_a_work_kernel_not_the_supervisor(tether: Tether) -> None:
    result = tether.exec("import os; os.getpid()")
    assert int(result.results[0]["data"]["text/plain"]) != tether.info()["pid"]
    with pytest.raises(ConfigError, match="supervisor"):
        tether.exec("1", kernel_id=tether.status()["kernel_id"])


def test_exec_state_persists_in_the_default_work_kernel(tether: Tether) -> None:
    tether.exec("tether_test_value = 123")
    assert tether.exec("tether_test_value").results[0]["data"]["text/plain"] == "123"


def test_exec_streams_output_and_is_interrupted_on_timeout(tether: Tether) -> None:
    seen: list[str] = []
    started = time.monotonic()
    result = tether.exec("import time\nprint('start', flush=True)\ntime.sleep(30)",
                         timeout=2, on_output=lambda kind, text: seen.append(text))
    assert time.monotonic() - started < 15
    assert result.status == "timeout"
    assert "start\n" in seen
    assert result.error is not None and result.error["ename"] == "KeyboardInterrupt"
    # The kernel is usable again afterwards.
    assert tether.exec("1 + 1").results[0]["data"]["text/plain"] == "2"


def test_exec_caps_large_output_and_saves_images_to_files(tether: Tether) -> None:
    big = tether.exec("print('x' * 50000)", max_output_chars=1000)
    assert big.truncated and len(big.stdout) < 1100
    assert big.stdout.startswith("[... ") and "truncated" in big.stdout
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
    image = tether.exec(
        "from IPython.display import Image, display\nimport base64\n"
        f"display(Image(data=base64.b64decode('{png}')))")
    assert len(image.images) == 1
    saved = Path(image.images[0])
    assert saved.read_bytes()[:4] == b"\x89PNG"
    assert "saved_to" in image.results[0]["data"]["image/png"]


def test_exec_on_unknown_kernel_says_so(tether: Tether) -> None:
    with pytest.raises(KernelError, match="no kernel"):
        tether.exec("1", kernel_id="00000000-0000-0000-0000-000000000000")


def test_kernel_start_list_and_shutdown(tether: Tether) -> None:
    kernel = tether.start_kernel()
    assert kernel["id"] in {k["id"] for k in tether.list_kernels()}
    assert tether.exec("1+1", kernel_id=kernel["id"]).results[0]["data"]["text/plain"] == "2"
    tether.shutdown_kernel(kernel["id"])
    assert kernel["id"] not in {k["id"] for k in tether.list_kernels()}
    with pytest.raises(ConfigError):
        tether.shutdown_kernel(tether.status()["kernel_id"])


def test_env_snapshot_reports_python_and_gpu_probes(tether: Tether, server_root: Path) -> None:
    snap = tether.env_snapshot()
    assert snap["python"].split()[0] == tether.info()["python"]
    assert snap["cwd"] == str(server_root)
    assert "nvidia_smi" in snap and "available" in snap["nvidia_smi"]
    assert snap["pip_freeze"]["returncode"] == 0
    assert "ipykernel" in snap["pip_freeze"]["stdout"].lower()
    assert "importable" in snap["torch"]


def test_wrong_token_gives_a_clear_auth_error(jupyter_server: LocalJupyterServer) -> None:
    with pytest.raises(AuthError, match="fresh URL"):
        connect(jupyter_server.url, "wrong-token")


def test_unreachable_server_gives_connection_lost() -> None:
    with pytest.raises(ConnectionLost, match="cannot reach"):
        connect("http://127.0.0.1:9/", "x")


def test_token_in_url_query_is_used_and_never_shown(jupyter_server: LocalJupyterServer) -> None:
    url = f"{jupyter_server.url}lab?token={jupyter_server.token}"
    with connect(url, options=fast_options()) as t:
        assert t.ping()["ok"]
        assert jupyter_server.token not in repr(t)
        assert jupyter_server.token not in str(t.status())


@pytest.mark.anyio
async def test_async_api_and_concurrent_calls(jupyter_server: LocalJupyterServer) -> None:
    async with AsyncTether(jupyter_server.url, jupyter_server.token,
                           options=fast_options()) as t:
        results = await asyncio.gather(*(t.link.call("ping") for _ in range(50)))
        assert len(results) == 50 and all(r.result["pong"] for r in results)


def test_blocking_api_works_inside_a_running_event_loop(
        jupyter_server: LocalJupyterServer) -> None:
    # A notebook cell runs inside a live asyncio loop; connect() must still work there.
    async def inside_loop() -> int:
        with connect(jupyter_server.url, jupyter_server.token, options=fast_options()) as t:
            return int(t.exec("21 * 2").results[0]["data"]["text/plain"])

    assert asyncio.run(inside_loop()) == 42


def test_embedded_server_starts_and_stops_cleanly(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REMOTE_JUPYTER_URL", raising=False)
    with Tether(embedded_root=tmp_path, options=fast_options()) as t:
        assert t.info()["root_dir"] == str(tmp_path)
        server = t.aio._embedded
        assert server is not None and server.process is not None
        process = server.process
        assert t.exec("1").status == "ok"
    assert process.poll() is not None, "the embedded server must stop with the tether"
    with pytest.raises(ConnectionLost):
        connect(server.url, server.token)


def test_embedded_server_log_is_private_follows_no_planted_link_and_goes_with_it(
        tmp_path: Path) -> None:
    # Another local user can read /tmp and plant links there: a log at a guessable name
    # (/tmp/jupyter-tether-server-PORT.log, 0644, as before) was readable by them, and a link
    # planted at that name made the server's start truncate the file it points to.
    port = free_port()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    planted = Path(tempfile.gettempdir()) / f"jupyter-tether-server-{port}.log"
    planted.unlink(missing_ok=True)
    planted.symlink_to(victim)
    try:
        with LocalJupyterServer(tmp_path / "root", port=port) as server:
            log = server.log_path
            assert log is not None and log.parent != Path(tempfile.gettempdir())
            assert stat.S_IMODE(log.stat().st_mode) == 0o600
            assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
        assert victim.read_text() == "keep me"
        assert not log.parent.exists(), "a cleanly stopped server leaves no log behind"
    finally:
        planted.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def _kernels_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalJupyterServer]:
    share = tmp_path_factory.mktemp("failing-kernelspecs")
    hangs_once_kernelspec(share, name="hangs-first")
    hangs_once_kernelspec(share, nth=2, name="hangs-second")
    dies_once_kernelspec(share)
    dies_at_first_cell_kernelspec(share)
    # The restarter gives up at once on a kernel that dies at each restart (default: 5 tries).
    quick_giveup = ["--KernelRestarter.restart_limit=1", "--KernelRestarter.time_to_dead=0.5"]
    root = tmp_path_factory.mktemp("kernels-server-root")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(share))
        server = LocalJupyterServer(root, log_path=root.parent / "kernels-server.log",
                                    extra_args=quick_giveup).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_server(_kernels_server: LocalJupyterServer) -> Iterator[LocalJupyterServer]:
    """A server no controller has used: one server for the tests of kernels that fail as
    they start (each uses a kernelspec of its own, see conftest) and of upgrades, with every
    kernel, and so every session, shut down after each test."""
    server = _kernels_server
    yield server
    api = server.url + "api/kernels"
    headers = {"Authorization": f"token {server.token}"}
    for kernel in loopback_http.get(api, headers=headers, timeout=10).json():
        loopback_http.request("DELETE", f"{api}/{kernel['id']}", headers=headers, timeout=30)


def test_a_supervisor_kernel_that_never_answers_is_replaced(
        fresh_server: LocalJupyterServer, caplog: pytest.LogCaptureFixture) -> None:
    # A kernel can hang as it starts (a port taken by another process first: seen in this
    # suite on a gateway). The supervisor's session then kept a kernel that never answered,
    # and every connect, now and later, failed on its websocket's open timeout.
    server = fresh_server
    with Tether(server.url, server.token,
                options=fast_options(kernel_name="hangs-first", open_timeout=5.0)) as t:
        assert "starting another" in caplog.text
        job = t.jobs.start("echo on the second kernel")
        assert job.wait(timeout=30).exit_code == 0
        sessions = t.portal.call(t.aio.rest.listable_sessions) or []
        ours = [s for s in sessions if s.get("name") == SUPERVISOR_SESSION]
        assert [s["kernel"]["id"] for s in ours] == [t.aio.link.kernel_id]


def test_a_work_kernel_that_never_answers_is_replaced(
        fresh_server: LocalJupyterServer, caplog: pytest.LogCaptureFixture) -> None:
    # The supervisor's kernel starts first and answers; the default work kernel, the second,
    # hangs. Found again on every exec, it failed each one after the websocket's open timeout.
    server = fresh_server
    with Tether(server.url, server.token,
                options=fast_options(kernel_name="hangs-second", open_timeout=5.0)) as t:
        hung = t.portal.call(t.aio.work_kernel_id)
        assert t.exec("6 * 7").value == "42"
        assert "starting another" in caplog.text
        sessions = t.portal.call(t.aio.rest.listable_sessions) or []
        work = [s["kernel"]["id"] for s in sessions if s.get("name") == WORK_SESSION]
        assert work == [t.status()["work_kernel_id"]] and hung not in work
        assert t.portal.call(t.aio.rest.get_kernel, hung) is None
        assert t.exec("6 * 7").value == "42"


def test_a_supervisor_kernel_that_dies_as_it_starts_is_replaced(
        fresh_server: LocalJupyterServer, caplog: pytest.LogCaptureFixture) -> None:
    # A kernel can die as it starts, again at each restart, until the server drops it (seen
    # once in this suite: "kernel ... went away while we connected to it").
    server = fresh_server
    with Tether(server.url, server.token, options=fast_options(kernel_name="dies-once")) as t:
        assert "went away" in caplog.text and "starting another" in caplog.text
        assert t.exec("6 * 7").value == "42"
        sessions = t.portal.call(t.aio.rest.listable_sessions) or []
        ours = [s for s in sessions if s.get("name") == SUPERVISOR_SESSION]
        assert [s["kernel"]["id"] for s in ours] == [t.aio.link.kernel_id]


def test_a_supervisor_kernel_that_restarts_under_the_install_is_replaced(
        fresh_server: LocalJupyterServer, caplog: pytest.LogCaptureFixture) -> None:
    # One that dies as it starts may come back through the restarter after its websocket
    # opened: the install cell then ended in "restarting while running the code".
    server = fresh_server
    with Tether(server.url, server.token,
                options=fast_options(kernel_name="dies-at-first-cell")) as t:
        assert "restarting" in caplog.text and "starting another" in caplog.text
        assert t.exec("6 * 7").value == "42"
        sessions = t.portal.call(t.aio.rest.listable_sessions) or []
        ours = [s for s in sessions if s.get("name") == SUPERVISOR_SESSION]
        assert [s["kernel"]["id"] for s in ours] == [t.aio.link.kernel_id]


def test_upgrades_reuse_the_supervisors_subshell_and_jobs_still_start(
        fresh_server: LocalJupyterServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each newer payload shuts the old supervisor down and parks the new one's comm traffic
    # in a subshell. A subshell outlives the cell parked in it, and a fresh one per upgrade
    # kept a thread and ~10 fds in the kernel for good (controllers of two versions taking
    # turns on one server upgrade it on every connect).
    real = bundle.payload_hash()
    server = fresh_server
    outcomes, subshells = [], []
    for i in range(3):
        monkeypatch.setattr(bundle, "_HASH", f"{real[:8]}-v{i}")
        with Tether(server.url, server.token, options=fast_options()) as t:
            link = t.aio.link
            outcomes.append(link.install_outcome)
            job = t.jobs.start("echo after-upgrade")
            assert job.wait(timeout=30).exit_code == 0
            if link.subshell_id is not None:  # ipykernel >= 7
                listed = t.portal.call(control_request, link._sock,
                                       "list_subshell_request", {})
                subshells.append(listed["subshell_id"])
    assert outcomes == ["installed", "upgraded", "upgraded"]
    if subshells:
        assert subshells == [subshells[0]] * 3 and len(subshells[0]) == 1


def test_each_rpc_reply_is_a_single_iopub_message(tether: Tether) -> None:
    # Behind a proxy, a second small message per reply waits ~40 ms for a delayed ACK (the
    # server leaves Nagle on), so the supervisor's parked subshell must answer without the
    # busy/idle status pair around each reply.
    link = tether.aio.link
    hello = tether.portal.call(lambda: link.call("hello", {"protocol": wire.PROTOCOL_VERSION}))
    assert link.subshell_id == hello.result["parked_subshell_id"]
    with iopub_seen(tether) as seen:
        for _ in range(20):
            tether.ping()
    assert seen.count("comm_msg") == 20
    assert "status" not in seen


def test_exec_output_cap_counts_what_it_cut_without_holding_it_all(tether: Tether) -> None:
    result = tether.exec("for _ in range(100):\n    print('y' * 999)", max_output_chars=1000)
    # 100 lines of 1000 chars (with newlines): 99,000 cut, the last 1,000 kept.
    assert result.stdout == "[... 99000 chars truncated ...]\n" + "y" * 999 + "\n"


def test_exec_recovers_when_the_default_work_kernel_was_shut_down_elsewhere(
        tether: Tether) -> None:
    tether.exec("1")
    work = tether.status()["work_kernel_id"]
    assert work
    tether.portal.call(lambda: tether.aio.rest.shutdown_kernel(work))  # a culler, say
    result = tether.exec("'fresh'")
    assert result.results[0]["data"]["text/plain"] == "'fresh'"
    assert tether.status()["work_kernel_id"] != work


def test_target_repr_never_shows_credentials() -> None:
    from jupyter_tether.controller.target import parse_target

    kaggle = parse_target("https://kkb.example/k/123/eyJSECRETjwt/proxy/lab?reset", token="tok")
    assert "eyJSECRETjwt" not in repr(kaggle) and "tok" not in repr(kaggle)
    assert kaggle.http_url("api/kernels") == \
        "https://kkb.example/k/123/eyJSECRETjwt/proxy/api/kernels"
