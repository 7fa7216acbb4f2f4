"""``kernel_exec``: the supervisor drives a work kernel over its ZMQ ports and answers with
the whole cell in one reply; the controller's ``execute_relayed`` on top of it.

A real ipykernel started with jupyter_client (its connection file where the server would
write it), the supervisor in this process (``InProcess``): no Jupyter server.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from jupyter_client import KernelManager

from jupyter_tether.controller.relayed_exec import RelayUnavailable, execute_relayed
from jupyter_tether.errors import KernelError

from .inprocess import InProcess


class Kernel:
    def __init__(self, runtime: Path) -> None:
        self.kernel_id = str(uuid.uuid4())
        # ipc: a tcp kernel's ports are picked by binding port 0 and letting go, and a kernel
        # starting at once in another xdist worker can take one first ("Address already in
        # use": this kernel dies and the test sees no output). Unix sockets have no such race;
        # the relay's tcp path is the one every real-server exec takes. The sockets go in a
        # short folder: a unix socket's path has at most 107 bytes.
        self._sockets = tempfile.mkdtemp(prefix="jt-ipc-")
        self.manager = KernelManager(connection_file=str(runtime / f"kernel-{self.kernel_id}.json"),
                                     transport="ipc", ip=os.path.join(self._sockets, "k"))
        self.manager.start_kernel()

    def stop(self) -> None:
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=True)
        shutil.rmtree(self._sockets, ignore_errors=True)


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the supervisor looks for connection files (the server's runtime dir)."""
    folder = tmp_path / "runtime"
    folder.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(folder))
    return folder


@pytest.fixture
def kernel(runtime: Path) -> Iterator[Kernel]:
    started = Kernel(runtime)
    yield started
    started.stop()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[InProcess]:
    root = tmp_path / "root"
    root.mkdir()
    harness = InProcess(root)
    yield harness
    harness.close()


@pytest.fixture
def portal(h: InProcess) -> Iterator[BlockingPortal]:
    with start_blocking_portal("asyncio") as running, running.wrap_async_context_manager(h):
        yield running


def exec_events(h: InProcess, exec_id: str) -> list[dict[str, Any]]:
    return [e["body"] for e, _ in h.events
            if e["event"] == "exec_output" and e["body"]["exec_id"] == exec_id]


# --- the op -----------------------------------------------------------------------------------


def test_a_small_cell_is_one_reply_with_its_outputs_and_no_events(
        h: InProcess, kernel: Kernel) -> None:
    first = h.ok("kernel_exec", {"kernel_id": kernel.kernel_id, "code": "x = 6 * 7\nx",
                                 "exec_id": "a"})
    assert first["reply"]["status"] == "ok" and first["idle"] is True
    assert first["events"] == 0 and exec_events(h, "a") == []
    assert first["outputs"] == [["execute_result", {
        "data": {"text/plain": "42"}, "metadata": {},
        "execution_count": first["reply"]["execution_count"]}]]
    # The same kernel again (its state kept), printing: consecutive prints are one output.
    second = h.ok("kernel_exec", {"kernel_id": kernel.kernel_id, "exec_id": "b",
                                  "code": "print(x); print('y')\nimport sys; "
                                          "print('e', file=sys.stderr)"})
    streams = [(o[1]["name"], o[1]["text"]) for o in second["outputs"] if o[0] == "stream"]
    # ipykernel flushes stdout and stderr on their own timers: their order is not kept.
    assert [text for name, text in streams if name == "stdout"] == ["42\ny\n"], streams
    assert [text for name, text in streams if name == "stderr"] == ["e\n"], streams
    failed = h.ok("kernel_exec", {"kernel_id": kernel.kernel_id, "code": "1/0",
                                  "exec_id": "c"})
    assert failed["reply"]["status"] == "error"
    # (A first traceback can take past the streaming threshold: then it came as an event.)
    outputs = [o for b in [*exec_events(h, "c"), failed] for o in b["outputs"]]
    assert [o[1]["ename"] for o in outputs if o[0] == "error"] == ["ZeroDivisionError"]


def test_a_longer_cell_streams_its_outputs_as_numbered_events(
        h: InProcess, kernel: Kernel) -> None:
    code = "import time\nfor i in range(4):\n    print(i, flush=True)\n    time.sleep(0.3)"
    result = h.ok("kernel_exec", {"kernel_id": kernel.kernel_id, "code": code,
                                  "exec_id": "slow"})
    events = exec_events(h, "slow")
    assert result["events"] == len(events) >= 2
    assert [e["index"] for e in events] == list(range(len(events)))
    printed = "".join(o[1]["text"] for e in [*events, result] for o in e["outputs"]
                      if o[0] == "stream")
    assert printed == "0\n1\n2\n3\n"


