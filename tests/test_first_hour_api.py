"""The first hour with the Python API (issue 13, items 1-3 and 8): which server ``connect()``
picks, the help the blocking API gives, what ``exec`` returns, and a URL with a wrong path.

Against the real shared Jupyter server, and inside a real ipykernel where the API is used
from a notebook.
"""

from __future__ import annotations

import inspect
import os
import pydoc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import start_new_kernel

import jupyter_tether
from jupyter_tether import (
    AsyncTether,
    ConfigError,
    ExecError,
    ExecResult,
    Tether,
    TetherTimeout,
    connect,
)
from jupyter_tether.config import select_target
from jupyter_tether.controller import embedded
from jupyter_tether.controller.blocking_services import Files, Job, Jobs
from jupyter_tether.controller.embedded import LocalJupyterServer, free_port
from jupyter_tether.controller.files import AsyncFiles
from jupyter_tether.controller.jobs import AsyncJob, AsyncJobs
from jupyter_tether.controller.notebooks.blocking import Notebooks
from jupyter_tether.controller.notebooks.service import AsyncNotebooks
from jupyter_tether.controller.target import parse_target, split_url
from jupyter_tether.controller.twins import share_doc
from jupyter_tether.mcp_server.pool import TetherPool

from .conftest import fast_options
from .test_cli import cli_env, one_error_line, tether_cli
from .test_notebook import run_cell


@pytest.fixture
def no_env_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REMOTE_JUPYTER_URL", raising=False)
    monkeypatch.delenv("REMOTE_JUPYTER_TOKEN", raising=False)


@pytest.fixture
def lab_config(jupyter_server: LocalJupyterServer, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch, no_env_server: None) -> Path:
    """targets.toml whose default, ``lab``, is the shared server (token from an env var)."""
    config = tmp_path / "targets.toml"
    config.write_text(f'default = "lab"\n\n[lab]\nurl = "{jupyter_server.url}"\n'
                      'token_env = "LAB_TOKEN"\n\n[other]\nurl = "http://other:1/"\n')
    monkeypatch.setenv("JUPYTER_TETHER_CONFIG", str(config))
    monkeypatch.setenv("LAB_TOKEN", jupyter_server.token)
    return config


# --- 1. one rule picks the server ------------------------------------------------------------


def test_one_rule_orders_url_name_env_default_embedded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_env_server: None) -> None:
    config = tmp_path / "t.toml"
    config.write_text('default = "a"\n[a]\nurl = "http://a:1/"\ntoken = "ta"\n'
                      '[b]\nurl = "http://b:2/"\n')

    def picked(*args: Any, **kwargs: Any) -> tuple[str, str | None, str]:
        chosen = select_target(*args, path=config, **kwargs)
        target = chosen.target
        return chosen.source, target.base_url if target else None, target.token if target else ""

    assert picked() == ("default", "http://a:1/", "ta")
    # A name where a URL goes is the target of that name, not http://b/.
    assert picked("b") == ("target", "http://b:2/", "")
    assert picked(name="b") == ("target", "http://b:2/", "")
    assert picked("b", "typed") == ("target", "http://b:2/", "typed")  # a token goes with it
    assert picked("http://b:9/") == ("url", "http://b:9/", "")
    monkeypatch.setenv("REMOTE_JUPYTER_URL", "http://env:3/")
    assert picked() == ("env", "http://env:3/", "")  # the env URL beats the default
    assert picked("b")[:2] == ("target", "http://b:2/")  # an explicit name beats the env
    monkeypatch.delenv("REMOTE_JUPYTER_URL")
    assert select_target(path=tmp_path / "none.toml").target is None  # embedded
    with pytest.raises(ConfigError, match=r"'nope' is neither a URL nor a target.*known "
                                          r"targets: a, b"):
        select_target("nope", path=config)
    with pytest.raises(ConfigError, match="not both"):
        select_target("http://x/", name="a", path=config)


def test_connect_reads_targets_toml_like_the_cli(lab_config: Path) -> None:
    # The default of targets.toml, not a silent embedded server.
    with connect(options=fast_options()) as t:
        assert (t.status()["name"], t.status()["embedded"]) == ("lab", False)
    # By name, given where a URL goes or as target=: the target, with its token.
    for tether in (connect("lab", options=fast_options()),
                   connect(target="lab", options=fast_options())):
        with tether as t:
            assert t.status()["name"] == "lab" and t.ping()["ok"]


def test_a_name_that_is_no_target_is_a_clear_error(lab_config: Path) -> None:
    with pytest.raises(ConfigError, match=r"'lba' is neither a URL nor a target named in .*"
                                          r"known targets: lab, other"):
        connect("lba")
    with pytest.raises(ConfigError, match=r"no target named 'lba'.*known: lab, other"):
        connect(target="lba")
    with pytest.raises(ConfigError, match="not both"):
        connect("http://127.0.0.1:9/", target="lab")


def test_the_mcp_server_defaults_to_the_same_server(lab_config: Path) -> None:
    # Started without a URL (as mcp_server.serve() may be), it takes the config's default.
    rows = {row["name"]: row for row in TetherPool().configured()["targets"]}
    assert rows["lab"]["mcp_default"] and not rows["other"]["mcp_default"]


