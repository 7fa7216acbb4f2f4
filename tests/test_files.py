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

from jupyter_tether import NotFound, Tether
from jupyter_tether.agent_payload.paths import PART_SUFFIX, SIDECAR_SUFFIX, TEMP_MARK
from jupyter_tether.controller.files import (
    AsyncFiles,
    TransferResult,
    safe_local_path,
    scan_local,
    scoped_gitignore_pattern,
)
from jupyter_tether.errors import RemoteError, TransferError

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


def test_interrupted_upload_resumes_without_resending(tether: Tether, tmp_path: Path,
                                                      server_root: Path) -> None:
    size = 48 * MiB
    source = tmp_path / "resume.bin"
    digest = random_file(source, size)
    remote = server_root / "resume" / "r.bin"

    async def interrupted() -> int:
        done_at_cancel = 0
        with anyio.CancelScope() as scope:
            def progress(done: int, total: int) -> None:
                nonlocal done_at_cancel
                if done >= 16 * MiB and not scope.cancel_called:
                    done_at_cancel = done
                    scope.cancel()  # as a Ctrl-C or a task timeout would

            await files(tether).upload(source, "resume/r.bin", progress=progress,
                                       chunk_size=MiB, window=4)
        return done_at_cancel

    acknowledged = tether.portal.call(interrupted)
    assert acknowledged >= 16 * MiB
    assert not remote.exists()
    assert Path(str(remote) + PART_SUFFIX).exists()  # kept for the resume

    result = run(tether, files(tether).upload, source, "resume/r.bin", chunk_size=MiB)
    assert result.resumed_bytes >= acknowledged
    assert result.sent_bytes < size
    assert result.resumed_bytes + result.sent_bytes == size  # nothing went twice
    assert sha_of(remote) == digest
    assert debris(remote.parent) == []


@pytest.mark.parametrize(("via", "expected"), [("comm", "comm"), ("auto", "http")])
def test_interrupted_download_keeps_a_partial_and_resumes(
        tether: Tether, tmp_path: Path, server_root: Path, via: str, expected: str) -> None:
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
    assert result.resumed_bytes >= 8 * MiB
    assert result.resumed_bytes + result.sent_bytes == size
    assert sha_of(local) == digest
    assert debris(tmp_path) == []


def test_small_file_operations(tether: Tether, server_root: Path) -> None:
    f = files(tether)
    written = run(tether, f.write_text, "small/notes.txt", "héllo\nworld\n")
    assert written["path"] == str(server_root / "small" / "notes.txt")
    assert run(tether, f.read_text, "small/notes.txt") == "héllo\nworld\n"
    assert run(tether, f.read_text, "small/notes.txt", offset=7) == "world\n"
    # A cut in the middle of "é" drops the half character rather than garble it.
    assert run(tether, f.read_text, "small/notes.txt", max_bytes=2) == "h"

    blob = os.urandom(9 * MiB + 3)  # above one message: goes through the chunked upload
    assert run(tether, f.write_bytes, "small/blob.bin", blob)["sha256"] == \
        hashlib.sha256(blob).hexdigest()
    assert run(tether, f.read_bytes, "small/blob.bin") == blob

    empty = server_root / "small" / "zero.bin"
    (server_root / "small" / "zero.src").write_bytes(b"")
    assert run(tether, f.upload, server_root / "small" / "zero.src", "small/zero.bin").bytes == 0
    assert empty.read_bytes() == b""
    assert run(tether, f.download, "small/zero.bin", empty.with_suffix(".back")).bytes == 0
    assert empty.with_suffix(".back").read_bytes() == b""
    for name in ("zero.src", "zero.bin", "zero.back"):
        (server_root / "small" / name).unlink()

    run(tether, f.mkdir, "small/empty/deeper")
    names = {e["name"]: e["type"] for e in run(tether, f.list, "small")}
    assert names == {"notes.txt": "file", "blob.bin": "file", "empty": "directory"}
    assert run(tether, f.stat, "small/blob.bin")["size"] == len(blob)
    assert run(tether, f.stat, "small/nothing")["exists"] is False
    with pytest.raises(RemoteError, match="not empty") as info:
        run(tether, f.remove, "small/empty")
    assert info.value.code == "conflict"
    run(tether, f.remove, "small/empty", recursive=True)
    run(tether, f.remove, "small/blob.bin")
    assert sorted(e["name"] for e in run(tether, f.list, "small")) == ["notes.txt"]


