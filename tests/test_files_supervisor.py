"""The payload's file service, driven in-process through the Supervisor (no kernel)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from jupyter_tether.agent_payload import downloads, excludes, paths, uploads, wire

from .inprocess import InProcess, remote_fixture  # noqa: F401 (the ``remote`` fixture)

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if paths.PART_SUFFIX in p.name or paths.TEMP_MARK in p.name)


def chunks(data: bytes, size: int) -> list[tuple[int, bytes]]:
    return [(offset, data[offset:offset + size]) for offset in range(0, len(data), size)]


def begin_upload(remote: InProcess, path: str, data: bytes, chunk: int, **extra: Any) -> dict:
    return remote.ok("upload_begin", {"path": path, "size": len(data), "sha256": sha(data),
                                        "chunk_size": chunk, **extra})


# --- upload -------------------------------------------------------------------------------


def test_upload_out_of_order_chunks_commits_equal_hash_without_debris(remote: InProcess):
    data = os.urandom(5 * MiB + 123)
    begun = begin_upload(remote, "data/model.bin", data, MiB)
    assert begun["received"] == [] and begun["path"] == str(remote.root / "data" / "model.bin")
    parts = chunks(data, MiB)
    random.Random(7).shuffle(parts)
    for offset, piece in parts:
        reply = remote.ok("upload_chunk", {"transfer_id": begun["transfer_id"],
                                             "offset": offset}, [piece])
    assert reply == {"received_bytes": len(data), "complete": True}
    done = remote.ok("upload_commit", {"transfer_id": begun["transfer_id"]})
    target = remote.root / "data" / "model.bin"
    assert done == {"path": str(target), "size": len(data), "sha256": sha(data)}
    assert sha(target.read_bytes()) == sha(data)
    assert debris(target.parent) == []
    # Committed: the transfer is over, its id unknown.
    remote.fails("not_found", "upload_chunk", {"transfer_id": begun["transfer_id"], "offset": 0},
                 [data[:MiB]])


def test_conditional_writes_replace_only_the_content_they_were_based_on(remote: InProcess):
    # An edit read the file, then writes it back: a save by someone else in between must be
    # refused (checked right before the rename), never overwritten. "": only if absent.
    target = remote.root / "nb.ipynb"
    remote.ok("fs_write", {"path": "nb.ipynb", "if_sha256": ""}, [b"v1"])
    assert target.read_bytes() == b"v1"
    refused = remote.fails("conflict", "fs_write", {"path": "nb.ipynb", "if_sha256": ""}, [b"x"])
    assert refused.details == {"path": str(target), "reason": "changed", "sha256": sha(b"v1")}
    target.write_bytes(b"v2 saved by a person")
    remote.fails("conflict", "fs_write", {"path": "nb.ipynb", "if_sha256": sha(b"v1")}, [b"x"])
    assert target.read_bytes() == b"v2 saved by a person"
    remote.ok("fs_write", {"path": "nb.ipynb", "if_sha256": sha(target.read_bytes())}, [b"v3"])
    assert target.read_bytes() == b"v3"
    # The same check on a chunked upload's commit; the part file stays for another commit.
    data = os.urandom(MiB + 5)
    begun = begin_upload(remote, "nb.ipynb", data, MiB)
    for offset, piece in chunks(data, MiB):
        remote.ok("upload_chunk", {"transfer_id": begun["transfer_id"], "offset": offset},
                  [piece])
    stale = {"transfer_id": begun["transfer_id"], "if_sha256": sha(b"v1")}
    assert remote.fails("conflict", "upload_commit", stale).details["reason"] == "changed"
    assert target.read_bytes() == b"v3"
    done = remote.ok("upload_commit", {"transfer_id": begun["transfer_id"],
                                       "if_sha256": sha(b"v3")})
    assert done["sha256"] == sha(data) and target.read_bytes() == data
    assert debris(remote.root) == []


def test_an_upload_named_by_key_gets_its_sha256_at_commit_and_is_checked(remote: InProcess):
    data = os.urandom(3 * MiB + 5)
    args = {"path": "keyed.bin", "size": len(data), "key": "k1", "chunk_size": MiB}
    remote.fails("invalid_argument", "upload_begin", {**args, "key": None})  # nothing names it
    remote.fails("invalid_argument", "upload_begin", {**args, "key": "no spaces"})
    begun = remote.ok("upload_begin", args)
    for offset, piece in chunks(data, MiB)[:2]:
        remote.ok("upload_chunk", {"transfer_id": begun["transfer_id"], "offset": offset},
                  [piece])
    # A retried begin by the same key, now with the sha256, finds what arrived.
    again = remote.ok("upload_begin", {**args, "sha256": sha(data)})
    assert again["transfer_id"] == begun["transfer_id"] and again["received_bytes"] == 2 * MiB
    # Another key for the same path starts over.
    other = remote.ok("upload_begin", {**args, "key": "k2"})
    assert other["transfer_id"] != begun["transfer_id"] and other["received_bytes"] == 0
    for offset, piece in chunks(data, MiB):
        remote.ok("upload_chunk", {"transfer_id": other["transfer_id"], "offset": offset},
                  [piece])
    remote.fails("invalid_argument", "upload_commit", {"transfer_id": other["transfer_id"]})
    wrong = remote.err("upload_commit", {"transfer_id": other["transfer_id"],
                                         "sha256": sha(b"something else")})
    assert wrong["code"] == "conflict" and wrong["details"]["reason"] == "hash_mismatch"
    assert not (remote.root / "keyed.bin").exists() and debris(remote.root) == []
    # And with the right one it lands.
    third = remote.ok("upload_begin", {**args, "key": "k3"})
    for offset, piece in chunks(data, MiB):
        remote.ok("upload_chunk", {"transfer_id": third["transfer_id"], "offset": offset},
                  [piece])
    done = remote.ok("upload_commit", {"transfer_id": third["transfer_id"], "sha256": sha(data)})
    assert done["sha256"] == sha(data) and (remote.root / "keyed.bin").read_bytes() == data


def test_a_key_named_part_resumes_from_its_sidecar_in_a_new_supervisor(
        remote: InProcess) -> None:
    data = os.urandom(2 * MiB)
    args = {"path": "side.bin", "size": len(data), "key": "kside", "chunk_size": MiB}
    begun = remote.ok("upload_begin", args)
    remote.ok("upload_chunk", {"transfer_id": begun["transfer_id"], "offset": 0},
              [data[:MiB]])
    remote.replace_supervisor()  # a kernel restart: the sidecar is saved at close
    resumed = remote.ok("upload_begin", args)
    assert resumed["received_bytes"] == MiB
    remote.ok("upload_chunk", {"transfer_id": resumed["transfer_id"], "offset": MiB},
              [data[MiB:]])
    remote.ok("upload_commit", {"transfer_id": resumed["transfer_id"], "sha256": sha(data)})
    assert (remote.root / "side.bin").read_bytes() == data


def test_upload_in_order_hashes_as_it_goes_and_applies_mode_and_mtime(remote: InProcess):
    data = os.urandom(3 * MiB)
    begun = begin_upload(remote, "run.sh", data, MiB, mode=0o750, mtime_ns=1_600_000_000_123)
    for offset, piece in chunks(data, MiB):
        remote.ok("upload_chunk", {"transfer_id": begun["transfer_id"], "offset": offset},
                    [piece])
    remote.ok("upload_commit", {"transfer_id": begun["transfer_id"]})
    st = (remote.root / "run.sh").stat()
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o750, 1_600_000_000_123)


def test_upload_resumes_in_a_new_supervisor_sending_only_missing_chunks(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(4 * MiB + 5)
    pieces = chunks(data, MiB)
    first = InProcess(root)
    begun = begin_upload(first, "ckpt.pt", data, MiB)
    for index in (0, 1, 3):
        offset, piece = pieces[index]
        first.ok("upload_chunk", {"transfer_id": begun["transfer_id"], "offset": offset},
                   [piece])
    # The same supervisor answers a retried begin with the same transfer and its ranges.
    again = begin_upload(first, "ckpt.pt", data, MiB)
    assert again["transfer_id"] == begun["transfer_id"]
    assert again["received"] == [[0, 2 * MiB], [3 * MiB, 4 * MiB]]
    first.close()  # the kernel restarts: only the part file and its sidecar remain

    second = InProcess(root)
    try:
        resumed = begin_upload(second, "ckpt.pt", data, MiB)
        assert resumed["received"] == [[0, 2 * MiB], [3 * MiB, 4 * MiB]]
        assert resumed["received_bytes"] == 3 * MiB
        for start, end in [[2 * MiB, 3 * MiB], [4 * MiB, len(data)]]:
            second.ok("upload_chunk", {"transfer_id": resumed["transfer_id"],
                                         "offset": start}, [data[start:end]])
        done = second.ok("upload_commit", {"transfer_id": resumed["transfer_id"]})
        assert done["sha256"] == sha(data)
        assert (root / "ckpt.pt").read_bytes() == data
        assert debris(root) == []
    finally:
        second.close()


def test_upload_begin_with_a_different_hash_restarts_the_partial(remote: InProcess):
    old = os.urandom(2 * MiB)
    begun = begin_upload(remote, "x.bin", old, MiB)
    remote.ok("upload_chunk", {"transfer_id": begun["transfer_id"], "offset": 0},
                [old[:MiB]])
    new = os.urandom(2 * MiB)
    restarted = begin_upload(remote, "x.bin", new, MiB)
    assert restarted["received"] == []
    remote.fails("not_found", "upload_chunk", {"transfer_id": begun["transfer_id"],
                                               "offset": 0}, [old[:MiB]])


def test_upload_commit_of_an_incomplete_file_is_a_conflict_and_keeps_the_partial(
        remote: InProcess):
    data = os.urandom(2 * MiB)
    begun = begin_upload(remote, "y.bin", data, MiB)
    remote.ok("upload_chunk", {"transfer_id": begun["transfer_id"], "offset": MiB},
                [data[MiB:]])
    failure = remote.fails("conflict", "upload_commit", {"transfer_id": begun["transfer_id"]})
    assert failure.details["missing"] == [[0, MiB]]
    remote.ok("upload_chunk", {"transfer_id": begun["transfer_id"], "offset": 0},
                [data[:MiB]])
    assert remote.ok("upload_commit", {"transfer_id": begun["transfer_id"]})["size"] == len(data)
    assert (remote.root / "y.bin").read_bytes() == data


def test_upload_with_the_wrong_hash_is_a_conflict_leaving_target_and_no_debris(
        remote: InProcess):
    target = remote.root / "weights.bin"
    target.write_bytes(b"previous version")
    data = os.urandom(MiB + 1)
    begun = remote.ok("upload_begin", {"path": "weights.bin", "size": len(data),
                                         "sha256": sha(b"something else"),
                                         "chunk_size": MiB})
    for offset, piece in chunks(data, MiB):
        remote.ok("upload_chunk", {"transfer_id": begun["transfer_id"], "offset": offset},
                    [piece])
    failure = remote.fails("conflict", "upload_commit", {"transfer_id": begun["transfer_id"]})
    assert failure.details["actual_sha256"] == sha(data)
    assert failure.details["expected_sha256"] == sha(b"something else")
    assert str(target) in failure.message
    assert target.read_bytes() == b"previous version"
    assert debris(remote.root) == []


def test_upload_rewriting_hashed_bytes_still_verifies_the_file(remote: InProcess):
    data = os.urandom(2 * MiB)
    begun = begin_upload(remote, "z.bin", data, MiB)
    tid = begun["transfer_id"]
    remote.ok("upload_chunk", {"transfer_id": tid, "offset": 0}, [os.urandom(MiB)])
    remote.ok("upload_chunk", {"transfer_id": tid, "offset": 0}, [data[:MiB]])  # a resend
    remote.ok("upload_chunk", {"transfer_id": tid, "offset": MiB}, [data[MiB:]])
    assert remote.ok("upload_commit", {"transfer_id": tid})["sha256"] == sha(data)


def test_reader_never_sees_a_half_written_target(remote: InProcess):
    target = remote.root / "live.bin"
    old = os.urandom(8 * MiB)
    target.write_bytes(old)
    new = os.urandom(8 * MiB)
    seen: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(sha(target.read_bytes()))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        begun = begin_upload(remote, "live.bin", new, 2 * MiB)
        for offset, piece in chunks(new, 2 * MiB):
            remote.ok("upload_chunk", {"transfer_id": begun["transfer_id"],
                                         "offset": offset}, [piece])
            assert target.read_bytes() == old
        remote.ok("upload_commit", {"transfer_id": begun["transfer_id"]})
        time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert seen <= {sha(old), sha(new)} and sha(old) in seen
    assert target.read_bytes() == new


def test_upload_rejects_oversize_out_of_range_and_unknown_chunks(remote: InProcess):
    data = os.urandom(1000)
    tid = begin_upload(remote, "small.bin", data, 512)["transfer_id"]
    failure = remote.fails("too_large", "upload_chunk", {"transfer_id": tid, "offset": 0},
                           [b"\0" * (wire.MAX_CHUNK_BYTES + 1)])
    assert failure.details["limit"] == wire.MAX_CHUNK_BYTES
    remote.fails("invalid_argument", "upload_chunk", {"transfer_id": tid, "offset": 999},
                 [b"ab"])
    remote.fails("invalid_argument", "upload_chunk", {"transfer_id": tid, "offset": -1},
                 [b"a"])
    remote.fails("invalid_argument", "upload_chunk", {"transfer_id": tid, "offset": 0})
    remote.fails("not_found", "upload_chunk", {"transfer_id": "nope", "offset": 0}, [b"a"])
    remote.fails("invalid_argument", "upload_begin", {"path": "big.bin", "size": 10,
                                                      "sha256": sha(b""),
                                                      "chunk_size": wire.MAX_CHUNK_BYTES + 1})


def test_empty_file_uploads(remote: InProcess):
    tid = begin_upload(remote, "empty.txt", b"", MiB)["transfer_id"]
    assert remote.ok("upload_commit", {"transfer_id": tid})["sha256"] == sha(b"")
    assert (remote.root / "empty.txt").read_bytes() == b""


def test_chunks_are_written_off_the_kernel_thread_and_a_commit_waits_for_them(
        remote: InProcess, monkeypatch: pytest.MonkeyPatch):
    """The kernel's thread only queues a chunk, so a ping behind a few MiB of them is
    answered at once; a commit sent right behind them waits until they are written."""
    data = os.urandom(3 * MiB + 11)
    begun = begin_upload(remote, "queued.bin", data, MiB)
    gate = threading.Event()
    write_at = uploads.write_at

    def held_write(fd: int, offset: int, chunk: bytes) -> None:
        gate.wait(60)  # a slow disk (the ping below must not wait for it)
        write_at(fd, offset, chunk)

    monkeypatch.setattr(uploads, "write_at", held_write)
    sent = [remote.submit("upload_chunk", {"transfer_id": begun["transfer_id"],
                                           "offset": offset}, [piece])
            for offset, piece in chunks(data, MiB)]
    commit = remote.submit("upload_commit", {"transfer_id": begun["transfer_id"]})
    assert remote.ok("ping", timeout=30)["pong"] is True
    assert not any(remote.has_reply(request) for request in [*sent, commit])
    gate.set()
    for request in sent:
        assert remote.wait(request)[0]["ok"]
    envelope, _ = remote.wait(commit)
    assert envelope["ok"] and envelope["result"]["sha256"] == sha(data), envelope
    assert (remote.root / "queued.bin").read_bytes() == data


# --- download -------------------------------------------------------------------------------


def test_a_deferred_hash_and_piece_checks_come_with_download_hash_then_from_cache(
        remote: InProcess):
    size = downloads.DEFER_HASH_MIN_BYTES + 3 * MiB + 7
    data = os.urandom(size)
    (remote.root / "big.bin").write_bytes(data)
    piece = 2 * MiB
    crcs = [zlib.crc32(data[offset:offset + piece]) for offset in range(0, size, piece)]
    args = {"path": "big.bin", "defer_hash": True, "checks": piece}
    begun = remote.ok("download_begin", args)
    # Answered before the hash: the remote hashes while the bytes travel.
    assert (begun["size"], begun["sha256"], begun["crc32"], begun["hash_pending"]) == (
        size, None, None, True)
    hashed = remote.ok("download_hash", {"transfer_id": begun["transfer_id"]})
    assert hashed == {"sha256": sha(data), "crc32": crcs}
    again = remote.ok("download_begin", args)
    assert (again["sha256"], again["crc32"], again["hash_pending"]) == (sha(data), crcs, False)
    assert remote.ok("download_hash", {"transfer_id": again["transfer_id"]}) == hashed
    # A small file is hashed at once, checks and all; no checks asked, none given.
    (remote.root / "small.bin").write_bytes(data[:MiB])
    small = remote.ok("download_begin", {"path": "small.bin", "defer_hash": True,
                                         "checks": piece})
    assert (small["sha256"], small["crc32"], small["hash_pending"]) == (
        sha(data[:MiB]), [zlib.crc32(data[:MiB])], False)
    assert "crc32" not in remote.ok("download_begin", {"path": "small.bin"})
    # Checks that would cost a read of their own (the sha256 is known) are not offered.
    (remote.root / "known.bin").write_bytes(data[:MiB])
    remote.ok("download_begin", {"path": "known.bin"})
    assert "crc32" not in remote.ok("download_begin", {"path": "known.bin", "checks": piece})
    remote.fails("invalid_argument", "download_begin", {"path": "small.bin", "checks": 100})


def test_background_hashes_and_piece_lists_are_bounded(remote: InProcess,
                                                      monkeypatch: pytest.MonkeyPatch):
    data = os.urandom(downloads.DEFER_HASH_MIN_BYTES + MiB)
    for name in ("one.bin", "two.bin"):
        (remote.root / name).write_bytes(data)
    gate = threading.Event()
    digest_pass = downloads.digest_pass

    def held(fd: int, piece: int, stopped: Any) -> Any:
        if threading.current_thread().name == "tether-download-hash":
            gate.wait(10)  # a background hash holds until the test lets it go
        return digest_pass(fd, piece, stopped)

    monkeypatch.setattr(downloads, "digest_pass", held)
    monkeypatch.setattr(downloads, "MAX_BACKGROUND_HASHES", 1)
    first = remote.ok("download_begin", {"path": "one.bin", "defer_hash": True})
    assert first["hash_pending"] is True
    # The one background slot is taken: the next begin hashes before it answers.
    second = remote.ok("download_begin", {"path": "two.bin", "defer_hash": True})
    assert (second["hash_pending"], second["sha256"]) == (False, sha(data))
    gate.set()
    assert remote.ok("download_hash", {"transfer_id": first["transfer_id"]})["sha256"] == sha(data)
    # A file of more pieces than the bound gets no piece list: the client hashes instead.
    monkeypatch.setattr(downloads, "MAX_CHECK_PIECES", 2)
    (remote.root / "three.bin").write_bytes(data[:3 * 64 * 1024])
    assert "crc32" not in remote.ok("download_begin", {"path": "three.bin", "checks": 64 * 1024})
    (remote.root / "two-pieces.bin").write_bytes(data[:2 * 64 * 1024])
    assert len(remote.ok("download_begin", {"path": "two-pieces.bin",
                                            "checks": 64 * 1024})["crc32"]) == 2
    # Piece lists are cached up to a number of pieces in all: the oldest go first, and a
    # file whose list went (its sha256 still cached) is then offered none.
    monkeypatch.setattr(downloads, "MAX_CACHED_PIECES", 3)
    (remote.root / "two-more.bin").write_bytes(data[2 * 64 * 1024:4 * 64 * 1024])
    remote.ok("download_begin", {"path": "two-more.bin", "checks": 64 * 1024})
    assert "crc32" not in remote.ok("download_begin", {"path": "two-pieces.bin",
                                                       "checks": 64 * 1024})
    assert len(remote.ok("download_begin", {"path": "two-more.bin",
                                            "checks": 64 * 1024})["crc32"]) == 2


def test_a_file_changed_while_hashed_in_the_background_is_a_conflict(
        remote: InProcess, monkeypatch: pytest.MonkeyPatch):
    gate = threading.Event()
    digest_pass = downloads.digest_pass

    def held(*args: Any) -> Any:
        gate.wait(5)
        return digest_pass(*args)

    monkeypatch.setattr(downloads, "digest_pass", held)
    path = remote.root / "moving.bin"
    path.write_bytes(os.urandom(downloads.DEFER_HASH_MIN_BYTES))
    begun = remote.ok("download_begin", {"path": "moving.bin", "defer_hash": True})
    asked = remote.submit("download_hash", {"transfer_id": begun["transfer_id"]})
    with open(path, "r+b") as handle:
        handle.write(b"changed")
    os.utime(path, ns=(begun["mtime_ns"] + 10**9, begun["mtime_ns"] + 10**9))
    gate.set()
    envelope, _ = remote.wait(asked)
    assert not envelope["ok"] and envelope["error"]["code"] == "conflict", envelope
    # Nothing of the changed file's was cached: a new begin hashes it again.
    assert remote.ok("download_begin", {"path": "moving.bin"})["sha256"] == sha(
        path.read_bytes())



def test_download_chunks_in_flight_reassemble_to_equal_hash(remote: InProcess):
    data = os.urandom(5 * MiB + 7)
    (remote.root / "out.bin").write_bytes(data)
    begun = remote.ok("download_begin", {"path": "out.bin"})
    assert (begun["size"], begun["sha256"]) == (len(data), sha(data))
    # A window of requests in flight at once, as the client drives it.
    pending = {remote.submit("download_chunk", {"transfer_id": begun["transfer_id"],
                                                "offset": offset, "length": MiB}): offset
               for offset in range(0, len(data), MiB)}
    pieces: dict[int, bytes] = {}
    eofs = []
    for request_id, offset in pending.items():
        envelope, blobs = remote.wait(request_id)
        assert envelope["ok"], envelope
        assert envelope["result"]["offset"] == offset
        assert envelope["result"]["length"] == len(blobs[0])
        pieces[offset] = blobs[0]
        eofs.append(envelope["result"]["eof"])
    assembled = b"".join(pieces[o] for o in sorted(pieces))
    assert sha(assembled) == begun["sha256"]
    assert eofs.count(True) == 1 and eofs[-1] is True
    assert remote.ok("download_end", {"transfer_id": begun["transfer_id"]}) == {"closed": True}
    # Without a transfer, by path.
    result, blobs = remote.ok_full("download_chunk", {"path": "out.bin", "offset": len(data) - 7,
                                                        "length": MiB})
    assert blobs[0] == data[-7:] and result["eof"] is True
    remote.fails("too_large", "download_chunk", {"path": "out.bin", "offset": 0,
                                                 "length": wire.MAX_CHUNK_BYTES + 1})
    remote.fails("is_a_directory", "download_begin", {"path": ""})


def _release_fifo(fifo: Path) -> None:
    """Unblock any reader stuck opening ``fifo`` (only a payload without the fix has one)."""
    for _ in range(50):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody is waiting to read
            return
        os.close(fd)
        time.sleep(0.01)


def _service(remote: InProcess) -> downloads.Downloads:
    return remote.supervisor._ops["download_chunk"][0].__self__  # type: ignore[attr-defined]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_sockets_are_refused_at_once_by_every_read(remote: InProcess):
    fifo = remote.root / "pipe"
    os.mkfifo(fifo)
    (remote.root / "pipe-link").symlink_to("pipe")
    listener = None
    specials = ["pipe", "pipe-link"]
    sock_path = remote.root / "sock"
    if hasattr(socket, "AF_UNIX") and len(str(sock_path)) < 100:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(sock_path))
        specials.append("sock")
    try:
        for name in specials:
            started = time.monotonic()
            for op, args in [("fs_read", {"path": name}),
                             ("download_begin", {"path": name}),
                             ("download_chunk", {"path": name, "offset": 0, "length": 10})]:
                envelope, _ = remote.wait(remote.submit(op, args), timeout=5)
                assert not envelope["ok"], (op, name)
                error = envelope["error"]
                assert error["code"] == "invalid_argument", (op, name, error)
                assert "not a regular file" in error["message"], error
            envelope, _ = remote.wait(remote.submit(
                "batch_read", {"root": "", "paths": [name, "ok.txt"]}), timeout=5)
            assert envelope["ok"], envelope
            entry = envelope["result"]["files"][0]
            assert entry["error"]["code"] == "invalid_argument", entry
            assert "not a regular file" in entry["error"]["message"]
            assert time.monotonic() - started < 5
        # The pool is not poisoned: far more FIFO requests than workers, then a real read.
        ids = [remote.submit("download_chunk", {"path": "pipe", "offset": 0})
               for _ in range(40)] + [remote.submit("batch_read", {"root": "", "paths": ["pipe"]})
                                      for _ in range(40)]
        for request_id in ids:
            remote.wait(request_id, timeout=5)
        (remote.root / "ok.txt").write_text("fine")
        assert remote.ok_full("fs_read", {"path": "ok.txt"})[1] == [b"fine"]
    finally:
        _release_fifo(fifo)
        if listener is not None:
            listener.close()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_download_whose_file_became_a_fifo_is_a_conflict_not_a_hang(remote: InProcess):
    target = remote.root / "swap.bin"
    target.write_bytes(b"x" * 100)
    begun = remote.ok("download_begin", {"path": "swap.bin"})
    _service(remote)._downloads[begun["transfer_id"]].close()  # as if evicted: reopens lazily
    target.unlink()
    os.mkfifo(target)
    try:
        envelope, _ = remote.wait(remote.submit(
            "download_chunk", {"transfer_id": begun["transfer_id"], "offset": 0}), timeout=5)
        assert envelope["error"]["code"] == "conflict", envelope
    finally:
        _release_fifo(target)


def _open_part_files() -> list[str]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            where = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if where.endswith(paths.PART_SUFFIX):
            found.append(where)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_open_uploads_are_capped_and_reopen_on_their_next_chunk(
        remote: InProcess, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(uploads, "MAX_OPEN_UPLOADS", 2)
    payloads = {f"up{index}.bin": os.urandom(3000) for index in range(6)}
    transfers = {name: begin_upload(remote, name, data, 1000)["transfer_id"]
                 for name, data in payloads.items()}
    assert len(_open_part_files()) <= 2
    for offset in (0, 1000, 2000):  # interleaved: every chunk may meet a closed part file
        for name, data in payloads.items():
            remote.ok("upload_chunk", {"transfer_id": transfers[name], "offset": offset},
                        [data[offset:offset + 1000]])
            assert len(_open_part_files()) <= 2
    for name, data in payloads.items():
        done = remote.ok("upload_commit", {"transfer_id": transfers[name]})
        assert done["sha256"] == sha(data)
        assert (remote.root / name).read_bytes() == data
    assert _open_part_files() == [] and debris(remote.root) == []


# --- the supervisor itself ----------------------------------------------------------------------


def test_blocking_op_racing_close_gets_a_busy_reply_instead_of_an_exception(remote: InProcess):
    (remote.root / "f.txt").write_text("x")
    remote.supervisor._pool.shutdown()  # what close() does, caught before _closed is seen
    envelope, _ = remote.wait(remote.submit("fs_read", {"path": "f.txt"}), timeout=5)
    assert envelope["error"]["code"] == "busy"
    assert "shutting down" in envelope["error"]["message"]


def test_after_close_blocking_ops_are_refused_not_run_on_the_shell_thread(remote: InProcess):
    (remote.root / "f.txt").write_text("x")
    remote.supervisor.close()
    envelope, _ = remote.wait(remote.submit("fs_read", {"path": "f.txt"}), timeout=5)
    assert envelope["error"]["code"] == "busy", envelope
    assert "shutting down" in envelope["error"]["message"]
    assert remote.ok("ping")["pong"] is True  # quick ops still answer


# --- manifests and sync ------------------------------------------------------------------------


def make_tree(base: Path, count: int) -> None:
    for index in range(count):
        folder = base / f"pkg{index % 40:02d}" / ("deep" if index % 3 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"mod{index:04d}.py").write_text(f"value = {index}\n" * (1 + index % 5))


def test_manifest_of_2000_files_then_cached_resync(tmp_path: Path, remote: InProcess):
    tree = remote.root / "proj"
    make_tree(tree, 2000)
    for junk in (".git/objects/ab", "__pycache__", "node_modules/x", "pkg00/__pycache__"):
        (tree / junk).mkdir(parents=True, exist_ok=True)
        (tree / junk / "junk.pyc").write_bytes(b"junk")
    (tree / "escape").symlink_to("/etc")
    (tree / "pkg01" / "x.py.tether-part").write_bytes(b"in flight")
    excludes = [".git", "__pycache__", "node_modules/", "*.pyc"]

    started = time.perf_counter()
    first = remote.ok("manifest", {"path": "proj", "excludes": excludes})
    first_s = time.perf_counter() - started
    assert first["exists"] is True and len(first["files"]) == 2000
    assert first["hashed"] == 2000
    assert first["symlinks"] == [{"path": "escape", "target": "/etc"}]
    assert not any("pyc" in f["path"] or "tether" in f["path"] for f in first["files"])
    sample = next(f for f in first["files"] if f["path"] == "pkg07/deep/mod0007.py")
    assert sample["sha256"] == sha((tree / "pkg07/deep/mod0007.py").read_bytes())

    started = time.perf_counter()
    second = remote.ok("manifest", {"path": "proj", "excludes": excludes})
    second_s = time.perf_counter() - started
    assert second["hashed"] == 0 and second["files"] == first["files"]

    # A new supervisor (kernel restart) still has the persisted cache.
    fresh = InProcess(remote.root)
    try:
        started = time.perf_counter()
        third = fresh.ok("manifest", {"path": "proj", "excludes": excludes})
        third_s = time.perf_counter() - started
        assert third["hashed"] == 0 and third["files"] == first["files"]
        (tree / "pkg03" / "mod0003.py").write_text("changed\n")
        fourth = fresh.ok("manifest", {"path": "proj", "excludes": excludes})
        assert fourth["hashed"] == 1
    finally:
        fresh.close()
    print(f"\nmanifest of 2000 files: first {first_s * 1000:.0f} ms, cached "
          f"{second_s * 1000:.0f} ms, cached after restart {third_s * 1000:.0f} ms")

    whole_root = remote.ok("manifest", {"path": "", "hash": False})
    assert (remote.root / ".jupyter_tether").is_dir()  # the supervisor's state: left out
    assert not any(d.startswith(".jupyter_tether") for d in whole_root["dirs"])

    blob_summary, blobs = remote.ok_full("manifest", {"path": "proj", "excludes": excludes,
                                                        "as_blob": True})
    assert blob_summary["file_count"] == 2000 and blob_summary["codec"] == "msgpack"
    assert len(wire.decode(blobs[0])[0]["files"]) == 2000


def test_manifest_of_a_missing_tree_says_so(remote: InProcess):
    result = remote.ok("manifest", {"path": "nowhere"})
    assert result["exists"] is False and result["files"] == []
    (remote.root / "file.txt").write_text("x")
    remote.fails("not_a_directory", "manifest", {"path": "file.txt"})


def test_batch_write_then_manifest_matches_and_sync_delete_prunes(remote: InProcess):
    contents = {"a.txt": b"alpha", "sub/b.bin": os.urandom(3000), "sub/deeper/c.txt": b""}
    specs = [{"path": path, "size": len(data), "mtime_ns": 1_700_000_000_000_000_000 + i,
              "mode": 0o640} for i, (path, data) in enumerate(contents.items())]
    written = remote.ok("batch_write", {"root": "dest", "files": specs},
                          list(contents.values()))
    assert written == {"root": str(remote.root / "dest"), "written": 3,
                       "bytes": sum(map(len, contents.values()))}
    manifest = remote.ok("manifest", {"path": "dest"})
    assert manifest["hashed"] == 0  # batch_write already knew the hashes
    by_path = {f["path"]: f for f in manifest["files"]}
    for spec, (path, data) in zip(specs, contents.items(), strict=True):
        assert by_path[path]["sha256"] == sha(data)
        assert by_path[path]["mtime_ns"] == spec["mtime_ns"]
        assert by_path[path]["mode"] == 0o640
        assert (remote.root / "dest" / path).read_bytes() == data
    assert manifest["dirs"] == ["sub", "sub/deeper"]
    assert debris(remote.root / "dest") == []

    deleted = remote.ok("sync_delete", {"root": "dest",
                                          "paths": ["sub/deeper/c.txt", "gone.txt"]})
    assert deleted["deleted"] == ["sub/deeper/c.txt"] and deleted["missing"] == ["gone.txt"]
    assert not (remote.root / "dest" / "sub" / "deeper").exists()
    assert (remote.root / "dest" / "sub" / "b.bin").exists()

    result, blobs = remote.ok_full("batch_read", {"root": "dest",
                                                    "paths": ["a.txt", "sub/b.bin", "nope"]})
    assert [f["path"] for f in result["files"]] == ["a.txt", "sub/b.bin", "nope"]
    assert blobs[:2] == [contents["a.txt"], contents["sub/b.bin"]]
    assert result["files"][2]["error"]["code"] == "not_found"
    result, blobs = remote.ok_full("batch_read", {"root": "dest", "max_bytes": 3000,
                                                    "paths": ["a.txt", "sub/b.bin"]})
    assert result["remaining"] == ["sub/b.bin"] and blobs == [b"alpha"]


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x", "a\x00b", "", ".",
                                 "sub/../../escape"])
def test_sync_ops_refuse_paths_outside_the_root(remote: InProcess, bad: str):
    (remote.root / "dest").mkdir()
    failure = remote.fails("invalid_argument", "batch_write",
                           {"root": "dest", "files": [{"path": "ok.txt", "size": 2},
                                                      {"path": bad, "size": 1}]}, [b"ok", b"x"])
    assert failure.message
    assert not (remote.root / "dest" / "ok.txt").exists()  # nothing written at all
    remote.fails("invalid_argument", "sync_delete", {"root": "dest", "paths": [bad]})
    remote.fails("invalid_argument", "batch_read", {"root": "dest", "paths": [bad]})


def test_sync_ops_refuse_symlinks_leading_outside_the_root(tmp_path: Path, remote: InProcess):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    dest = remote.root / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(outside)
    (dest / "file_link").symlink_to(outside / "secret.txt")
    remote.fails("invalid_argument", "batch_write",
                 {"root": "dest", "files": [{"path": "link/planted.txt", "size": 1}]}, [b"x"])
    assert not (outside / "planted.txt").exists()
    remote.fails("invalid_argument", "sync_delete", {"root": "dest",
                                                      "paths": ["link/secret.txt"]})
    assert (outside / "secret.txt").exists()
    result, blobs = remote.ok_full("batch_read", {"root": "dest", "paths": ["file_link"]})
    assert result["files"][0]["error"]["code"] == "invalid_argument" and blobs == [b""]
    # Deleting the link itself removes the link, not what it points to.
    remote.ok("sync_delete", {"root": "dest", "paths": ["link"]})
    assert not (dest / "link").exists() and (outside / "secret.txt").exists()


def test_batch_write_checks_sizes_against_buffers(remote: InProcess):
    remote.fails("invalid_argument", "batch_write",
                 {"root": "d", "files": [{"path": "a", "size": 3}]}, [b"ab"])
    remote.fails("invalid_argument", "batch_write",
                 {"root": "d", "files": [{"path": "a", "size": 2}]}, [])


# --- exclude matcher -------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "is_dir", "excluded"), [
    (".git", True, True),
    ("src/.git/config", False, True),
    ("a/__pycache__/m.cpython-311.pyc", False, True),
    ("m.pyc", False, True),
    ("node_modules", True, True),
    ("web/node_modules/react/index.js", False, True),
    ("node_modules", False, False),       # "node_modules/" matches directories only
    ("build/out/x.o", False, True),        # anchored pattern with a slash
    ("sub/build/out/x.o", False, False),
    ("data/cache/a/b.bin", False, True),   # ** crosses directories
    ("src/main.py", False, False),
    ("keep.pyc", False, False),            # re-included by "!keep.pyc"
])
def test_exclude_matcher_is_gitignore_like(path: str, is_dir: bool, excluded: bool):
    matcher = excludes.make_matcher([".git", "__pycache__", "*.pyc", "node_modules/", "# note",
                                  "/build/out", "data/**/*.bin", "!keep.pyc"])
    assert matcher(path, is_dir) is excluded


def test_exclude_matcher_accepts_a_csv_string():
    matcher = excludes.make_matcher(".venv,*.log\ndist/")
    assert matcher("x/.venv/bin/python") and matcher("a.log") and matcher("dist", True)
    assert not matcher("src/app.py")


# --- small files -------------------------------------------------------------------------------


def test_fs_write_read_list_stat_mkdir_remove(remote: InProcess):
    written = remote.ok("fs_write", {"path": "notes/today.txt"}, [b"hello\nworld\n"])
    assert written == {"path": str(remote.root / "notes" / "today.txt"), "size": 12,
                       "sha256": sha(b"hello\nworld\n")}
    result, blobs = remote.ok_full("fs_read", {"path": "notes/today.txt", "offset": 6,
                                                 "max_bytes": 3})
    assert blobs == [b"wor"] and result["eof"] is False and result["size"] == 12
    result, blobs = remote.ok_full("fs_read", {"path": "notes/today.txt", "offset": 6})
    assert blobs == [b"world\n"] and result["eof"] is True
    remote.ok("fs_write", {"path": "notes/t2.txt", "text": "héllo"})
    assert (remote.root / "notes" / "t2.txt").read_text("utf-8") == "héllo"

    assert remote.ok("fs_mkdir", {"path": "notes/sub"})["created"] is True
    assert remote.ok("fs_mkdir", {"path": "notes/sub"})["created"] is False
    (remote.root / "notes" / "link").symlink_to("today.txt")
    listing = remote.ok("fs_list", {"path": "notes"})
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [
        ("link", "symlink"), ("sub", "directory"), ("t2.txt", "file"), ("today.txt", "file")]
    assert listing["entries"][3]["size"] == 12

    stat_result = remote.ok("fs_stat", {"path": "notes/today.txt"})
    assert stat_result["exists"] is True and stat_result["type"] == "file"
    assert remote.ok("fs_stat", {"path": "notes/nope"}) == {
        "path": str(remote.root / "notes" / "nope"), "exists": False}

    failure = remote.fails("conflict", "fs_remove", {"path": "notes"})
    assert "recursive" in failure.message
    assert remote.ok("fs_remove", {"path": "notes/today.txt"})["type"] == "file"
    assert remote.ok("fs_remove", {"path": "notes", "recursive": True})["removed"] is True
    assert not (remote.root / "notes").exists()
    remote.fails("invalid_argument", "fs_remove", {"path": "", "recursive": True})


def test_fs_read_of_a_directory_or_missing_file_names_the_resolved_path(remote: InProcess):
    (remote.root / "folder").mkdir()
    failure = remote.fails("is_a_directory", "fs_read", {"path": "folder"})
    assert str(remote.root / "folder") in failure.message
    failure = remote.fails("not_found", "fs_read", {"path": "missing/file.txt"})
    assert str(remote.root / "missing" / "file.txt") in failure.message
    remote.fails("not_found", "fs_list", {"path": "missing"})
    remote.fails("is_a_directory", "fs_write", {"path": "folder"}, [b"x"])
    remote.fails("is_a_directory", "upload_begin", {"path": "folder", "size": 1,
                                                    "sha256": sha(b"x")})


def test_writing_under_a_regular_file_is_not_a_directory(remote: InProcess):
    (remote.root / "plain.txt").write_text("I am a file")
    failure = remote.fails("not_a_directory", "fs_write", {"path": "plain.txt/child.txt"},
                           [b"x"])
    assert str(remote.root / "plain.txt") in failure.message
    remote.fails("not_a_directory", "upload_begin", {"path": "plain.txt/a/b.bin", "size": 1,
                                                     "sha256": sha(b"x")})
    remote.fails("not_a_directory", "fs_list", {"path": "plain.txt"})
    remote.fails("not_found", "fs_write", {"path": "no/dir/f.txt", "make_dirs": False}, [b"x"])


def _permissions_bypassed() -> bool:
    """Whether this process reads a chmod 000 file anyway (root with CAP_DAC_OVERRIDE)."""
    with tempfile.NamedTemporaryFile() as handle:
        os.chmod(handle.name, 0)
        try:
            with open(handle.name, "rb"):
                return True
        except PermissionError:
            return False


PERMISSIONS_BYPASSED = _permissions_bypassed()


@pytest.mark.skipif(PERMISSIONS_BYPASSED,
                    reason="this process bypasses file permissions (root); "
                           "test_permission_denied_with_root_privileges_dropped runs it without")
def test_unreadable_file_is_permission_denied(remote: InProcess):
    secret = remote.root / "secret.txt"
    secret.write_text("x")
    secret.chmod(0)
    locked = remote.root / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        failure = remote.fails("permission_denied", "fs_read", {"path": "secret.txt"})
        assert str(secret) in failure.message
        remote.fails("permission_denied", "download_begin", {"path": "secret.txt"})
        remote.fails("permission_denied", "fs_write", {"path": "locked/new.txt"}, [b"x"])
        manifest = remote.ok("manifest", {"path": ""})
        assert {e["path"]: e["code"] for e in manifest["errors"]} == {
            "secret.txt": "permission_denied", "locked": "permission_denied"}
    finally:
        secret.chmod(0o600)
        locked.chmod(0o700)


@pytest.mark.skipif(not PERMISSIONS_BYPASSED or shutil.which("setpriv") is None,
                    reason="needs root (to drop its privileges) and setpriv")
def test_permission_denied_with_root_privileges_dropped(tmp_path: Path):
    caps = "-dac_override,-dac_read_search"
    proc = subprocess.run(
        ["setpriv", "--bounding-set", caps, "--inh-caps", caps, sys.executable, "-m", "pytest",
         "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"),
         f"{__file__}::test_unreadable_file_is_permission_denied"],
        capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and proc.stderr.startswith("setpriv:"):
        pytest.skip(f"setpriv cannot drop capabilities here: {proc.stderr.strip()}")
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize(("op", "args"), [
    ("fs_read", {"path": 5}),
    ("fs_read", {"path": "a", "offset": "0"}),
    ("fs_read", {"path": "a", "offset": -1}),
    ("fs_list", {"path": ["a"]}),
    ("fs_stat", {}),
    ("fs_write", {"path": "a"}),
    ("fs_remove", {"path": "a", "recursive": "yes"}),
    ("upload_begin", {"path": "a", "size": "10", "sha256": "0" * 64}),
    ("upload_begin", {"path": "a", "size": 10, "sha256": "xyz"}),
    ("upload_begin", {"path": "a", "size": -1, "sha256": "0" * 64}),
    ("upload_begin", {"path": "a", "size": 1, "sha256": "0" * 64, "transfer_id": "../x"}),
    ("upload_chunk", {"offset": 0}),
    ("upload_commit", {"transfer_id": 3}),
    ("download_chunk", {"path": "a", "offset": 0, "length": 0}),
    ("download_chunk", {"path": "a", "offset": True}),
    ("manifest", {"path": "", "excludes": "*.pyc"}),
    ("manifest", {"path": "", "excludes": [1]}),
    ("batch_write", {"root": "d", "files": ["a"]}),
    ("batch_write", {"root": "d", "files": [{"path": "a"}]}),
    ("sync_delete", {"root": "d", "paths": "a"}),
    ("batch_read", {"root": "d", "paths": ["a"], "max_bytes": 0}),
])
def test_malformed_arguments_are_invalid_argument(remote: InProcess, op: str,
                                                   args: dict[str, Any]):
    remote.fails("invalid_argument", op, args, [b"x"] if op == "batch_write" else [])


def test_the_supervisor_survives_garbage_and_keeps_serving(remote: InProcess):
    remote.supervisor.handle(b"\xc1not msgpack", [], None)
    assert remote.wait(None)[0]["error"]["code"] == "malformed"
    (remote.root / "still.txt").write_text("ok")
    _, blobs = remote.ok_full("fs_read", {"path": "still.txt"})
    assert blobs == [b"ok"]
