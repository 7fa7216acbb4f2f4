"""The blocking API from inside a real ipykernel: the notebook case, where a loop already runs.

The kernel is a real one (started by jupyter_client), the code is sent as cells, and the
outputs are the messages a notebook front end would receive.
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

from jupyter_tether.controller.embedded import LocalJupyterServer


class Cell:
    """What one executed cell produced, as a front end sees it."""

    def __init__(self) -> None:
        self.stdout = ""
        self.stderr = ""
        self.messages: list[dict[str, Any]] = []
        self.error: dict[str, Any] | None = None

    def hook(self, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                self.stdout += content["text"]
            else:
                self.stderr += content["text"]
        elif kind == "error":
            self.error = content

    def data(self, *kinds: str) -> list[dict[str, Any]]:
        return [m["content"]["data"] for m in self.messages if m["msg_type"] in kinds]


@pytest.fixture(scope="module")
def kernel() -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    env = dict(os.environ)
    env.pop("REMOTE_JUPYTER_URL", None)
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60, env=env)
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run_cell(kc: BlockingKernelClient, code: str, timeout: float = 60) -> Cell:
    cell = Cell()
    reply = kc.execute_interactive(textwrap.dedent(code), output_hook=cell.hook, timeout=timeout)
    assert reply["content"]["status"] in ("ok", "error")
    return cell


@pytest.fixture(scope="module")
def connected(kernel: tuple[KernelManager, BlockingKernelClient],
              jupyter_server: LocalJupyterServer) -> Iterator[BlockingKernelClient]:
    _, kc = kernel
    cell = run_cell(kc, f"""
        import asyncio, jupyter_tether
        print("loop running:", asyncio.get_event_loop().is_running())
        t = jupyter_tether.connect({jupyter_server.url!r}, {jupyter_server.token!r})
        print("ping ok:", t.ping()["ok"])
    """)
    assert cell.error is None, cell.error
    # A running loop on the kernel's thread: exactly what asyncio.run() would refuse.
    assert "loop running: True" in cell.stdout
    assert "ping ok: True" in cell.stdout
    yield kc
    run_cell(kc, "t.close()")


def test_a_job_is_followed_to_completion_inside_a_kernel(connected: BlockingKernelClient) -> None:
    cell = run_cell(connected, """
        job = t.jobs.start("for i in 1 2 3; do echo nb line $i; sleep 0.1; done; exit 5")
        info = job.watch()
        print("FINAL", info.state, info.exit_code)
        chunks = b"".join(t.jobs.get(job.job_id).follow())
        print("REPLAY", chunks.decode().split())
    """)
    assert cell.error is None, cell.error
    assert cell.stdout.startswith("nb line 1\nnb line 2\nnb line 3\n")
    assert "FINAL exited 5" in cell.stdout
    assert "REPLAY ['nb', 'line', '1', 'nb', 'line', '2', 'nb', 'line', '3']" in cell.stdout


def test_a_job_handle_displays_its_state_and_log_tail(connected: BlockingKernelClient) -> None:
    cell = run_cell(connected, """
        shown = t.jobs.start("echo '<b>not bold</b>'; exit 2")
        shown.wait(30)
        shown
    """)
    assert cell.error is None, cell.error
    [data] = cell.data("execute_result")
    assert "exited" in data["text/plain"] and "exit 2" in data["text/plain"]
    page = data["text/html"]
    assert "exited" in page and "exit 2" in page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<b>not bold</b>" not in page


def test_interrupting_a_follow_leaves_the_tether_usable(
        kernel: tuple[KernelManager, BlockingKernelClient],
        connected: BlockingKernelClient) -> None:
    km, kc = kernel
    # stop_on_error=False: otherwise the kernel may abort the next cell, sent right after
    # this one's KeyboardInterrupt reply, while it still drops what queued behind the error.
    kc.execute(textwrap.dedent("""
        slow = t.jobs.start("echo waiting; sleep 60")
        slow.watch()
    """), stop_on_error=False)
    deadline = time.monotonic() + 30
    seen = ""
    while "waiting" not in seen and time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=30)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    cell = run_cell(kc, """
        import time
        print("still running:", slow.status().state)
        print("killed:", slow.kill(signal=9).state)
        print("ping:", t.ping()["ok"])
    """)
    assert cell.error is None, cell.error
    assert "still running: running" in cell.stdout
    assert "killed: killed" in cell.stdout and "ping: True" in cell.stdout


def test_a_transfer_shows_a_progress_bar_in_the_notebook(connected: BlockingKernelClient,
                                                         tmp_path: Path,
                                                         server_root: Path) -> None:
    blob = tmp_path / "nb-blob.bin"
    blob.write_bytes(os.urandom(6 * 1024 * 1024))
    cell = run_cell(connected, f"""
        result = t.files.upload({str(blob)!r}, "nb/blob.bin")
        result
    """)
    assert cell.error is None, cell.error
    bars = [d["text/html"] for d in cell.data("display_data", "update_display_data")
            if "<progress" in d.get("text/html", "")]
    assert bars, cell.messages
    assert "done" in bars[-1] and "6.0 MiB" in bars[-1]
    [shown] = cell.data("execute_result")
    assert "nb/blob.bin" in shown["text/plain"]
    assert (server_root / "nb" / "blob.bin").read_bytes() == blob.read_bytes()