# --- errors -------------------------------------------------------------------------------------


def _unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot create files in, even as root (EPERM under /sys)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/sys/jupyter-tether-test")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "inner"


def test_missing_paths_directories_and_permissions_give_clear_errors(
        tether: Tether, tmp_path: Path, server_root: Path) -> None:
    f = files(tether)
    missing = server_root / "no" / "such.bin"
    with pytest.raises(NotFound, match=str(missing)) as info:
        run(tether, f.download, "no/such.bin", tmp_path / "x.bin")
    assert str(tmp_path / "x.bin") in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no debris
    with pytest.raises(NotFound, match=str(missing)):
        run(tether, f.read_text, "no/such.bin")
    with pytest.raises(TransferError, match=str(tmp_path / "absent.bin")):
        run(tether, f.upload, tmp_path / "absent.bin", "x.bin")
    with pytest.raises(TransferError, match="is a directory"):
        run(tether, f.upload, tmp_path, "x.bin")
    (server_root / "adir").mkdir(exist_ok=True)
    with pytest.raises(RemoteError, match=str(server_root / "adir")) as remote_info:
        run(tether, f.download, "adir", tmp_path / "adir.bin")
    assert remote_info.value.code == "is_a_directory"
    with pytest.raises(RemoteError) as remote_info:
        run(tether, f.read_text, "adir")
    assert remote_info.value.code == "is_a_directory"
    (server_root / "plain.txt").write_text("x")
    source = tmp_path / "s.txt"
    source.write_text("data")
    with pytest.raises(RemoteError, match=r"plain\.txt") as remote_info:
        run(tether, f.upload, source, "plain.txt/under.txt")
    assert remote_info.value.code == "not_a_directory"
    (tmp_path / "localdir").mkdir()
    with pytest.raises(TransferError, match="is a directory"):
        run(tether, f.download, "plain.txt", tmp_path / "localdir")
    with pytest.raises(TransferError, match="not a local directory"):
        run(tether, f.sync, tmp_path / "nowhere", "x")
    with pytest.raises(NotFound, match="no such directory"):
        run(tether, f.download_dir, "no/such/dir", tmp_path / "dd")

    # Permission errors, remote and local, name the path that was refused.
    remote_locked = "/sys/jupyter-tether-test/f.txt"
    with pytest.raises(RemoteError, match="/sys/jupyter-tether-test") as remote_info:
        run(tether, f.write_text, remote_locked, "x")
    assert remote_info.value.code == "permission_denied"
    locked = _unwritable(tmp_path)
    with pytest.raises(TransferError, match=str(locked)):
        run(tether, f.download, "plain.txt", locked / "f.txt")


# --- sync -----------------------------------------------------------------------------------------


def _make_tree(root: Path, n_files: int = 2000) -> None:
    rng = __import__("random").Random(5)
    for index in range(n_files):
        path = root / f"d{index // 50:02d}" / f"f{index % 50:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(100, 3000)))


