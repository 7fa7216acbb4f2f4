"""Shared fixtures: one real Jupyter Server for the whole run, and tethers attached to it."""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal

import jupyter_tether
from jupyter_tether import LinkOptions, Tether
from jupyter_tether.controller.embedded import LocalJupyterServer
from jupyter_tether.controller.jobs import AsyncJob

#: the python that runs the session's jupyter_server (default: this one)
SERVER_PYTHON_ENV = "JUPYTER_TETHER_TEST_SERVER_PYTHON"

# A run started in the background by a script (``pytest ... &``, no job control) ignores
# SIGINT, and the CLIs the tests start inherit that: the tests that press Ctrl-C would press
# it on processes that cannot hear it. The children get the default, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    with contextlib.suppress(ValueError):  # not the main thread: leave it
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _isolated_local_state(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Controller state (session ids, kernel ids) must not leak between test runs or users.
    os.environ["JUPYTER_TETHER_STATE_DIR"] = str(tmp_path_factory.mktemp("local-state"))
    # `python3` in a job's command is this environment's, as on a Jupyter host, where it is
    # the kernel's. Through a version manager's shims it cost ~0.2 CPU-s of shell scripts per
    # call (pyenv: ~6 CPU-s of a run).
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                          os.environ.get("PATH", "")])


@pytest.fixture(scope="session")
def jupyter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalJupyterServer]:
    """A real jupyter_server on a random loopback port with a token and a temporary root."""
    root = tmp_path_factory.mktemp("server-root")
    # Another environment's python (e.g. .venv-kaggle/bin/python) runs the whole suite
    # against the server and ipykernel versions installed there.
    python = os.environ.get(SERVER_PYTHON_ENV) or None
    with LocalJupyterServer(root, log_path=root.parent / "jupyter-server.log",
                            python=python) as server:
        yield server


@pytest.fixture(scope="session")
def server_root(jupyter_server: LocalJupyterServer) -> Path:
    return jupyter_server.root_dir


def fast_options(**overrides: object) -> LinkOptions:
    """Link options for loopback tests: quick keepalive and reconnect."""
    values: dict[str, object] = {"ping_interval": 1.0, "ping_timeout": 2.0,
                                 "reconnect_wait": 30.0, "backoff_max": 0.5}
    values.update(overrides)
    return LinkOptions(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tether(jupyter_server: LocalJupyterServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tether]:
    """A blocking Tether attached to the shared server (shared by tests that do not break it)."""
    out = tmp_path_factory.mktemp("outputs")
    with Tether(jupyter_server.url, jupyter_server.token, options=fast_options(),
                output_dir=out) as t:
        yield t


def follow_all(portal: BlockingPortal, job: AsyncJob, offset: int = 0) -> bytes:
    """The whole log of ``job`` from ``offset``, through ``follow``, on ``portal``'s loop."""

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in job.follow(offset)])

    return portal.call(collect)


@contextlib.contextmanager
def iopub_seen(t: Tether) -> Iterator[list[str]]:
    """The msg_types of the iopub messages the tether's kernel socket routes meanwhile."""
    sock = t.aio.link._sock
    assert sock is not None
    seen: list[str] = []
    original = sock._route

    def spy(msg: Any) -> None:
        if msg.channel == "iopub":
            seen.append(msg.msg_type)
        original(msg)

    sock._route = spy  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        sock._route = original  # type: ignore[method-assign]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- layers ---------------------------------------------------------------------------------
# The fast layer: pure cores and the in-process supervisor, no Jupyter server
# (`pytest -m fast`, seconds). Everything else is integration (`pytest -m integration`).
FAST_MODULES = frozenset({
    "test_concurrency", "test_docs", "test_errors", "test_files_service", "test_files_supervisor",
    "test_fuzz_supervisor", "test_jobs_service", "test_jobs_supervisor", "test_layers",
    "test_kernel_wire", "test_payload_portability", "test_payload_units", "test_remote_limits",
    "test_resources",
    "test_rpc", "test_submit", "test_sync_plan",
})


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # `-m fast` does not even import the integration modules (their imports, the MCP client
    # and server among them, were a sixth of the fast layer's time).
    if (config.getoption("markexpr") == "fast" and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_")
            and collection_path.stem not in FAST_MODULES):
        return True
    return None


# The modules by the wall time they take under README's ``-n 5`` on 2 cores, longest first
# (mostly waiting on servers, faults and timeouts; measured per test, summed): xdist hands
# out modules in this order, so the short ones come last and fill the gaps instead of one
# long module ending the run alone.
LONGEST_FIRST = ("test_resilience", "test_proxy", "test_mcp", "test_first_hour_cli",
                 "test_forward", "test_cli", "test_notebooks", "test_connect", "test_gateway",
                 "test_multi_target", "test_trust_credentials", "test_trust_files", "test_files",
                 "test_fuzz_supervisor", "test_local_roots", "test_hostile_server",
                 "test_kernel_exec", "test_hub", "test_files_service", "test_jobs_supervisor",
                 "test_jobs_service", "test_resources_faces", "test_first_hour_api",
                 "test_resources", "test_layers")


