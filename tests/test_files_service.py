"""``AsyncFiles`` against a real supervisor in this process: transfers, resume, small files,
sync and tree download, with no Jupyter server (what only a server shows is in test_files)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from jupyter_tether import NotFound
from jupyter_tether.agent_payload.paths import PART_SUFFIX, SIDECAR_SUFFIX
from jupyter_tether.controller.files import safe_local_path, scan_local, scoped_gitignore_pattern
from jupyter_tether.errors import RemoteError, TransferError

from .inprocess import Services, services_fixture  # noqa: F401 (the ``services`` fixture)
from .test_files import MiB, debris, random_file, settle, sha_of


def fast_get_pollrdhup() -> bool:
    from jupyter_tether.controller.files import fast_get

    return fast_get._POLLRDHUP is not None


def _record_calls(services: Services, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    original = services.remote.call

    async def recording(op: str, args: dict[str, Any] | None = None, **options: Any) -> Any:
        calls.append((op, dict(args or {})))
        return await original(op, args, **options)

    monkeypatch.setattr(services.remote, "call", recording)
    return calls


def test_a_settled_file_is_hashed_while_it_is_sent(services: Services, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "settled.bin"
    digest = random_file(source, 5 * MiB + 1)
    settle(source)
    calls = _record_calls(services, monkeypatch)
    result = services.run(services.files.upload, source, "settled.bin", chunk_size=MiB)
    assert result.sha256 == digest and sha_of(services.root / "settled.bin") == digest
    begins = [args for op, args in calls if op == "upload_begin"]
    commits = [args for op, args in calls if op == "upload_commit"]
    assert len(begins) == 1 and "sha256" not in begins[0] and begins[0]["key"]
    assert str(tmp_path) not in begins[0]["key"], "the key does not carry the local path"
    assert commits[0]["sha256"] == digest


def test_a_settled_file_changed_during_its_upload_is_not_committed(
        services: Services, tmp_path: Path) -> None:
    source = tmp_path / "moving.bin"
    random_file(source, 8 * MiB)
    settle(source)

    def progress(done: int, total: int) -> None:
        if done >= 2 * MiB and done < total:
            with open(source, "r+b") as handle:  # a writer at work: new bytes, a new mtime
                handle.write(b"changed")

    with pytest.raises(TransferError, match="changed while it was being uploaded"):
        services.run(services.files.upload, source, "moving.bin", chunk_size=MiB, window=2,
                     progress=progress)
    assert not (services.root / "moving.bin").exists()


@pytest.mark.parametrize("settled", [False, True], ids=["fresh", "settled"])
def test_interrupted_upload_resumes_without_resending(services: Services, tmp_path: Path,
                                                      settled: bool) -> None:
    size = 48 * MiB
    source = tmp_path / "resume.bin"
    digest = random_file(source, size)
    if settled:
        settle(source)  # begun by key, hashed while sent; the resume hashes it whole
    remote = services.root / "resume" / "r.bin"

    async def interrupted() -> int:
        done_at_cancel = 0
        with anyio.CancelScope() as scope:
            def progress(done: int, total: int) -> None:
                nonlocal done_at_cancel
                if done >= 16 * MiB and not scope.cancel_called:
                    done_at_cancel = done
                    scope.cancel()  # as a Ctrl-C or a task timeout would

            await services.files.upload(source, "resume/r.bin", progress=progress,
                                        chunk_size=MiB, window=4)
        return done_at_cancel

    acknowledged = services.portal.call(interrupted)
    assert acknowledged >= 16 * MiB
    assert not remote.exists()
    assert Path(str(remote) + PART_SUFFIX).exists()  # kept for the resume

    result = services.run(services.files.upload, source, "resume/r.bin", chunk_size=MiB)
    assert result.resumed_bytes >= acknowledged
    assert result.sent_bytes < size
    assert result.resumed_bytes + result.sent_bytes == size  # nothing went twice
    assert sha_of(remote) == digest
    assert debris(remote.parent) == []


def test_interrupted_download_keeps_a_partial_and_resumes(services: Services,
                                                           tmp_path: Path) -> None:
    via, expected = "comm", "comm"
    size = 24 * MiB
    digest = random_file(services.root / "dl" / f"d-{via}.bin", size)
    local = tmp_path / "d.bin"

    async def interrupted() -> None:
        with anyio.CancelScope() as scope:
            await services.files.download(
                f"dl/d-{via}.bin", local, chunk_size=MiB, window=4, via=via,
                progress=lambda done, total: scope.cancel() if done >= 8 * MiB else None)

    services.portal.call(interrupted)
    assert not local.exists()
    assert Path(str(local) + PART_SUFFIX).exists() and Path(str(local) + SIDECAR_SUFFIX).exists()

    result = services.run(services.files.download, f"dl/d-{via}.bin", local, chunk_size=MiB,
                          via=via)
    assert result.via == expected
    assert result.resumed_bytes >= 8 * MiB
    assert result.resumed_bytes + result.sent_bytes == size
    assert sha_of(local) == digest
    assert debris(tmp_path) == []


def test_small_file_operations(services: Services) -> None:
    f = services.files
    written = services.run(f.write_text, "small/notes.txt", "héllo\nworld\n")
    assert written["path"] == str(services.root / "small" / "notes.txt")
    assert services.run(f.read_text, "small/notes.txt") == "héllo\nworld\n"
    assert services.run(f.read_text, "small/notes.txt", offset=7) == "world\n"
    # A cut in the middle of "é" drops the half character rather than garble it.
    assert services.run(f.read_text, "small/notes.txt", max_bytes=2) == "h"

    blob = os.urandom(9 * MiB + 3)  # above one message: goes through the chunked upload
    assert services.run(f.write_bytes, "small/blob.bin", blob)["sha256"] == \
        hashlib.sha256(blob).hexdigest()
    assert services.run(f.read_bytes, "small/blob.bin") == blob

    empty = services.root / "small" / "zero.bin"
    (services.root / "small" / "zero.src").write_bytes(b"")
    assert services.run(f.upload, services.root / "small" / "zero.src", "small/zero.bin").bytes == 0
    assert empty.read_bytes() == b""
    assert services.run(f.download, "small/zero.bin", empty.with_suffix(".back")).bytes == 0
    assert empty.with_suffix(".back").read_bytes() == b""
    for name in ("zero.src", "zero.bin", "zero.back"):
        (services.root / "small" / name).unlink()

    services.run(f.mkdir, "small/empty/deeper")
    names = {e["name"]: e["type"] for e in services.run(f.list, "small")}
    assert names == {"notes.txt": "file", "blob.bin": "file", "empty": "directory"}
    assert services.run(f.stat, "small/blob.bin")["size"] == len(blob)
    assert services.run(f.stat, "small/nothing")["exists"] is False
    with pytest.raises(RemoteError, match="not empty") as info:
        services.run(f.remove, "small/empty")
    assert info.value.code == "conflict"
    services.run(f.remove, "small/empty", recursive=True)
    services.run(f.remove, "small/blob.bin")
    assert sorted(e["name"] for e in services.run(f.list, "small")) == ["notes.txt"]


def _unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot create files in, even as root (EPERM under /sys)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/sys/jupyter-tether-test")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "inner"


def test_missing_paths_directories_and_permissions_give_clear_errors(
        services: Services, tmp_path: Path) -> None:
    f = services.files
    missing = services.root / "no" / "such.bin"
    with pytest.raises(NotFound, match=str(missing)) as info:
        services.run(f.download, "no/such.bin", tmp_path / "x.bin")
    assert str(tmp_path / "x.bin") in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no debris
    with pytest.raises(NotFound, match=str(missing)):
        services.run(f.read_text, "no/such.bin")
    with pytest.raises(TransferError, match=str(tmp_path / "absent.bin")):
        services.run(f.upload, tmp_path / "absent.bin", "x.bin")
    with pytest.raises(TransferError, match="is a directory"):
        services.run(f.upload, tmp_path, "x.bin")
    (services.root / "adir").mkdir(exist_ok=True)
    with pytest.raises(RemoteError, match=str(services.root / "adir")) as remote_info:
        services.run(f.download, "adir", tmp_path / "adir.bin")
    assert remote_info.value.code == "is_a_directory"
    with pytest.raises(RemoteError) as remote_info:
        services.run(f.read_text, "adir")
    assert remote_info.value.code == "is_a_directory"
    (services.root / "plain.txt").write_text("x")
    source = tmp_path / "s.txt"
    source.write_text("data")
    with pytest.raises(RemoteError, match=r"plain\.txt") as remote_info:
        services.run(f.upload, source, "plain.txt/under.txt")
    assert remote_info.value.code == "not_a_directory"
    (tmp_path / "localdir").mkdir()
    with pytest.raises(TransferError, match="is a directory"):
        services.run(f.download, "plain.txt", tmp_path / "localdir")
    with pytest.raises(TransferError, match="not a local directory"):
        services.run(f.sync, tmp_path / "nowhere", "x")
    with pytest.raises(NotFound, match="no such directory"):
        services.run(f.download_dir, "no/such/dir", tmp_path / "dd")

    # Permission errors, remote and local, name the path that was refused.
    remote_locked = "/sys/jupyter-tether-test/f.txt"
    with pytest.raises(RemoteError, match="/sys/jupyter-tether-test") as remote_info:
        services.run(f.write_text, remote_locked, "x")
    assert remote_info.value.code == "permission_denied"
    locked = _unwritable(tmp_path)
    with pytest.raises(TransferError, match=str(locked)):
        services.run(f.download, "plain.txt", locked / "f.txt")


def _make_tree(root: Path, n_files: int = 2000) -> None:
    rng = __import__("random").Random(5)
    for index in range(n_files):
        path = root / f"d{index // 50:02d}" / f"f{index % 50:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(100, 3000)))


def test_sync_2000_files_then_nothing_then_one_change_then_delete(
        services: Services, tmp_path: Path) -> None:
    f = services.files
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
    remote = services.root / "synced"

    first = services.run(f.sync, local, "synced")
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

    second = services.run(f.sync, local, "synced")
    assert (second["uploaded"], second["bytes_sent"]) == (0, 0)
    assert second["unchanged"] == expected

    changed = local / "d07" / "f011.txt"
    data = changed.read_bytes()
    changed.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size, new content
    third = services.run(f.sync, local, "synced")
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
    kept = services.run(f.sync, local, "synced")
    assert kept["deleted"] == 0 and (remote / "extra.txt").exists()
    fourth = services.run(f.sync, local, "synced", delete=True)
    assert sorted(fourth["deleted_paths"]) == ["d00/extra2.txt", "d01/f001.txt", "extra.txt",
                                               "gone/deep/x.txt"]
    assert (fourth["uploaded"], fourth["bytes_sent"]) == (0, 0)
    for gone in ("extra.txt", "d00/extra2.txt", "d01/f001.txt", "gone"):
        assert not (remote / gone).exists()
    assert (remote / "__pycache__" / "kept.pyc").exists()
    print(f"\nsync of 2000 files: first {first['seconds']:.2f}s, unchanged "
          f"{second['seconds']:.2f}s, one change {third['seconds']:.2f}s")


def test_sync_max_bytes_guard_sends_nothing(services: Services, tmp_path: Path) -> None:
    local = tmp_path / "guarded"
    random_file(local / "a.bin", 300_000)
    random_file(local / "b.bin", 300_000)
    with pytest.raises(TransferError, match=r"600000 bytes, over max_bytes=500000") as info:
        services.run(services.files.sync, local, "guarded", max_bytes=500_000)
    assert "max_bytes=600000" in str(info.value)  # says how to raise it
    assert not (services.root / "guarded").exists()


def test_sync_replaces_a_remote_directory_in_the_way_only_with_delete(
        services: Services, tmp_path: Path) -> None:
    local = tmp_path / "typed"
    local.mkdir()
    (local / "thing").write_text("now a file")
    (services.root / "typed" / "thing").mkdir(parents=True)
    (services.root / "typed" / "thing" / "old.txt").write_text("was a directory")
    with pytest.raises(TransferError, match="delete=True"):
        services.run(services.files.sync, local, "typed")
    services.run(services.files.sync, local, "typed", delete=True)
    assert (services.root / "typed" / "thing").read_text() == "now a file"


def test_sync_delete_keeps_remote_files_under_skipped_local_paths(
        services: Services, tmp_path: Path) -> None:
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
    remote = services.root / "linked"
    for rel in ("data/train.bin", "data/deep/val.bin", "alias/copy.txt", "pipe", "stale.txt"):
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_text("remote copy")

    result = services.run(services.files.sync, local, "linked", delete=True)
    assert {s["path"] for s in result["skipped"]} == {"alias", "data", "pipe"}
    assert result["deleted_paths"] == ["stale.txt"]
    for kept in ("data/train.bin", "data/deep/val.bin", "alias/copy.txt", "pipe"):
        assert (remote / kept).read_text() == "remote copy", kept
    assert not (remote / "stale.txt").exists()
    assert (remote / "main.py").read_text() == "print('hi')"


def test_sync_delete_is_refused_when_local_entries_cannot_be_read(
        services: Services, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "unread"
    (local / "secret").mkdir(parents=True)
    (local / "secret" / "a.txt").write_text("local")
    (local / "new.txt").write_text("not sent: the whole sync is refused")
    remote = services.root / "unread"
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
            services.run(services.files.sync, local, "unread", delete=True)
    finally:
        locked.chmod(0o755)
    assert "nothing was sent or deleted" in str(info.value)
    assert (remote / "secret" / "a.txt").read_text() == "remote copy"
    assert (remote / "stale.txt").exists() and not (remote / "new.txt").exists()
    monkeypatch.undo()
    # Readable again, the same sync goes through.
    done = services.run(services.files.sync, local, "unread", delete=True)
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
        services: Services, tmp_path: Path) -> None:
    tree = services.root / "outdir"
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

    result = services.run(services.files.download_dir, "outdir", dest)
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
        services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (services.root / "hostile").mkdir()
    (services.root / "hostile" / "ok.txt").write_text("fine")
    (services.root / "hostile" / "via").mkdir()
    (services.root / "hostile" / "via" / "x.txt").write_text("through a local link")
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    outside.mkdir()
    dest.mkdir()
    (dest / "via").symlink_to(outside)  # a link already in the destination
    f = services.files
    real_manifest = f._manifest

    async def manifest(path: str, excludes: Any, *, hash_files: bool) -> dict[str, Any]:
        result = await real_manifest(path, excludes, hash_files=hash_files)
        fake = {"size": 4, "mtime_ns": 0, "mode": 0o644, "sha256": None}
        result["files"] += [{"path": "../escape.txt", **fake}, {"path": "/abs/evil.txt", **fake},
                            {"path": "a/../../up.txt", **fake}]
        result["dirs"] += ["../escdir"]
        return result

    monkeypatch.setattr(f, "_manifest", manifest)
    result = services.run(f.download_dir, "hostile", dest)
    refused = {s["path"] for s in result["skipped"]}
    assert {"../escape.txt", "/abs/evil.txt", "a/../../up.txt", "../escdir", "via",
            "via/x.txt"} <= refused
    assert (dest / "ok.txt").read_text() == "fine"
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "outside"]
    assert not Path("/abs/evil.txt").exists()


def test_sync_then_download_dir_round_trip_keeps_mtimes(services: Services, tmp_path: Path) -> None:
    local = tmp_path / "src"
    _make_tree(local, 120)
    old = time.time_ns() - 3600 * 10**9
    for path in local.rglob("*.txt"):
        os.utime(path, ns=(old, old))
    services.run(services.files.sync, local, "roundtrip")
    back = tmp_path / "back"
    result = services.run(services.files.download_dir, "roundtrip", back)
    assert result["files"] == 120
    for path in local.rglob("*.txt"):
        twin = back / path.relative_to(local)
        assert twin.read_bytes() == path.read_bytes()
        assert twin.stat().st_mtime_ns == path.stat().st_mtime_ns


# --- the fast GET path's pure parts -------------------------------------------------------------


def test_piece_checks_follow_in_order_bytes_and_name_the_pieces_that_differ() -> None:
    import zlib

    from jupyter_tether.controller.files.part import PieceChecks

    data = os.urandom(10 * 1000 + 3)
    checks = PieceChecks(len(data), 1000)
    for offset in range(0, len(data), 700):  # buffers that straddle pieces
        assert not checks.complete()
        checks.add(offset, data[offset:offset + 700])
    assert checks.complete()
    remote = [zlib.crc32(data[o:o + 1000]) for o in range(0, len(data), 1000)]
    assert checks.mismatches(remote) == []
    remote[3] ^= 1
    assert checks.mismatches(remote) == [3]
    assert checks.mismatches(remote[:-1]) == list(range(11))  # another number of pieces
    gap = PieceChecks(len(data), 1000)
    gap.add(0, data[:500])
    gap.add(600, data[600:700])  # a gap: unusable, the caller hashes the file instead
    assert gap.broken and not gap.complete()


def test_response_heads_are_read_strictly_and_proxies_leave_the_fast_path_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_tether.controller.files.fast_get import NotSimple, direct_http, parse_head

    status, headers = parse_head(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\n"
                                 b"Set-Cookie: a=1\r\nset-cookie: b=2")
    assert status == 206
    assert headers == {"content-length": "5", "set-cookie": "a=1, b=2"}
    for bad in (b"ICY 200 OK", b"HTTP/1.1 abc", b"HTTP/1.1 200 OK\r\n folded: header",
                "HTTP/1.1 2\u00b206 Partial".encode("latin-1"), b"HTTP/1.1 2060 X"):
        with pytest.raises(NotSimple):
            parse_head(bad)
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert direct_http("http://u:p@127.0.0.1:8888/base/files/a%20b.bin?x=1") == (
        "127.0.0.1", 8888, "127.0.0.1:8888", "/base/files/a%20b.bin?x=1")
    assert direct_http("https://example.org/files/a") is None  # TLS: httpx2's
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    assert direct_http("http://10.1.2.3/files/a") is None  # through the proxy: httpx2's
    monkeypatch.setenv("no_proxy", "10.1.2.3")
    assert direct_http("http://10.1.2.3/files/a") is not None


CUT_OFF = b"HTTP/1.1 206 Partial Content\r\nContent-Le"  # a head that stops in a name


@contextlib.contextmanager
def answer_once(answer: bytes, then_close: bool) -> Iterator[int]:
    """A one-connection HTTP peer on loopback: reads the request, sends ``answer``, then
    closes or keeps the connection open. Yields its port."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        peer, _ = server.accept()
        accepted.append(peer)
        peer.recv(4096)
        peer.sendall(answer)
        if then_close:
            peer.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        for peer in accepted:
            peer.close()
        server.close()