def test_sync_2000_files_then_nothing_then_one_change_then_delete(
        tether: Tether, tmp_path: Path, server_root: Path) -> None:
    f = files(tether)
    local = tmp_path / "proj"
    _make_tree(local)
    # Left out: the defaults, .gitignore'd files, links outside; a big file goes in chunks.
    for junk in ("__pycache__/m.cpython-311.pyc", ".git/config", "node_modules/x.js",
                 "d00/out.log", "keep/debug.log"):
        (local / junk).parent.mkdir(parents=True, exist_ok=True)
        (local / junk).write_text("junk")
    (local / ".gitignore").write_text("*.log\n")
    (local / "keep" / ".gitignore").write_text("!debug.log\n")
    (local / "etc").symlink_to("/etc")
    (local / "alias.txt").symlink_to(local / "d00" / "f000.txt")
    random_file(local / "weights.bin", 3 * MiB)
    remote = server_root / "synced"

    first = run(tether, f.sync, local, "synced")
    expected = 2000 + 5  # + .gitignore, keep/.gitignore, keep/debug.log, alias.txt, weights.bin
    assert (first["uploaded"], first["unchanged"], first["large_files"]) == (expected, 0, 1)
    assert first["remote_dir"] == str(remote)
    assert {s["path"] for s in first["skipped"]} == {"etc"}
    for gone in ("__pycache__", ".git", "node_modules", "d00/out.log", "etc"):
        assert not os.path.lexists(remote / gone)
    assert (remote / "keep" / "debug.log").read_text() == "junk"
    assert (remote / "alias.txt").read_bytes() == (local / "d00" / "f000.txt").read_bytes()
    assert sha_of(remote / "weights.bin") == sha_of(local / "weights.bin")
    assert (remote / "d39" / "f049.txt").read_bytes() == (local / "d39" / "f049.txt").read_bytes()

    second = run(tether, f.sync, local, "synced")
    assert (second["uploaded"], second["bytes_sent"]) == (0, 0)
    assert second["unchanged"] == expected

    changed = local / "d07" / "f011.txt"
    data = changed.read_bytes()
    changed.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size, new content
    third = run(tether, f.sync, local, "synced")
    assert (third["uploaded"], third["bytes_sent"], third["changed"]) == \
        (1, len(data), ["d07/f011.txt"])
    assert (remote / "d07" / "f011.txt").read_bytes() == changed.read_bytes()

    (remote / "extra.txt").write_text("remote only")
    (remote / "d00" / "extra2.txt").write_text("remote only")
    (remote / "gone" / "deep").mkdir(parents=True)
    (remote / "gone" / "deep" / "x.txt").write_text("remote only")
    (remote / "__pycache__").mkdir()
    (remote / "__pycache__" / "kept.pyc").write_text("excluded: never deleted")
    (local / "d01" / "f001.txt").unlink()
    kept = run(tether, f.sync, local, "synced")
    assert kept["deleted"] == 0 and (remote / "extra.txt").exists()
    fourth = run(tether, f.sync, local, "synced", delete=True)
    assert sorted(fourth["deleted_paths"]) == ["d00/extra2.txt", "d01/f001.txt", "extra.txt",
                                               "gone/deep/x.txt"]
    assert (fourth["uploaded"], fourth["bytes_sent"]) == (0, 0)
    for gone in ("extra.txt", "d00/extra2.txt", "d01/f001.txt", "gone"):
        assert not (remote / gone).exists()
    assert (remote / "__pycache__" / "kept.pyc").exists()
    print(f"\nsync of 2000 files: first {first['seconds']:.2f}s, unchanged "
          f"{second['seconds']:.2f}s, one change {third['seconds']:.2f}s")


def test_sync_max_bytes_guard_sends_nothing(tether: Tether, tmp_path: Path,
                                            server_root: Path) -> None:
    local = tmp_path / "guarded"
    random_file(local / "a.bin", 300_000)
    random_file(local / "b.bin", 300_000)
    with pytest.raises(TransferError, match=r"600000 bytes, over max_bytes=500000") as info:
        run(tether, files(tether).sync, local, "guarded", max_bytes=500_000)
    assert "max_bytes=600000" in str(info.value)  # says how to raise it
    assert not (server_root / "guarded").exists()


def test_sync_replaces_a_remote_directory_in_the_way_only_with_delete(
        tether: Tether, tmp_path: Path, server_root: Path) -> None:
    local = tmp_path / "typed"
    local.mkdir()
    (local / "thing").write_text("now a file")
    (server_root / "typed" / "thing").mkdir(parents=True)
    (server_root / "typed" / "thing" / "old.txt").write_text("was a directory")
    with pytest.raises(TransferError, match="delete=True"):
        run(tether, files(tether).sync, local, "typed")
    run(tether, files(tether).sync, local, "typed", delete=True)
    assert (server_root / "typed" / "thing").read_text() == "now a file"


