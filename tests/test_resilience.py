"""The link survives network faults, restarts and expired credentials, with nothing lost.

Every test here talks to a real Jupyter server through ``FaultProxy`` (``tests/netfault.py``)
and breaks the path the way networks do: a clean close (FIN), a reset (RST), or a blackhole
where bytes vanish and no FIN ever comes, so only keepalive pings notice. Heal-to-first-RPC
times are printed (``pytest -s``); the asserted bounds are generous on purpose.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

from jupyter_tether import AsyncTether, AuthError, ConnectionLost, Tether, connect
from jupyter_tether.controller.embedded import LocalJupyterServer
from jupyter_tether.controller.kernels import SUPERVISOR_SESSION

from . import loopback_http
from .conftest import fast_options
from .netfault import FaultProxy, fault_proxy, proxied_server
from .test_files import settle

__all__ = ["proxied_server"]  # a fixture: imported for pytest, not used by name

Fault = Literal["cut", "reset", "blackhole"]
FAULTS: list[Fault] = ["cut", "reset", "blackhole"]
#: how long a healed link may take to serve a call again, in these tests (goal: ~2 s)
HEAL_BOUND_S = 15.0


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def break_link(proxy: FaultProxy, fault: Fault) -> None:
    getattr(proxy, fault)()


def wait_for_drop(t: Tether, timeout: float = 15) -> None:
    """Until the link has noticed the fault (at once for FIN/RST, by keepalive for a blackhole)."""
    wait_until(lambda: not t.status()["connected"], timeout, "the link to notice the fault")


def heal_and_time_first_call(proxy: FaultProxy, t: Tether, label: str) -> float:
    proxy.heal()
    healed = time.monotonic()
    assert t.ping(timeout=HEAL_BOUND_S + 15)["ok"]
    elapsed = time.monotonic() - healed
    print(f"\n[resilience] {label}: heal -> first successful RPC {elapsed:.3f}s")
    return elapsed


@pytest.fixture
def proxied_tether(proxied_server: tuple[FaultProxy, str, str],
                   tmp_path: Path) -> Iterator[tuple[FaultProxy, Tether]]:
    proxy, url, token = proxied_server
    with Tether(url, token, options=fast_options(), output_dir=tmp_path) as t:
        yield proxy, t


# --- idle link ------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", FAULTS)
def test_next_call_just_works_after_fault_during_idle_period(
        proxied_tether: tuple[FaultProxy, Tether], fault: Fault) -> None:
    proxy, t = proxied_tether
    pid = t.info()["pid"]
    assert t.ping()["ok"]
    # A notebook that seeds `random` gets the same sequence whether or not the link kept
    # alive, dropped and backed off meanwhile.
    seeded = random.getstate()
    break_link(proxy, fault)
    wait_for_drop(t)
    time.sleep(1.0)  # stay down a while: reconnect attempts fail and back off meanwhile
    down = t.status()
    assert down["connected"] is False and down["last_error"]
    elapsed = heal_and_time_first_call(proxy, t, f"idle {fault}")
    assert elapsed < HEAL_BOUND_S
    status = t.status()
    assert status["connected"] and status["reconnects"] >= 1
    assert status["last_drop"] and status["last_drop_at"]
    assert status["install"] == "reused" and t.info()["pid"] == pid, "same supervisor"
    assert random.getstate() == seeded


def test_clean_close_with_server_still_up_reconnects_at_once(
        proxied_tether: tuple[FaultProxy, Tether]) -> None:
    proxy, t = proxied_tether
    assert t.ping()["ok"]
    proxy.cut(stay_down=False)
    started = time.monotonic()
    assert t.ping(timeout=30)["ok"]
    elapsed = time.monotonic() - started
    print(f"\n[resilience] clean close, server up: drop -> first successful RPC {elapsed:.3f}s")
    assert elapsed < 5
    assert t.status()["reconnects"] == 1


def test_blackhole_is_noticed_by_keepalive_within_a_few_seconds(
        proxied_tether: tuple[FaultProxy, Tether]) -> None:
    proxy, t = proxied_tether
    assert t.ping()["ok"]
    proxy.blackhole()
    started = time.monotonic()
    wait_for_drop(t, timeout=20)
    noticed = time.monotonic() - started
    print(f"\n[resilience] blackhole noticed after {noticed:.2f}s "
          "(ping_interval 1 s + ping_timeout 2 s + close_timeout 1 s)")
    assert noticed < 10
    assert "keepalive" in t.status()["last_error"]
    assert proxy.counters.dropped_up > 0, "the blackhole must really have swallowed bytes"
    proxy.heal()
    assert t.ping(timeout=30)["ok"]


# --- calls while the link is down -------------------------------------------------------------


def test_call_while_down_waits_then_fails_with_clear_connection_lost(
        proxied_server: tuple[FaultProxy, str, str]) -> None:
    proxy, url, token = proxied_server
    with Tether(url, token, options=fast_options(reconnect_wait=1.5)) as t:
        assert t.ping()["ok"]
        proxy.cut()
        wait_for_drop(t)
        started = time.monotonic()
        with pytest.raises(ConnectionLost) as caught:
            t.ping(timeout=30)
        waited = time.monotonic() - started
        assert 1.0 < waited < 10, "waits about reconnect_wait, never hangs"
        message = str(caught.value)
        assert "'ping'" in message and "down for" in message and "last error" in message
        assert t.status()["last_error"]
        proxy.heal()
        assert t.ping(timeout=30)["ok"]


def test_call_made_during_outage_completes_once_link_heals(
        proxied_tether: tuple[FaultProxy, Tether]) -> None:
    proxy, t = proxied_tether
    proxy.reset()
    wait_for_drop(t)

    async def ping_later() -> float:
        started = anyio.current_time()
        await t.aio.link.call("ping", timeout=30)
        return anyio.current_time() - started

    future = t.portal.start_task_soon(ping_later)
    time.sleep(1.0)
    assert not future.done(), "the call waits for the link instead of failing at once"
    proxy.heal()
    assert future.result(timeout=30) >= 1.0


@pytest.mark.anyio
async def test_fifty_rpcs_in_flight_during_a_drop_all_complete(
        proxied_server: tuple[FaultProxy, str, str], server_root: Path) -> None:
    proxy, url, token = proxied_server
    marker = server_root / f"dedup-{os.getpid()}-{time.monotonic_ns()}.txt"
    async with AsyncTether(url, token, options=fast_options()) as t:
        await t.link.call("ping")
        # Requests reach the supervisor and run; only the replies are lost.
        proxy.blackhole(direction="down")
        results: dict[int, Any] = {}

        async def rpc(i: int) -> None:
            if i % 5 == 0:  # job starts: the retried ones must be deduplicated by their key
                job = await t.jobs.start(f"echo {i} >> {marker}", idempotency_key=f"k-{marker.name}-{i}")
                results[i] = job.job_id
            else:
                results[i] = (await t.link.call("ping", timeout=60)).result

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(rpc, i)
            await anyio.sleep(0.5)
            proxy.reset()
            await anyio.sleep(0.5)
            proxy.heal()
        assert len(results) == 50
        assert all(results[i]["pong"] for i in range(50) if i % 5)
        assert t.link.reconnects >= 1
        job_ids = [results[i] for i in range(0, 50, 5)]
        assert len(set(job_ids)) == 10
        for job_id in job_ids:
            await t.jobs.get(job_id).wait(30)
        # Each start ran exactly once, although every one of them was sent twice.
        assert sorted(marker.read_text().split()) == sorted(str(i) for i in range(0, 50, 5))


@pytest.mark.anyio
async def test_non_idempotent_call_in_flight_during_drop_says_it_may_have_run(
        proxied_server: tuple[FaultProxy, str, str]) -> None:
    proxy, url, token = proxied_server
    async with AsyncTether(url, token, options=fast_options()) as t:
        await t.link.call("ping")
        proxy.blackhole(direction="down")

        async def drop_soon() -> None:
            await anyio.sleep(0.3)
            proxy.heal()  # new connections go through; the current one stays dead
            proxy.reset(stay_down=False)

        async with anyio.create_task_group() as tg:
            tg.start_soon(drop_soon)
            started = anyio.current_time()
            with pytest.raises(ConnectionLost, match="may or may not have run"):
                await t.link.call("ping", idempotent=False, timeout=30)
            assert anyio.current_time() - started < 5, "said at the drop, not after a wait"
        assert (await t.link.call("ping", timeout=30)).result["pong"]


# --- follow across faults ---------------------------------------------------------------------


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.anyio
async def test_follow_gives_every_line_once_in_order_across_fault(
        proxied_server: tuple[FaultProxy, str, str], server_root: Path, fault: Fault) -> None:
    proxy, url, token = proxied_server
    stop = server_root / f"stop-follow-{fault}-{time.monotonic_ns()}"
    # Numbered lines every ~2 ms until told to stop, then 200 more.
    script = ("import os, sys, time\n"
              "i = 0\n"
              f"while not os.path.exists({str(stop)!r}):\n"
              "    print('line', i, flush=True); i += 1; time.sleep(0.002)\n"
              "for _ in range(200):\n"
              "    print('line', i, flush=True); i += 1\n")
    (server_root / f"{stop.name}.py").write_text(script)
    async with AsyncTether(url, token, options=fast_options()) as t:
        job = await t.jobs.start(f"python3 {stop.name}.py")
        lines: list[str] = []
        buffered = b""

        async def follow() -> None:
            nonlocal buffered
            async for data in job.follow():
                buffered += data
                *complete, buffered = buffered.split(b"\n")
                lines.extend(part.decode() for part in complete)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                while len(lines) < 100:
                    await anyio.sleep(0.05)
                break_link(proxy, fault)
                while t.link.connected:
                    await anyio.sleep(0.05)
                seen_at_drop = len(lines)
                await anyio.sleep(1.0)
                proxy.heal()
                healed = anyio.current_time()
                while len(lines) <= seen_at_drop + 100:  # live again
                    await anyio.sleep(0.02)
                print(f"\n[resilience] follow {fault}: heal -> new log lines "
                      f"{anyio.current_time() - healed:.3f}s")
                stop.touch()
        assert buffered == b""
        assert lines == [f"line {i}" for i in range(len(lines))], "every line once, in order"
        assert len(lines) > seen_at_drop + 300
        assert (await job.wait(30)).exit_code == 0
        assert t.link.reconnects >= 1


# --- transfers across faults -------------------------------------------------------------------

#: size of the transfers broken mid-way: big enough that the link breaks mid-transfer and
#: that what crossed before the break (half the file) exceeds the resend bound below, so
#: sending everything again fails the test. The resilience issue's own figure was 200 MiB:
#: ``JUPYTER_TETHER_FAULT_MIB=200`` runs that (the suite's default keeps it quick).
TRANSFER_MIB = int(os.environ.get("JUPYTER_TETHER_FAULT_MIB", "48"))
# Smaller than the defaults (2 MiB x 8): the bound on what may be sent again shrinks with them.
TRANSFER_CHUNK, TRANSFER_WINDOW = 1024 * 1024, 4
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("big") / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        for _ in range(TRANSFER_MIB // 4):
            block = os.urandom(4 * MiB)
            digest.update(block)
            handle.write(block)
    settle(path)  # uploads hash it while they send it; a fault makes them resume by key
    return path, digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


async def break_when(proxy: FaultProxy, t: AsyncTether, fault: Fault,
                     moved: Callable[[], int], threshold: int, at_break: list[int]) -> None:
    """Break the link once ``moved()`` passes ``threshold`` bytes (noting ``moved()`` then in
    ``at_break``), stay down 1 s, heal."""
    while moved() < threshold:
        await anyio.sleep(0.005)
    break_link(proxy, fault)
    at_break.append(moved())
    with anyio.fail_after(20):
        while t.link.connected:
            await anyio.sleep(0.02)
    await anyio.sleep(1.0)
    proxy.heal()



def _transfer_cases() -> list[Any]:
    cases: list[Any] = []
    for fault in FAULTS:
        cases.append(pytest.param(fault, "upload", id=f"{fault}-upload"))
        cases.append(pytest.param(fault, "download-comm", id=f"{fault}-download-comm"))
        cases.append(pytest.param(fault, "download-http", id=f"{fault}-download-http"))
    return cases


@pytest.mark.parametrize(("fault", "direction"), _transfer_cases())
@pytest.mark.anyio
async def test_transfer_completes_with_equal_hash_across_fault(
        proxied_server: tuple[FaultProxy, str, str], server_root: Path,
        big_file: tuple[Path, str], tmp_path: Path, fault: Fault, direction: str) -> None:
    proxy, url, token = proxied_server
    local, digest = big_file
    size = local.stat().st_size
    remote = f"transfers/{direction}-{fault}-{time.monotonic_ns()}.bin"
    async with AsyncTether(url, token, options=fast_options()) as t:
        if direction != "upload":
            (server_root / remote).parent.mkdir(parents=True, exist_ok=True)
            os.link(local, server_root / remote)  # the remote file, without a copy

        def moved() -> int:
            counters = proxy.counters
            return counters.bytes_up if direction == "upload" else counters.bytes_down

        before = moved()
        at_break: list[int] = []
        started = anyio.current_time()
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(break_when, proxy, t, fault, moved, before + size // 2, at_break)
                if direction == "upload":
                    result = await t.files.upload(local, remote, chunk_size=TRANSFER_CHUNK,
                                                  window=TRANSFER_WINDOW)
                    landed = server_root / remote
                else:
                    landed = tmp_path / "downloaded.bin"
                    via = "comm" if direction == "download-comm" else "auto"
                    result = await t.files.download(remote, landed, via=via,
                                                    chunk_size=TRANSFER_CHUNK,
                                                    window=TRANSFER_WINDOW)
        elapsed = anyio.current_time() - started
        resent = moved() - before - size
        print(f"\n[resilience] {direction} {size // MiB} MiB across {fault}: {elapsed:.1f}s, "
              f"{max(resent, 0) / MiB:.1f} MiB beyond the file crossed the wire again")
        assert result.sha256 == digest
        assert file_sha256(landed) == digest
        assert t.link.reconnects >= 1 and at_break[0] - before < size, \
            "the fault really broke the link mid-transfer"
        # What had arrived is not sent again: at most the chunks in flight at the drop.
        bound = 2 * TRANSFER_WINDOW * TRANSFER_CHUNK + 4 * MiB
        assert bound < size // 2, "a transfer started over would pass unnoticed"
        assert resent < bound


# --- restarts: controller, supervisor kernel -------------------------------------------------


def test_new_controller_reattaches_to_the_same_live_supervisor_and_jobs(
        proxied_server: tuple[FaultProxy, str, str], tmp_path: Path) -> None:
    _, url, token = proxied_server
    with Tether(url, token, options=fast_options()) as first:
        facts = first.info()
        kernel_id = first.status()["kernel_id"]
        job = first.portal.call(lambda: first.aio.jobs.start("sleep 30", name="survives-restart"))
    # The first controller is gone (a laptop restart); a new one with the same local state:
    with Tether(url, token, options=fast_options()) as second:
        status = second.status()
        assert status["install"] == "reused"
        assert status["kernel_id"] == kernel_id
        assert second.info()["pid"] == facts["pid"]
        assert second.info()["instance_id"] == facts["instance_id"]
        again = second.portal.call(second.aio.jobs.get(job.job_id).status)
        assert again.state == "running"
        second.portal.call(lambda: second.aio.jobs.get(job.job_id).kill(9, 0.5))
    sessions = [s for s in connect_rest_sessions(url, token) if s["name"] == SUPERVISOR_SESSION]
    assert len(sessions) == 1, "nothing duplicated on the remote"


def connect_rest_sessions(url: str, token: str) -> list[dict[str, Any]]:

    response = loopback_http.get(url.rstrip("/") + "/api/sessions",
                          headers={"Authorization": f"token {token}"}, timeout=10)
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()
    return result


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalJupyterServer]:
    """A server of our own: killing its supervisor kernel must not disturb other tests."""
    root = tmp_path_factory.mktemp("resilience-root")
    with LocalJupyterServer(root, log_path=root.parent / "resilience-server.log") as server:
        yield server


@pytest.mark.parametrize("how", ["killed", "restarted"])
def test_supervisor_kernel_lost_gets_new_supervisor_and_jobs_readopted(
        own_server: LocalJupyterServer, how: str) -> None:
    with fault_proxy(own_server.url) as proxy, \
            Tether(proxy.url_for(own_server.url), own_server.token,
                   options=fast_options()) as t:
        old = t.info()
        kernel_id = t.status()["kernel_id"]
        job = t.portal.call(lambda: t.aio.jobs.start("sleep 2; echo done"))
        rest = t.aio.rest
        if how == "killed":
            t.portal.call(lambda: rest.shutdown_kernel(kernel_id))
        else:
            t.portal.call(lambda: rest.request("POST", f"api/kernels/{kernel_id}/restart"))

        def new_supervisor() -> bool:
            try:
                return bool(t.status()["connected"] and t.info()["pid"] != old["pid"])
            except Exception:
                return False

        wait_until(new_supervisor, 60, "a new supervisor")
        status = t.status()
        assert status["install"] == "installed"
        assert (status["kernel_id"] == kernel_id) == (how == "restarted")
        assert t.ping()["ok"]
        info = t.portal.call(lambda: t.aio.jobs.get(job.job_id).wait(30))
        assert (info.state, info.exit_code) == ("exited", 0), "the job was re-adopted"
        sessions = [s for s in connect_rest_sessions(own_server.url, own_server.token)
                    if s["name"] == SUPERVISOR_SESSION]
        assert len(sessions) == 1


def test_two_controllers_losing_the_supervisor_kernel_converge_on_one_new_supervisor(
        own_server: LocalJupyterServer) -> None:
    url, token = own_server.url, own_server.token
    with Tether(url, token, options=fast_options()) as a, \
            Tether(url, token, options=fast_options()) as b:
        old = a.info()["pid"]
        assert b.info()["pid"] == old
        kernel_id = a.status()["kernel_id"]
        a.portal.call(lambda: a.aio.rest.shutdown_kernel(kernel_id))

        def both_back() -> bool:
            try:
                return all(t.status()["connected"] and t.info()["pid"] != old for t in (a, b))
            except Exception:
                return False

        wait_until(both_back, 60, "both controllers on a new supervisor")
        sessions = [s for s in connect_rest_sessions(url, token)
                    if s["name"] == SUPERVISOR_SESSION]
        assert len(sessions) == 1, "one supervisor session, not one per controller"
        assert a.info()["pid"] == b.info()["pid"]


# --- credentials and odd answers ------------------------------------------------------------


def test_rotated_credentials_give_auth_error_that_says_pass_the_fresh_url(
        proxied_server: tuple[FaultProxy, str, str]) -> None:
    proxy, url, token = proxied_server
    with Tether(url, token, options=fast_options()) as t:
        pid = t.info()["pid"]
        proxy.deny(403)  # what Kaggle's proxy answers once the URL has rotated
        wait_until(lambda: "fresh URL" in t.status()["last_error"], 15,
                   "the reconnect to fail with 403")
        started = time.monotonic()
        with pytest.raises(AuthError, match="fresh URL") as caught:
            t.ping(timeout=30)
        assert time.monotonic() - started < 5, "no point waiting: fail at once"
        assert "403" in str(caught.value) and token not in str(caught.value)
        assert token not in str(t.status())
        proxy.heal()
        # Given the (here: same) fresh URL, a controller re-attaches to the same supervisor.
        with connect(url, token, options=fast_options()) as fresh:
            assert fresh.status()["install"] == "reused"
            assert fresh.info()["pid"] == pid
        # And the old handle recovers by itself once the server accepts it again.
        wait_until(lambda: t.status()["connected"], 15, "the old handle to reconnect")
        assert t.ping()["ok"]


def test_proxy_error_pages_while_down_do_not_stop_the_reconnect_loop(
        proxied_tether: tuple[FaultProxy, Tether]) -> None:
    proxy, t = proxied_tether
    proxy.deny(502)  # a gateway in front of the server answers while the server is away
    wait_until(lambda: "502" in t.status()["last_error"], 15, "a 502 to be seen")
    time.sleep(1.0)
    elapsed = heal_and_time_first_call(proxy, t, "502 from a gateway")
    assert elapsed < HEAL_BOUND_S