def pytest_configure(config: pytest.Config) -> None:
    # xdist would otherwise order modules by their number of tests, not by LONGEST_FIRST.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    if not hasattr(config, "workerinput"):
        # On a fresh clone, before any worker starts: the package compiled once here, not by
        # each worker at once, nor by every CLI and MCP process that starts before a worker
        # has imported what it needs (those cannot write the cache; see tests/__init__.py).
        compileall.compile_dir(Path(jupyter_tether.__file__).parent, quiet=2)
        if getattr(config.option, "numprocesses", None):  # only workers to come gain from it
            _rewrite_test_modules_once(config)


def _rewrite_test_modules_once(config: pytest.Config) -> None:
    """Fill pytest's cache of assert-rewritten test modules, here, before the workers start.

    Every xdist worker collects every module; on a fresh clone all five found no cache and
    rewrote all of them at once: ~2 CPU-s each, and ~5 s of the suite's wall time before the
    first test. This uses pytest's private rewrite API (what its import hook does per module),
    so a pytest that changes it only loses the head start: the workers then rewrite as before.
    """
    try:
        from _pytest.assertion import rewrite

        state = config.stash.get(rewrite.assertstate_key, None)
        if state is None:  # --assert=plain: nothing is rewritten
            return
        for source in sorted(Path(__file__).parent.glob("test_*.py")):
            cache = rewrite.get_cache_dir(source)
            pyc = cache / (source.name[:-3] + rewrite.PYC_TAIL)
            if rewrite._read_pyc(source, pyc, state.trace) is None:
                source_hash, code = rewrite._rewrite_test(source, config)
                cache.mkdir(exist_ok=True)
                rewrite._write_pyc(state, code, source_hash, pyc)
    except Exception:  # a speed-up only: the workers rewrite on their own
        return


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: tests keep order
    for item in items:
        module = item.path.stem
        item.add_marker(pytest.mark.fast if module in FAST_MODULES else pytest.mark.integration)


def _kernelspec(share: Path, name: str, code: str, display_name: str) -> str:
    """Install under ``share`` (a ``JUPYTER_PATH`` entry) kernelspec ``name``: this python
    running ``code`` (with the connection file after ``-f``). Its name."""
    spec = share / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-c", code, "-f", "{connection_file}"],
        "display_name": display_name, "language": "python"}))
    return name


_LAUNCH = "from ipykernel.kernelapp import launch_new_instance\nlaunch_new_instance()\n"


def hangs_once_kernelspec(share: Path, nth: int = 1, name: str = "hangs-once") -> str:
    """A kernelspec ``name`` whose ``nth`` kernel hangs as it starts and never answers, as one
    does when another process takes one of its ports first (ipykernel prints "Address
    already in use" and its process stays up, so the server's restarter leaves it alone);
    the others start normally."""
    starts = str(share / f"{name}.started")  # one byte per kernel started
    code = (f"import os, time\nn = os.path.getsize({starts!r}) if os.path.exists({starts!r}) "
            f"else 0\nopen({starts!r}, 'a').write('x')\nif n == {nth - 1}:\n"
            f"    time.sleep(600)\n{_LAUNCH}")
    return _kernelspec(share, name, code, "hangs once")


def dies_once_kernelspec(share: Path) -> str:
    """A kernelspec whose first kernel dies each time it starts, as one does whose ports
    another process holds; the server's restarter gives up on it and drops it. The kernels
    after it start normally."""
    first = str(share / "dies-once.first")
    # Restarts reuse the connection file's path: the first kernel is the one that wrote it.
    code = ("import os, sys\nme = sys.argv[-1]\n"
            f"if not os.path.exists({first!r}):\n    open({first!r}, 'w').write(me)\n"
            f"if open({first!r}).read() == me:\n    sys.exit('Address already in use')\n"
            f"{_LAUNCH}")
    return _kernelspec(share, "dies-once", code, "dies once")


def dies_at_first_cell_kernelspec(share: Path) -> str:
    """A kernelspec whose first kernel answers as it starts but exits at the first cell it is
    sent, as one whose port another process took dies at once and comes back through the
    server's restarter: a client sees "restarting" under its cell. The restarted kernel,
    and the kernels after it, work."""
    died = str(share / "dies-at-first-cell.died")
    code = ("import os\nfrom ipykernel.ipkernel import IPythonKernel\n"
            "run = IPythonKernel.do_execute\n"
            "async def first_dies(self, *args, **kwargs):\n"
            f"    if not os.path.exists({died!r}):\n"
            f"        open({died!r}, 'w').close()\n"
            "        os._exit(1)\n"
            "    return await run(self, *args, **kwargs)\n"
            f"IPythonKernel.do_execute = first_dies\n{_LAUNCH}")
    return _kernelspec(share, "dies-at-first-cell", code, "dies at its first cell")


def gated(gate: Path, then: str) -> str:
    """A command that runs until `gate` exists (at most a minute), then `then`: a job that is
    surely still running when the test looks, however slow the machine."""
    return (f"for i in $(seq 600); do [ -e {gate} ] && break; sleep 0.1; done; {then}")
