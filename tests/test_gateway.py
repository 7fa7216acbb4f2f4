"""jupyter-tether against a real Jupyter Kernel Gateway: no contents API, no listable sessions.

The gateway runs as a subprocess on a random loopback port with an auth token, in a temporary
working directory (its kernels' cwd, so the root that relative paths mean).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_tether import AuthError, Tether
from jupyter_tether.controller.kernels import (
    MARKER_PATH,
    SUPERVISOR_SESSION,
    WORK_SESSION,
    find_or_start,
)
from jupyter_tether.controller.rest import JupyterRest
from jupyter_tether.controller.state import TargetState
from jupyter_tether.controller.target import parse_target

from . import loopback_http
from .conftest import dies_at_first_cell_kernelspec, fast_options, hangs_once_kernelspec
from .remote_checks import (
    check_connect,
    check_exec,
    check_files,
    check_job_follow,
    check_reconnect,
)
from .remote_servers import KernelGateway

# Looked up, not imported: importing kernel_gateway loads nbformat's schema checkers (~1 s) in
# every test worker at collection.
if importlib.util.find_spec("kernel_gateway") is None:
    pytest.skip("jupyter_kernel_gateway is a test dependency", allow_module_level=True)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelGateway]:
    workdir = tmp_path_factory.mktemp("kernel-gateway")
    hangs_once_kernelspec(workdir / "share")
    dies_at_first_cell_kernelspec(workdir / "share")
    with KernelGateway(workdir, jupyter_path=workdir / "share") as kg:
        yield kg


@pytest.fixture(scope="module")
def kg_tether(gateway: KernelGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tether]:
    with Tether(gateway.url, gateway.token, options=fast_options(),
                output_dir=tmp_path_factory.mktemp("kg-outputs")) as t:
        yield t


def test_gateway_has_no_contents_api_and_hides_its_sessions(gateway: KernelGateway) -> None:
    # What the rest of this file relies on: the stock gateway really lacks these.
    headers = {"Authorization": f"token {gateway.token}"}
    assert loopback_http.get(gateway.url + "api/contents", headers=headers).status_code == 404
    assert loopback_http.get(gateway.url + "api/status", headers=headers).status_code == 404
    assert loopback_http.get(gateway.url + "api/sessions", headers=headers).status_code == 403
    assert loopback_http.get(gateway.url + "api/kernels", headers=headers).status_code == 403


def test_connect_injects_the_supervisor_at_the_gateway_cwd(kg_tether: Tether,
                                                           gateway: KernelGateway) -> None:
    check_connect(kg_tether, gateway.root)
    # The durable record of which kernel is ours: a marker on the remote disk.
    marker = json.loads((gateway.root / MARKER_PATH).read_text())
    assert marker[SUPERVISOR_SESSION]["kernel_id"] == kg_tether.status()["kernel_id"]


def test_exec_runs_in_a_work_kernel(kg_tether: Tether, gateway: KernelGateway) -> None:
    check_exec(kg_tether, gateway.root)


def test_job_follow_is_exact(kg_tether: Tether) -> None:
    check_job_follow(kg_tether)


def test_files_go_over_the_comm(kg_tether: Tether, gateway: KernelGateway, tmp_path: Path) -> None:
    check_files(kg_tether, tmp_path, "kg-files")
    assert (gateway.root / "kg-files" / "tree" / "a.txt").read_bytes() == b"alpha v2\n"


def test_controller_with_empty_state_reattaches_to_the_same_kernels(
        kg_tether: Tether, gateway: KernelGateway, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Another machine: no local state at all. It must find the supervisor (and the work
    # kernel) through the marker, not inject a second one.
    monkeypatch.setenv("JUPYTER_TETHER_STATE_DIR", str(tmp_path / "empty-state"))
    kg_tether.exec("gateway_value = 'kept'")  # the work kernel exists, with some state
    before = sorted(gateway.kernel_pids())
    with Tether(gateway.url, gateway.token, options=fast_options()) as other:
        assert other.status()["install"] == "reused"
        assert other.status()["kernel_id"] == kg_tether.status()["kernel_id"]
        assert other.info()["pid"] == kg_tether.info()["pid"]
        assert other.info()["instance_id"] == kg_tether.info()["instance_id"]
        assert other.exec("gateway_value").results[0]["data"]["text/plain"] == "'kept'"
    # The kernels it started to read the marker were shut down again.
    assert sorted(gateway.kernel_pids()) == before
    assert len(before) == 2
    marker = json.loads((gateway.root / MARKER_PATH).read_text())
    assert set(marker) == {SUPERVISOR_SESSION, WORK_SESSION}
    assert kg_tether.ping()["ok"]


def test_reconnect_after_a_drop(kg_tether: Tether) -> None:
    check_reconnect(kg_tether)


def test_listing_is_refused_with_a_clear_message(kg_tether: Tether) -> None:
    with pytest.raises(AuthError, match="KG_LIST_KERNELS"):
        kg_tether.list_kernels()
    with pytest.raises(AuthError, match="KG_LIST_KERNELS"):
        kg_tether.list_sessions()


def test_wrong_token_is_refused(gateway: KernelGateway) -> None:
    with pytest.raises(AuthError):
        Tether(gateway.url, "wrong-token", options=fast_options())


def test_gateway_that_lists_sessions_is_found_by_session_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # KG_LIST_KERNELS=True: the supervisor's session (its notebook.path) is the record.
    with KernelGateway(tmp_path / "kg", list_kernels=True) as kg:
        with Tether(kg.url, kg.token, options=fast_options()) as first:
            check_connect(first, kg.root)
            monkeypatch.setenv("JUPYTER_TETHER_STATE_DIR", str(tmp_path / "empty-state"))
            with Tether(kg.url, kg.token, options=fast_options()) as second:
                assert second.info()["pid"] == first.info()["pid"]
                assert second.status()["install"] == "reused"
            sessions = first.list_sessions()
            assert [s["notebook"]["path"] for s in sessions] == [SUPERVISOR_SESSION]
        assert not (kg.root / MARKER_PATH).exists()


@pytest.mark.anyio
@pytest.mark.parametrize(("kernel_name", "how"), [
    # It never came up (a port taken by another process first: seen in this suite): its
    # websocket unanswered, the connect failed after the open timeout.
    ("hangs-once", "timed out"),
    # It died as it started and came back through the restarter under the marker's read:
    # the connect failed with "restarting while running the code".
    ("dies-at-first-cell", "restarting"),
])
async def test_a_fresh_kernel_that_did_not_come_up_is_replaced_by_another(
        gateway: KernelGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        kernel_name: str, how: str) -> None:
    # On a gateway the marker is read through a fresh kernel: one that did not come up is
    # shut down and another tried.
    target = parse_target(gateway.url, gateway.token)
    rest = JupyterRest(target)
    try:
        kernel_id, started = await find_or_start(
            rest, f"jupyter-tether-{kernel_name}", kernel_name=kernel_name,
            state=TargetState(target.key, tmp_path / "state"), open_timeout=5.0)
        assert started and "did not come up" in caplog.text and how in caplog.text
        model = await rest.get_kernel(kernel_id)
        assert model is not None and model.get("execution_state") != "dead"
        await rest.shutdown_kernel(kernel_id)
    finally:
        await rest.aclose()


@pytest.mark.anyio
async def test_racing_controllers_settle_on_one_kernel_and_a_dead_one_is_replaced(
        gateway: KernelGateway, tmp_path: Path) -> None:
    # Four controllers with no local state look for the same name at once: the marker's
    # compare-and-set leaves exactly one kernel, and the fresh kernels of the losers are gone.
    name = "jupyter-tether-race-test"
    target = parse_target(gateway.url, gateway.token)
    rests = [JupyterRest(target) for _ in range(4)]
    try:
        before = set(gateway.kernel_pids())
        found = await asyncio.gather(*(
            find_or_start(rest, name, kernel_name="python3",
                          state=TargetState(target.key, tmp_path / f"state-{i}"))
            for i, rest in enumerate(rests)))
        assert len({kernel_id for kernel_id, _ in found}) == 1
        assert sum(started for _, started in found) == 1
        assert len(set(gateway.kernel_pids()) - before) == 1
        kernel_id = found[0][0]
        # The kernel dies: the next controller claims a new one in its place.
        await rests[0].shutdown_kernel(kernel_id)
        replacement, started = await find_or_start(
            rests[0], name, kernel_name="python3", state=TargetState(target.key, tmp_path / "new"))
        assert started and replacement != kernel_id
        assert json.loads((gateway.root / MARKER_PATH).read_text())[name]["kernel_id"] == replacement
        await rests[0].shutdown_kernel(replacement)
    finally:
        for rest in rests:
            await rest.aclose()
