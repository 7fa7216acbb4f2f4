"""The connect / exec / job follow / files / reconnect path, as checks any target must pass.

Shared by the Kernel Gateway, JupyterHub and several-targets tests, so that every kind of
deployment is held to the same behaviour.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from jupyter_tether import ConnectionLost, Tether
from jupyter_tether.agent_payload import bundle
from jupyter_tether.controller.jobs import AsyncJob
from jupyter_tether.controller.kernel_requests import kernel_info
from jupyter_tether.controller.kernel_ws import KernelSocket

from .conftest import follow_all

#: a job whose output must arrive exactly: numbered lines on stdout and stderr, then exit 3
JOB_LINES = 20_000
JOB_COMMAND = (f"python3 -c \"import sys\nfor i in range({JOB_LINES}):\n    print('line', i)\n"
               "print('to stderr', file=sys.stderr)\nsys.exit(3)\"")


def expected_job_output(lines: int = JOB_LINES) -> bytes:
    return "".join(f"line {i}\n" for i in range(lines)).encode() + b"to stderr\n"


def check_connect(t: Tether, root: Path) -> None:
    """The supervisor is injected and says hello; relative paths mean ``root``."""
    facts = t.info()
    assert facts["payload_hash"] == bundle.payload_hash()
    assert facts["root_dir"] == str(root)
    status = t.status()
    assert status["connected"] and status["protocol"] == "v1"
    assert t.ping()["ok"]


def check_exec(t: Tether, root: Path) -> None:
    result = t.exec("import os\nprint('hi from', os.getcwd())\n6 * 7")
    assert result.status == "ok", result
    assert result.stdout == f"hi from {root}\n"
    assert result.results[0]["data"]["text/plain"] == "42"
    pid = int(t.exec("os.getpid()").results[0]["data"]["text/plain"])
    assert pid != t.info()["pid"], "user code must not run in the supervisor's kernel"


def start_job(t: Tether, command: str, **kwargs: Any) -> AsyncJob:
    return t.portal.call(functools.partial(t.aio.jobs.start, command, **kwargs))


def check_job_follow(t: Tether) -> None:
    """A job's follow gives every byte once, in order, and its exit code is reported."""
    job = start_job(t, JOB_COMMAND)
    assert follow_all(t.portal, job) == expected_job_output()
    info = t.portal.call(lambda: job.wait(60))
    assert (info.state, info.exit_code) == ("exited", 3)


def drop_link(t: Tether) -> None:
    """Make the server drop the supervisor link's websocket.

    A second websocket on the link's own session, as a client back from a lost network
    opens, makes jupyter_server close the first one as stale.
    """
    status = t.status()

    async def intrude() -> None:
        async with anyio.create_task_group() as group:
            sock = KernelSocket(t.aio.target, status["kernel_id"],
                                session_id=status["session_id"], cookies=t.aio.rest.cookie_header)
            await sock.open(group)
            # Fully attached before it goes: the server keeps its channels for the session.
            await kernel_info(sock)
            await sock.aclose()
            group.cancel_scope.cancel()

    for attempt in range(3):
        try:
            t.portal.call(intrude)
            return
        except (ConnectionLost, BaseExceptionGroup) as exc:
            # Our own socket refused (the link reconnecting meanwhile); the task group
            # hands it over wrapped.
            if isinstance(exc, BaseExceptionGroup) and exc.subgroup(ConnectionLost) is None:
                raise
            if t.status()["last_drop_at"] != status["last_drop_at"]:
                # It did drop the link, whose reconnect (same session) then replaced this
                # socket as stale: what jupyter_server 2.12 does before kernel_info answers.
                return
            if attempt == 2:
                raise
            time.sleep(0.5)


def check_reconnect(t: Tether) -> None:
    """A dropped websocket comes back by itself, and the next call works through it."""
    before = t.status()["reconnects"]
    pid = t.info()["pid"]
    drop_link(t)
    assert t.ping(timeout=30)["ok"]
    deadline = time.monotonic() + 30
    while t.status()["reconnects"] <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert t.status()["reconnects"] > before
    assert t.info()["pid"] == pid, "a reconnect re-attaches to the same supervisor"
    # A job started after the reconnect is followed over the new connection.
    job = start_job(t, "echo after reconnect")
    assert follow_all(t.portal, job) == b"after reconnect\n"


def files_available(t: Tether) -> bool:
    return hasattr(t.aio, "files")


def remote_digests(t: Tether, remote_dir: str) -> dict[str, str]:
    """sha256 of every file under ``remote_dir`` (relative to the server root), via exec."""
    code = (
        "import hashlib, json, os\n"
        f"base = os.path.join(os.getcwd(), {remote_dir!r})\n"
        "found = {}\n"
        "for d, _, names in os.walk(base):\n"
        "    for n in names:\n"
        "        p = os.path.join(d, n)\n"
        "        found[os.path.relpath(p, base)] = hashlib.sha256(open(p, 'rb').read()).hexdigest()\n"
        "print(json.dumps(found))\n"
    )
    result = t.exec(code)
    assert result.status == "ok", result
    digests: dict[str, str] = json.loads(result.stdout)
    return digests


def check_files(t: Tether, local: Path, remote_dir: str) -> None:
    """Upload, download and sync over the comm (no contents API needed)."""
    if not files_available(t):
        pytest.skip("controller files (tether.files) have not landed yet")
    local.mkdir(parents=True, exist_ok=True)
    blob = os.urandom(5 * 1024 * 1024 + 123)
    source = local / "blob.bin"
    source.write_bytes(blob)
    t.files.upload(source, f"{remote_dir}/up/blob.bin", progress=False)
    back = local / "back.bin"
    t.files.download(f"{remote_dir}/up/blob.bin", back, progress=False)
    assert back.read_bytes() == blob

    tree = local / "tree"
    files = {"a.txt": b"alpha\n", "sub/b.bin": os.urandom(300_000), "sub/deeper/c.txt": b"c"}
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    t.files.sync(tree, f"{remote_dir}/tree", progress=False)
    want = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    assert remote_digests(t, f"{remote_dir}/tree") == want
    # A change and a deletion: the next sync (with delete) mirrors them.
    (tree / "a.txt").write_bytes(b"alpha v2\n")
    (tree / "sub/deeper/c.txt").unlink()
    t.files.sync(tree, f"{remote_dir}/tree", delete=True, progress=False)
    want = {"a.txt": hashlib.sha256(b"alpha v2\n").hexdigest(), "sub/b.bin": want["sub/b.bin"]}
    assert remote_digests(t, f"{remote_dir}/tree") == want