@pytest.mark.parametrize(("answer", "then_close", "error"), [
    # Another range than asked, or a length that disagrees with it: not taken as the bytes.
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/100\r\n"
     b"Content-Length: 10\r\n\r\n0123456789", False, "NotSimple: HTTP 206"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-19/100\r\n"
     b"Content-Length: 99999999999\r\n\r\n0123456789", False, "NotSimple: HTTP 206"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-19/100\r\n"
     b"Content-Length: 10\r\nContent-Encoding: gzip\r\n\r\n0123456789", False,
     "NotSimple: HTTP 206"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-19/100\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0123456789", False, "NotSimple: HTTP 206"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", False,  # whole file
     "NotSimple: HTTP 200"),
    (b"HTTP/1.1 2x6 Odd\r\n\r\n", False, "NotSimple: not an HTTP/1.x answer"),
    (b"HTTP/1.1 206 Partial Content\r\n folded: header\r\n\r\n", False,
     "NotSimple: a header this client does not read"),
    (b"HTTP/1.1 206 Partial Content\r\n" + b"X: " + b"y" * 70_000, False,  # no end
     "NotSimple: a response head over 64 KiB"),
    (b"", True, "ReceiveError: the server closed the connection"),
    # Stops halfway: the head's deadline ends the wait; a close ends it at once where the
    # system reports the hang-up.
    (CUT_OFF, False, "ReceiveError: the response head did not come whole"),
    (CUT_OFF, True, "ReceiveError: the server closed the connection in the middle"
     if fast_get_pollrdhup() else "ReceiveError: the response head did not come whole"),
])
def test_a_hostile_files_answer_is_refused_as_not_simple_or_broken(
        answer: bytes, then_close: bool, error: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_tether.controller.files import fast_get

    monkeypatch.setattr(fast_get, "TIMEOUT_S", 1)
    with answer_once(answer, then_close) as port:
        get = fast_get.FilesGet(f"http://127.0.0.1:{port}/files/x", {}, 100)
        try:
            get.send(0, 10, 20)
            with pytest.raises((fast_get.NotSimple, fast_get.ReceiveError)) as caught:
                get.receive(0, 10, 20)
        finally:
            get.close()
    assert f"{type(caught.value).__name__}: {caught.value}".startswith(error)


def test_each_request_gets_only_the_cookies_of_its_own_url() -> None:
    from jupyter_tether.controller.rest import JupyterRest
    from jupyter_tether.controller.target import Target

    rest = JupyterRest(Target(base_url="http://hub.local/user/ann/", token="t"))
    jar = rest._client.cookies
    jar.set("_xsrf", "hub", domain="hub.local", path="/hub/")  # a hub sets it on two paths
    jar.set("_xsrf", "mine", domain="hub.local", path="/user/ann/")
    jar.set("session", "elsewhere", domain="other.example", path="/")
    assert rest.cookie_header("files/a.bin") == "_xsrf=mine"
    assert rest.cookie_header("api/kernels/k1/channels") == "_xsrf=mine"
    anyio.run(rest.aclose)


@pytest.mark.parametrize("refused", ["file", "socket"])
def test_bytes_go_through_a_buffer_where_splice_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str) -> None:
    import errno
    import socket

    from jupyter_tether.controller.files import fast_get
    from jupyter_tether.controller.files.part import DownloadPart

    if not fast_get.USE_SPLICE:
        pytest.skip("no os.splice here: the buffer is the only way")
    splice = os.splice

    refusals: list[int] = []

    def picky(src: int, dst: int, count: int, **kwargs: Any) -> int:
        if ("offset_dst" in kwargs) == (refused == "file"):
            refusals.append(count)
            raise OSError(errno.EINVAL, "Invalid argument")
        return splice(src, dst, count, **kwargs)

    monkeypatch.setattr(fast_get.os, "splice", picky)
    data = os.urandom(3 * MiB + 5)
    part = DownloadPart(tmp_path / "t.bin", "/remote/t.bin", len(data), "")
    part.open()
    mover = fast_get._Mover(part)
    sender, receiver = socket.socketpair()

    def send() -> None:
        sender.sendall(data)
        sender.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send)
    thread.start()
    done = 0
    try:
        while got := mover.move(receiver, done, MiB):
            done += got
        assert len(refusals) == 1 and mover.pipe is None, "refused once, then no more splice"
    finally:
        thread.join(10)
        mover.close()
        sender.close()
        receiver.close()
        part.close()
    assert done == len(data)
    assert part.part.read_bytes() == data
