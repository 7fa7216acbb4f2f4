"""``tether.files`` through a real server and kernel: transfers, resume, sync, safe extraction."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from jupyter_tether import Tether
from jupyter_tether.agent_payload.paths import PART_SUFFIX, SIDECAR_SUFFIX, TEMP_MARK
from jupyter_tether.controller.files import (
    AsyncFiles,
    TransferResult,
    fast_get,
)
from jupyter_tether.controller.files import download as download_module
from jupyter_tether.errors import TransferError

from .inprocess import until

MiB = 1024 * 1024
T = TypeVar("T")


def run(t: Tether, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    return t.portal.call(functools.partial(func, *args, **kwargs))


def files(t: Tether) -> AsyncFiles:
    return t.aio.files


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes (in 4 MiB pieces) and return their sha256."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            digest.update(block)
            handle.write(block)
            left -= len(block)
    return digest.hexdigest()


def settle(path: Path) -> None:
    """Make ``path`` look written a minute ago: uploads hash it while they send it."""
    past = time.time_ns() - 60 * 10**9
    os.utime(path, ns=(past, past))


def sha_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def debris(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if PART_SUFFIX in p.name or TEMP_MARK in p.name)


# --- single files -----------------------------------------------------------------------------


def test_200mib_up_and_down_with_equal_hash(tether: Tether, tmp_path: Path,
                                            server_root: Path) -> None:
    source = tmp_path / "big.bin"
    digest = random_file(source, 200 * MiB)
    seen: list[tuple[int, int]] = []
    up = run(tether, files(tether).upload, source, "big/200.bin",
             progress=lambda done, total: seen.append((done, total)))
    remote = server_root / "big" / "200.bin"
    assert isinstance(up, TransferResult)
    assert (up.path, up.bytes, up.sha256) == (str(remote), 200 * MiB, digest)
    assert (up.resumed_bytes, up.sent_bytes) == (0, 200 * MiB)
    assert seen[-1] == (200 * MiB, 200 * MiB)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    assert remote.stat().st_size == 200 * MiB
    assert debris(server_root / "big") == []

    back = tmp_path / "back" / "200.bin"
    down = run(tether, files(tether).download, "big/200.bin", back)
    assert (down.path, down.local_path, down.sha256) == (str(remote), str(back), digest)
    assert sha_of(back) == digest
    assert debris(tmp_path) == []
    print(f"\n200 MiB: upload {up.mb_per_s:.0f} MB/s, download {down.mb_per_s:.0f} MB/s")
    for path in (source, back, remote):
        path.unlink()


def test_download_uses_ranged_files_get_where_served_and_the_comm_elsewhere(
        tether: Tether, tmp_path: Path, server_root: Path) -> None:
    plain = server_root / "dl" / "plain.bin"
    hidden = server_root / ".hidden-dir" / "hidden.bin"  # /files refuses hidden paths
    outside = tmp_path / "outside-root.bin"  # not under the server root at all
    digests = {path: random_file(path, 5 * MiB + 123) for path in (plain, hidden, outside)}
    cases = [("dl/plain.bin", "auto", "http", plain), ("dl/plain.bin", "comm", "comm", plain),
             (".hidden-dir/hidden.bin", "auto", "comm", hidden),
             (str(outside), "auto", "comm", outside)]
    for index, (remote, via, expected, source) in enumerate(cases):
        back = tmp_path / "back" / f"{index}.bin"
        result = run(tether, files(tether).download, remote, back, via=via)
        assert (result.via, result.sha256) == (expected, digests[source]), remote
        assert sha_of(back) == digests[source]
    assert debris(tmp_path) == []


def test_download_over_files_is_checked_by_piece_and_a_bad_piece_is_refused(
        tether: Tether, tmp_path: Path, server_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    size = 2 * fast_get.PIECE_BYTES + 5 * MiB + 3
    digest = random_file(server_root / "dl" / "pieces.bin", size)
    good = run(tether, files(tether).download, "dl/pieces.bin", tmp_path / "good.bin")
    assert (good.via, good.verified, good.sha256) == ("http", "crc32", digest)
    assert sha_of(tmp_path / "good.bin") == digest

    bad_at = fast_get.PIECE_BYTES + 12345
    move = fast_get._Mover.move

    def spoiling(mover: Any, sock: Any, offset: int, length: int) -> int:
        got: int = move(mover, sock, offset, length)
        if offset <= bad_at < offset + got:  # one byte arrives wrong
            byte = os.pread(mover.fd, 1, bad_at)
            os.pwrite(mover.fd, bytes([byte[0] ^ 0xFF]), bad_at)
        return got

    monkeypatch.setattr(fast_get._Mover, "move", spoiling)
    with pytest.raises(TransferError, match=r"1 piece\(s\) differ .* at byte "
                                            f"{fast_get.PIECE_BYTES}"):
        run(tether, files(tether).download, "dl/pieces.bin", tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()
    assert debris(tmp_path) == []


@pytest.mark.parametrize(("via", "expected"), [("auto", "http")])  # comm: test_files_service
def test_interrupted_download_keeps_a_partial_and_resumes(
        tether: Tether, tmp_path: Path, server_root: Path, via: str, expected: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Progress every millisecond: the cancel lands mid-transfer, not after the last byte.
    monkeypatch.setattr(download_module, "REPORT_EVERY_S", 0.001)
    size = 24 * MiB
    digest = random_file(server_root / "dl" / f"d-{via}.bin", size)
    local = tmp_path / "d.bin"

    async def interrupted() -> None:
        with anyio.CancelScope() as scope:
            await files(tether).download(
                f"dl/d-{via}.bin", local, chunk_size=MiB, window=4, via=via,
                progress=lambda done, total: scope.cancel() if done >= 8 * MiB else None)

    tether.portal.call(interrupted)
    assert not local.exists()
    assert Path(str(local) + PART_SUFFIX).exists() and Path(str(local) + SIDECAR_SUFFIX).exists()

    result = run(tether, files(tether).download, f"dl/d-{via}.bin", local, chunk_size=MiB,
                 via=via)
    assert result.via == expected
    assert result.resumed_bytes >= 8 * MiB and result.sent_bytes > 0
    assert result.resumed_bytes + result.sent_bytes == size
    assert sha_of(local) == digest
    assert debris(tmp_path) == []


def test_a_partial_that_was_not_this_content_starts_over_and_is_counted_anew(
        tether: Tether, tmp_path: Path, server_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_module, "REPORT_EVERY_S", 0.001)
    size = 24 * MiB  # hashed by the remote while it travels: the sidecar names its mtime
    digest = random_file(server_root / "dl" / "spoilt.bin", size)
    local = tmp_path / "s.bin"

    async def interrupted() -> None:
        with anyio.CancelScope() as scope:
            await files(tether).download(
                "dl/spoilt.bin", local,
                progress=lambda done, total: scope.cancel() if done >= 8 * MiB else None)

    tether.portal.call(interrupted)
    part = Path(str(local) + PART_SUFFIX)
    with open(part, "r+b") as handle:  # what was kept is not what the remote has
        handle.write(b"\0" * 4096)
    result = run(tether, files(tether).download, "dl/spoilt.bin", local)
    assert sha_of(local) == digest
    assert (result.resumed_bytes, result.sent_bytes) == (0, size)
    assert debris(tmp_path) == []


# --- errors -------------------------------------------------------------------------------------


# --- sync -----------------------------------------------------------------------------------------


# --- directory download ---------------------------------------------------------------------------


def test_transfers_survive_a_supervisor_kernel_restart(tether: Tether, tmp_path: Path,
                                                       server_root: Path) -> None:
    """A new supervisor knows the upload only from its sidecar; both directions carry on."""
    size = 40 * MiB
    source = tmp_path / "through-restart.bin"
    digest = random_file(source, size)

    async def restart_at(threshold: int, transfer: Callable[..., Awaitable[TransferResult]],
                         *args: Any) -> TransferResult:
        aio = tether.aio
        kernel_id = aio.link.kernel_id
        assert kernel_id is not None
        fired = False

        def progress(done: int, total: int) -> None:
            nonlocal fired
            if done >= threshold and not fired:
                fired = True
                # What JupyterLab's "Restart kernel" sends.
                aio.task_group.start_soon(aio.rest.request, "POST",
                                          f"api/kernels/{kernel_id}/restart")

        result = await transfer(*args, progress=progress, chunk_size=MiB, window=4)
        assert fired
        return result

    old_pid = tether.info()["pid"]
    up = tether.portal.call(restart_at, 12 * MiB, files(tether).upload, source, "restart/r.bin")
    assert up.sha256 == digest and sha_of(server_root / "restart" / "r.bin") == digest
    assert debris(server_root / "restart") == []
    assert tether.info()["pid"] != old_pid

    # Chunks through the comm, i.e. through the supervisor the restart replaces.
    back = tmp_path / "back.bin"
    down = tether.portal.call(restart_at, 12 * MiB,
                              functools.partial(files(tether).download, via="comm"),
                              "restart/r.bin", back)
    assert down.via == "comm"
    assert down.sha256 == digest and sha_of(back) == digest
    assert debris(tmp_path) == []

    # "auto" streams ranged GET /files, which does not go through the supervisor; but the
    # restart drops the comm link, which the HTTP path takes as a dead connection and
    # leaves the rest to the comm (unless the GET finished first): both must end whole.
    back_http = tmp_path / "back-http.bin"
    before_http = tether.info()["pid"]
    down_http = tether.portal.call(restart_at, 12 * MiB,
                                   functools.partial(files(tether).download, via="auto"),
                                   "restart/r.bin", back_http)
    assert down_http.via in ("http", "comm")
    assert down_http.sha256 == digest and sha_of(back_http) == digest
    assert debris(tmp_path) == []

    # A GET that finished first leaves its restart still landing: the shared tether must be
    # back on the new supervisor before the next test uses it.
    def new_supervisor() -> bool:
        try:
            return bool(tether.status()["connected"] and tether.info()["pid"] != before_http)
        except Exception:
            return False

    until(new_supervisor, 60)