def test_sync_delete_keeps_remote_files_under_skipped_local_paths(
        tether: Tether, tmp_path: Path, server_root: Path) -> None:
    """A link the scan does not follow is not "absent locally": its remote twin stays."""
    local = tmp_path / "linked"
    (local / "sub").mkdir(parents=True)
    (local / "main.py").write_text("print('hi')")
    (local / "sub" / "s.txt").write_text("inside")
    dataset = tmp_path / "big-dataset"
    dataset.mkdir()
    (local / "data").symlink_to(dataset)  # outside the tree: skipped
    (local / "alias").symlink_to(local / "sub")  # a directory inside: skipped
    os.mkfifo(local / "pipe")  # not a regular file: skipped
    remote = server_root / "linked"
    for rel in ("data/train.bin", "data/deep/val.bin", "alias/copy.txt", "pipe", "stale.txt"):
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_text("remote copy")

    result = run(tether, files(tether).sync, local, "linked", delete=True)
    assert {s["path"] for s in result["skipped"]} == {"alias", "data", "pipe"}
    assert result["deleted_paths"] == ["stale.txt"]
    for kept in ("data/train.bin", "data/deep/val.bin", "alias/copy.txt", "pipe"):
        assert (remote / kept).read_text() == "remote copy", kept
    assert not (remote / "stale.txt").exists()
    assert (remote / "main.py").read_text() == "print('hi')"


