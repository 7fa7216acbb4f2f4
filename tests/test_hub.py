"""jupyter-tether against a real JupyterHub: a user's server under /user/<name>/, through
configurable-http-proxy, with a hub API token (REST, websockets and a reconnect).

The hub runs on loopback random ports with DummyAuthenticator and SimpleLocalProcessSpawner,
its database and runtime files in a temporary directory. configurable-http-proxy comes from
npm (``.ci/run`` installs it under ``.ci/node``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_tether import AuthError, Tether, connect
from jupyter_tether.controller.kernels import SUPERVISOR_SESSION
from jupyter_tether.controller.target import parse_target

from .conftest import fast_options
from .remote_checks import (
    check_connect,
    check_exec,
    check_files,
    check_job_follow,
    check_reconnect,
)
from .remote_servers import JupyterHub, find_configurable_http_proxy

pytest.importorskip("jupyterhub", reason="jupyterhub is a test dependency")

USER = "alice"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterHub]:
    chp = find_configurable_http_proxy()
    if chp is None:
        pytest.skip("configurable-http-proxy not found: `npm install --prefix .ci/node "
                    "configurable-http-proxy` (what .ci/run does), or set CONFIGPROXY_COMMAND")
    with JupyterHub(tmp_path_factory.mktemp("jupyterhub"), chp) as running:
        yield running


@pytest.fixture(scope="module")
def user_server(hub: JupyterHub) -> tuple[str, str]:
    """(URL of alice's server through the proxy, an API token of alice's)."""
    return hub.start_server(USER)


@pytest.fixture(scope="module")
def hub_tether(user_server: tuple[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tether]:
    url, token = user_server
    with Tether(url, token, options=fast_options(),
                output_dir=tmp_path_factory.mktemp("hub-outputs")) as t:
        yield t


def test_connect_through_the_proxy_to_the_users_server(hub_tether: Tether, hub: JupyterHub,
                                                       user_server: tuple[str, str]) -> None:
    url, _ = user_server
    assert url.startswith(hub.url) and "/user/alice/" in url  # the proxy, not the server
    check_connect(hub_tether, hub.home(USER))
    sessions = [s for s in hub_tether.list_sessions() if s["name"] == SUPERVISOR_SESSION]
    assert [s["kernel"]["id"] for s in sessions] == [hub_tether.status()["kernel_id"]]


def test_exec(hub_tether: Tether, hub: JupyterHub) -> None:
    check_exec(hub_tether, hub.home(USER))


def test_job_follow_is_exact(hub_tether: Tether) -> None:
    check_job_follow(hub_tether)


def test_files(hub_tether: Tether, hub: JupyterHub, tmp_path: Path) -> None:
    check_files(hub_tether, tmp_path, "hub-files")
    assert (hub.home(USER) / "hub-files" / "tree" / "a.txt").read_bytes() == b"alpha v2\n"


def test_reconnect_through_the_proxy(hub_tether: Tether) -> None:
    check_reconnect(hub_tether)


def test_second_controller_reuses_the_supervisor(hub_tether: Tether, user_server: tuple[str, str],
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url, token = user_server
    monkeypatch.setenv("JUPYTER_TETHER_STATE_DIR", str(tmp_path / "empty-state"))
    # The hub URL as copied from a browser (…/user/alice/lab) works as well.
    with connect(url + "lab", token, options=fast_options()) as other:
        assert other.status()["install"] == "reused"
        assert other.info()["pid"] == hub_tether.info()["pid"]


def test_state_keys_differ_per_user_server(hub: JupyterHub) -> None:
    assert parse_target(f"{hub.url}user/alice/").key != parse_target(f"{hub.url}user/bob/").key


def test_wrong_token_is_refused(user_server: tuple[str, str]) -> None:
    url, _ = user_server
    with pytest.raises(AuthError):
        connect(url, "not-a-hub-token", options=fast_options())