def test_the_env_token_still_goes_only_to_its_own_server(
        lab_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_JUPYTER_URL", "http://box:8888/")
    monkeypatch.setenv("REMOTE_JUPYTER_TOKEN", "env-secret")
    assert select_target().target == parse_target("http://box:8888/", "env-secret")
    other = select_target("http://elsewhere:8888/")
    assert other.target is not None and other.target.token == ""
    named = select_target("other")  # a named target has its own (here: no) token
    assert named.target is not None and named.target.token == ""


# --- 2. the blocking API has the async API's signatures and docstrings -------------------------

#: blocking class -> (async class, async methods it deliberately has no twin of)
TWINS: dict[type, tuple[type, set[str]]] = {
    Tether: (AsyncTether, {"aclose"}),  # close() and `with` end a Tether
    Jobs: (AsyncJobs, set()),
    Job: (AsyncJob, set()),
    Files: (AsyncFiles, set()),
    Notebooks: (AsyncNotebooks, set()),
}
#: where the blocking twin returns its own handle, or takes a wider ``progress``
RETURNS = {(Tether, "forward"): "BlockingPortForward", (Jobs, "start"): "Job",
           (Jobs, "get"): "Job", (Job, "follow"): "LogFollower", (Notebooks, "start"): "Job"}
PROGRESS_ARG = {(Files, name) for name in ("upload", "download", "sync", "download_dir")}


def public_methods(cls: type) -> dict[str, Callable[..., Any]]:
    return {name: value for name, value in vars(cls).items()
            if not name.startswith("_") and inspect.isfunction(value)}


def twin_pairs() -> Iterator[tuple[type, str, Callable[..., Any], Callable[..., Any]]]:
    for blocking, (aio, skipped) in TWINS.items():
        for name, method in public_methods(aio).items():
            if name not in skipped:
                yield blocking, name, method, getattr(blocking, name, None)  # type: ignore[misc]


def test_every_async_method_has_a_blocking_twin_with_its_signature_and_doc() -> None:
    checked = set()
    for blocking, name, aio, twin in twin_pairs():
        where = f"{blocking.__name__}.{name}"
        assert twin is not None, f"{where}: no blocking twin of {aio.__qualname__}"
        assert aio.__doc__ and aio.__doc__.strip(), f"{aio.__qualname__} has no docstring"
        assert twin.__doc__ == aio.__doc__, where
        mine, theirs = inspect.signature(twin), inspect.signature(aio)
        wanted = [p.replace(annotation="ProgressArg")
                  if p.name == "progress" and (blocking, name) in PROGRESS_ARG else p
                  for p in theirs.parameters.values()]
        assert list(mine.parameters.values()) == wanted, where
        assert mine.return_annotation == RETURNS.get((blocking, name),
                                                     theirs.return_annotation), where
        assert twin.__annotations__.get("return") == mine.return_annotation, where
        checked.add(where)
    # The walk saw the methods the issue named (it cannot pass by finding nothing).
    assert {"Tether.exec", "Files.upload", "Files.download", "Files.sync", "Job.wait",
            "Job.kill", "Jobs.start", "Notebooks.run"} <= checked
    assert len(checked) > 40


def test_the_blocking_classes_have_no_undocumented_extras() -> None:
    # A blocking-only method (a display helper, say) still needs help text.
    for blocking in TWINS:
        for name, method in public_methods(blocking).items():
            assert method.__doc__, f"{blocking.__name__}.{name} has no docstring"


def test_connect_and_the_constructor_show_the_real_arguments() -> None:
    init = inspect.signature(AsyncTether.__init__)
    wanted = list(init.parameters.values())[1:]
    assert list(inspect.signature(connect).parameters.values()) == wanted
    assert list(inspect.signature(Tether).parameters.values()) == wanted
    assert inspect.signature(connect).return_annotation == "Tether"
    help_text = pydoc.render_doc(jupyter_tether.connect, renderer=pydoc.plaintext)
    for words in ("target", "embedded_root", "targets.toml", "REMOTE_JUPYTER_URL",
                  "first match wins", "notebook"):
        assert words in help_text, words
    assert inspect.cleandoc(AsyncTether.__init__.__doc__ or "") in (connect.__doc__ or "")


def test_a_hand_written_twin_that_drifts_fails_at_import() -> None:
    async def source(self: Any, path: str, *, limit: int = 5) -> int:
        """Doc."""
        return 0

    def drifted(self: Any, path: str, *, limit: int = 6) -> int:
        return 0

    with pytest.raises(TypeError, match="does not match"):
        share_doc(source)(drifted)


# --- 3. ExecResult: value, raise_for_error, truth, repr ------------------------------------


def test_exec_result_of_a_good_cell(tether: Tether) -> None:
    result = tether.exec("from IPython.display import display\ndisplay('shown')\n"
                         "print('hi')\n6 * 7")
    assert result and result.value == "42"
    assert result.raise_for_error() is result  # returns itself, to chain
    text = repr(result)
    assert text.startswith("<ExecResult ok [") and "value='42'" in text
    assert "stdout='hi\\n'" in text and "+1 display" in text
    assert tether.exec("x_first_hour = 1").value is None  # a statement has no value


def test_exec_result_of_a_failing_cell(tether: Tether) -> None:
    result = tether.exec("def f():\n    raise ValueError('bad value')\nf()")
    assert not result and result.value is None
    assert "<ExecResult error" in repr(result) and "ValueError: bad value" in repr(result)
    with pytest.raises(ExecError) as raised:
        result.raise_for_error()
    exc = raised.value
    assert (exc.ename, exc.evalue) == ("ValueError", "bad value")
    assert any("f()" in line for line in exc.traceback)
    assert "remote traceback" in "".join(getattr(exc, "__notes__", []))


def test_exec_result_of_a_timeout_and_the_default_timeout(tether: Tether) -> None:
    for method in (Tether.exec, AsyncTether.exec):
        assert inspect.signature(method).parameters["timeout"].default is None
    result = tether.exec("import time\nprint('started', flush=True)\ntime.sleep(30)", timeout=1)
    assert result.status == "timeout" and not result
    assert repr(result).startswith("<ExecResult timeout")
    with pytest.raises(TetherTimeout, match=r"interrupted at its timeout.*started"):
        result.raise_for_error()


def test_exec_result_repr_is_short_for_big_outputs() -> None:
    result = ExecResult(status="ok", stdout="x" * 10_000 + "END", results=[
        {"type": "execute_result", "data": {"text/plain": "y" * 10_000}}])
    text = repr(result)
    assert len(text) < 300 and "END" in text and "'yyy" in text


# --- the API inside a real kernel --------------------------------------------------------------


@pytest.fixture
def configured_kernel(jupyter_server: LocalJupyterServer, lab_config: Path
                      ) -> Iterator[BlockingKernelClient]:
    """A real ipykernel whose environment knows the ``lab`` target but no server URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTE_JUPYTER")}
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60, env=env)
    try:
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_the_api_inside_a_kernel(configured_kernel: BlockingKernelClient) -> None:
    cell = run_cell(configured_kernel, """
        import jupyter_tether
        with jupyter_tether.connect() as t:
            status = t.status()
            print("server:", status["name"], status["embedded"])
            good = t.exec("6 * 7")
            print("good:", bool(good), good.value)
            bad = t.exec("1 / 0")
            print("bad:", bool(bad), repr(bad))
            try:
                bad.raise_for_error()
            except jupyter_tether.ExecError as exc:
                print("raised:", exc.ename, bool(exc.traceback))
        with jupyter_tether.connect(target="lab") as t:
            print("by name:", t.status()["name"])
    """, timeout=120)
    assert cell.error is None, cell.error
    assert "server: lab False" in cell.stdout
    assert "good: True 42" in cell.stdout
    assert "bad: False <ExecResult error" in cell.stdout
    assert "ZeroDivisionError: division by zero" in cell.stdout
    assert "raised: ZeroDivisionError True" in cell.stdout
    assert "by name: lab" in cell.stdout


# --- 8. a URL with a wrong path, and paths pasted from a browser ------------------------------


def test_pasted_page_and_api_paths_are_stripped() -> None:
    for pasted in ("http://h:8888/api", "http://h:8888/api/", "http://h:8888/api/kernels/abc",
                   "http://h:8888/lab", "http://h:8888/lab/tree/a/b.ipynb",
                   "http://h:8888/tree/sub/dir", "http://h:8888/notebooks/x.ipynb"):
        assert split_url(pasted)[0] == "http://h:8888/", pasted
    assert split_url("http://h/user/alice/api/status")[0] == "http://h/user/alice/"
    assert split_url("http://h/user/lab/tree/x")[0] == "http://h/user/lab/"  # a user "lab"
    assert split_url("http://h/api/jupyter/")[0] == "http://h/api/jupyter/"  # a base path


def test_a_wrong_path_says_there_is_no_jupyter_server_there(
        jupyter_server: LocalJupyterServer) -> None:
    typo = jupyter_server.url + "typo/"
    with pytest.raises(ConfigError) as raised:
        connect(typo, jupyter_server.token)
    message = str(raised.value)
    assert message.startswith(f"no Jupyter server at {typo} (404): check the path"), message
    assert jupyter_server.token not in message
    # The same line through the CLI, as a configuration error (exit 2).
    proc = tether_cli(None, "--url", typo, "--token", jupyter_server.token, "status",
                      env=cli_env())
    assert proc.returncode == 2
    assert f"no Jupyter server at {typo} (404)" in one_error_line(proc)


def test_a_pasted_api_url_reaches_the_server(jupyter_server: LocalJupyterServer) -> None:
    with connect(jupyter_server.url + "api/kernels", jupyter_server.token,
                 options=fast_options()) as t:
        assert t.ping()["ok"] and t.status()["target"] == jupyter_server.url


def test_free_ports_are_picked_below_the_ephemeral_range() -> None:
    # Outgoing connections take their source ports from the ephemeral range: a server port
    # picked there can be taken before the server binds it.
    low = embedded._ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(20000 <= port < low for port in ports), (low, ports)