def test_sync_delete_is_refused_when_local_entries_cannot_be_read(
        tether: Tether, tmp_path: Path, server_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "unread"
    (local / "secret").mkdir(parents=True)
    (local / "secret" / "a.txt").write_text("local")
    (local / "new.txt").write_text("not sent: the whole sync is refused")
    remote = server_root / "unread"
    (remote / "secret").mkdir(parents=True)
    (remote / "secret" / "a.txt").write_text("remote copy")
    (remote / "stale.txt").write_text("remote only")
    locked = local / "secret"
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root reads anything: fake the EACCES
        real_scandir = os.scandir

        def scandir(path: Any = ".") -> Any:
            if os.fspath(path) == os.path.realpath(locked):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        locked.chmod(0)
    try:
        with pytest.raises(TransferError, match=r"refusing delete=True.*\(secret\)") as info:
            run(tether, files(tether).sync, local, "unread", delete=True)
    finally:
        locked.chmod(0o755)
    assert "nothing was sent or deleted" in str(info.value)
    assert (remote / "secret" / "a.txt").read_text() == "remote copy"
    assert (remote / "stale.txt").exists() and not (remote / "new.txt").exists()
    monkeypatch.undo()
    # Readable again, the same sync goes through.
    done = run(tether, files(tether).sync, local, "unread", delete=True)
    assert done["deleted_paths"] == ["stale.txt"]
    assert (remote / "secret" / "a.txt").read_text() == "local"


def test_gitignore_patterns_are_scoped_to_their_directory(tmp_path: Path) -> None:
    assert scoped_gitignore_pattern("*.log", "") == "*.log"
    assert scoped_gitignore_pattern("*.log", "sub") == "sub/**/*.log"
    assert scoped_gitignore_pattern("/out/", "a/b") == "a/b/out/"
    assert scoped_gitignore_pattern("!keep.log", "sub") == "!sub/**/keep.log"
    assert scoped_gitignore_pattern("# comment", "sub") is None
    assert scoped_gitignore_pattern("x", "we*rd") == "we\\*rd/**/x"
    for rel in ("top.log", "sub/a.log", "sub/keep.log", "sub/deep/b.log", "other/c.log",
                "sub/out/z.txt", "out/z.txt", "src/main.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "sub" / ".gitignore").write_text("*.log\n!keep.log\n/out/\n")
    tree = scan_local(tmp_path, [])
    assert sorted(tree.files) == ["other/c.log", "out/z.txt", "src/main.py", "sub/.gitignore",
                                  "sub/keep.log", "top.log"]
    assert sorted(scan_local(tmp_path, [], gitignore=False).files) == sorted(
        [*tree.files, "sub/a.log", "sub/deep/b.log", "sub/out/z.txt"])


# --- directory download ---------------------------------------------------------------------------


def test_safe_local_path_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "dest"
    (root / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert safe_local_path(root, "ok/a.txt") == root / "ok" / "a.txt"
    assert safe_local_path(root, "./ok//b.txt") == root / "ok" / "b.txt"
    for bad in ("../escape", "/abs", "/etc/passwd", "ok/../../escape", "", "a\x00b",
                "link/x.txt"):
        with pytest.raises(TransferError, match="refusing"):
            safe_local_path(root, bad)


def test_download_dir_writes_nothing_outside_the_destination(
        tether: Tether, tmp_path: Path, server_root: Path) -> None:
    tree = server_root / "outdir"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha")
    (tree / "empty").mkdir()
    digest = random_file(tree / "sub" / "big.bin", 3 * MiB)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the tree")
    (tree / "etc_link").symlink_to("/etc")
    (tree / "abs_link").symlink_to(secret)
    (tree / "up_link").symlink_to("../")
    os.mkfifo(tree / "fifo")
    dest = tmp_path / "dest"
    before = set(tmp_path.iterdir())

    result = run(tether, files(tether).download_dir, "outdir", dest)
    assert (result["files"], result["bytes"]) == (2, 5 + 3 * MiB)
    assert (dest / "a.txt").read_text() == "alpha"
    assert sha_of(dest / "sub" / "big.bin") == digest
    assert (dest / "empty").is_dir()
    assert {s["path"] for s in result["skipped"]} == {"etc_link", "abs_link", "up_link", "fifo"}
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "empty", "sub"]
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert set(tmp_path.iterdir()) == before | {dest}
    assert secret.read_text() == "outside the tree"


def test_download_dir_refuses_hostile_names_from_the_manifest(
        tether: Tether, tmp_path: Path, server_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (server_root / "hostile").mkdir()
    (server_root / "hostile" / "ok.txt").write_text("fine")
    (server_root / "hostile" / "via").mkdir()
    (server_root / "hostile" / "via" / "x.txt").write_text("through a local link")
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    outside.mkdir()
    dest.mkdir()
    (dest / "via").symlink_to(outside)  # a link already in the destination
    f = files(tether)
    real_manifest = f._manifest

    async def manifest(path: str, excludes: Any, *, hash_files: bool) -> dict[str, Any]:
        result = await real_manifest(path, excludes, hash_files=hash_files)
        fake = {"size": 4, "mtime_ns": 0, "mode": 0o644, "sha256": None}
        result["files"] += [{"path": "../escape.txt", **fake}, {"path": "/abs/evil.txt", **fake},
                            {"path": "a/../../up.txt", **fake}]
        result["dirs"] += ["../escdir"]
        return result

    monkeypatch.setattr(f, "_manifest", manifest)
    result = run(tether, f.download_dir, "hostile", dest)
    refused = {s["path"] for s in result["skipped"]}
    assert {"../escape.txt", "/abs/evil.txt", "a/../../up.txt", "../escdir", "via",
            "via/x.txt"} <= refused
    assert (dest / "ok.txt").read_text() == "fine"
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "outside"]
    assert not Path("/abs/evil.txt").exists()


def test_sync_then_download_dir_round_trip_keeps_mtimes(tether: Tether, tmp_path: Path) -> None:
    local = tmp_path / "src"
    _make_tree(local, 120)
    old = time.time_ns() - 3600 * 10**9
    for path in local.rglob("*.txt"):
        os.utime(path, ns=(old, old))
    run(tether, files(tether).sync, local, "roundtrip")
    back = tmp_path / "back"
    result = run(tether, files(tether).download_dir, "roundtrip", back)
    assert result["files"] == 120
    for path in local.rglob("*.txt"):
        twin = back / path.relative_to(local)
        assert twin.read_bytes() == path.read_bytes()
        assert twin.stat().st_mtime_ns == path.stat().st_mtime_ns


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
                aio.task_group.start_soon(aio.rest.restart_kernel, kernel_id)

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
    down_http = tether.portal.call(restart_at, 12 * MiB,
                                   functools.partial(files(tether).download, via="auto"),
                                   "restart/r.bin", back_http)
    assert down_http.via in ("http", "comm")
    assert down_http.sha256 == digest and sha_of(back_http) == digest
    assert debris(tmp_path) == []