def test_a_flood_is_bounded_in_the_reply_with_counts(h: InProcess, kernel: Kernel) -> None:
    code = ("import sys\nfrom IPython.display import display\n"
            "sys.stdout.write('z' * 3_000_000)\nfor i in range(500): display(i)\n'last'")
    result = h.ok("kernel_exec", {"kernel_id": kernel.kernel_id, "code": code,
                                  "max_output_chars": 1000, "exec_id": "flood"})
    batches = [*exec_events(h, "flood"), result]
    stdout = [o[1] for b in batches for o in b["outputs"] if o[0] == "stream"]
    kept = sum(len(s["text"]) for s in stdout)
    assert kept + sum(s["dropped"] for s in stdout) == 3_000_000
    assert kept < 3_000_000
    displays = sum(1 for b in batches for o in b["outputs"] if o[0] == "display_data")
    assert displays + sum(b["omitted"] for b in batches) == 500
    results = [o[1] for b in batches for o in b["outputs"] if o[0] == "execute_result"]
    assert [r["data"]["text/plain"] for r in results] == ["'last'"]  # kept past the caps


def test_a_kernel_without_a_connection_file_here_is_unavailable(h: InProcess,
                                                                runtime: Path) -> None:
    error = h.err("kernel_exec", {"kernel_id": str(uuid.uuid4()), "code": "1"})
    assert error["code"] == "not_found"
    # Lasting: the controller stops asking for this kernel (a slow start would not be).
    assert error["details"] == {"local_exec": "unavailable", "lasting": True}
    assert "no connection file" in error["message"]
    assert h.err("kernel_exec", {"kernel_id": "../etc", "code": "1"})["code"] == \
        "invalid_argument"


def test_a_kernel_that_dies_under_a_cell_is_reported_lost(h: InProcess, kernel: Kernel) -> None:
    h.ok("kernel_exec", {"kernel_id": kernel.kernel_id, "code": "1"})
    error = h.err("kernel_exec", {"kernel_id": kernel.kernel_id,
                                  "code": "import os, time\ntime.sleep(1)\nos._exit(1)"})
    assert error["code"] == "not_found" and error["details"] == {"local_exec": "kernel_lost"}
    assert "died or restarted" in error["message"]


# --- the controller's relayed exec -------------------------------------------------------------


def relayed(portal: BlockingPortal, h: InProcess, kernel: Kernel, code: str,
            **kwargs: Any) -> Any:
    return portal.call(functools.partial(execute_relayed, h, kernel.kernel_id, code, **kwargs))


def test_relayed_exec_is_one_call_and_gives_what_the_websocket_path_gives(
        portal: BlockingPortal, h: InProcess, kernel: Kernel, tmp_path: Path) -> None:
    ops: list[str] = []

    def record(op: str, reply: Any) -> Any:
        ops.append(op)
        return reply

    h.mangle = record
    result = relayed(portal, h, kernel, "print('hello'); 6 * 7", timeout=30)
    assert ops == ["kernel_exec"]
    assert (result.status, result.stdout, result.value) == ("ok", "hello\n", "42")
    assert result.execution_count is not None
    failed = relayed(portal, h, kernel, "def f():\n    raise ValueError('bad value')\nf()",
                     timeout=30)
    assert failed.status == "error" and failed.error is not None
    assert failed.error["ename"] == "ValueError"
    big = relayed(portal, h, kernel, "for _ in range(100):\n    print('y' * 999)",
                  timeout=30, max_output_chars=1000)
    assert big.stdout == "[... 99000 chars truncated ...]\n" + "y" * 999 + "\n"
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAAB"
           "JRU5ErkJggg==")
    image = relayed(portal, h, kernel, "from IPython.display import Image, display\n"
                    f"import base64\ndisplay(Image(data=base64.b64decode('{png}')))",
                    timeout=30, image_dir=tmp_path / "images")
    assert len(image.images) == 1 and Path(image.images[0]).read_bytes()[:4] == b"\x89PNG"


def test_relayed_exec_streams_and_is_interrupted_at_its_timeout(
        portal: BlockingPortal, h: InProcess, kernel: Kernel) -> None:
    seen: list[str] = []

    async def interrupt() -> None:
        kernel.manager.interrupt_kernel()

    # Up first: the 1.5 s below is the cell's, not the kernel's start (on a busy machine the
    # interrupt hit ipykernel's imports, and the kernel died with no output).
    assert relayed(portal, h, kernel, "0", timeout=60).value == "0"
    result = relayed(portal, h, kernel, "import time\nprint('start', flush=True)\n"
                     "time.sleep(30)", timeout=1.5, interrupt=interrupt,
                     on_output=lambda kind, text: seen.append(text))
    assert result.status == "timeout"
    assert "start\n" in seen and result.stdout == "start\n"
    assert result.error is not None and result.error["ename"] == "KeyboardInterrupt"
    assert relayed(portal, h, kernel, "1 + 1", timeout=30).value == "2"


def test_relayed_exec_says_unavailable_and_kernel_lost(
        portal: BlockingPortal, h: InProcess, kernel: Kernel) -> None:
    os.rename(kernel.manager.connection_file, kernel.manager.connection_file + ".away")
    try:
        with pytest.raises(RelayUnavailable) as unavailable:
            relayed(portal, h, kernel, "1", timeout=30)
        assert unavailable.value.lasting is True
    finally:
        os.rename(kernel.manager.connection_file + ".away", kernel.manager.connection_file)
    with pytest.raises(KernelError, match="died or restarted"):
        relayed(portal, h, kernel, "import os\nos._exit(1)", timeout=60)
