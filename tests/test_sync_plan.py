"""``plan_sync`` on plain inputs: a hand-made local tree and manifest, no disk, no server."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from jupyter_tether.controller.files.plan import (
    ContentHashes,
    SyncOptions,
    group_for_upload,
    plan_sync,
)
from jupyter_tether.controller.files.scan import LocalEntry, LocalTree
from jupyter_tether.controller.files.tuning import BATCH_FILES, SMALL_FILE_BYTES

MiB = 1024 * 1024
T0 = 1_700_000_000 * 10**9


def stat(size: int, mtime_ns: int = T0) -> os.stat_result:
    sec = mtime_ns // 10**9
    return os.stat_result((0o100644, 1, 1, 1, 0, 0, size, sec, sec, sec,
                           float(sec), float(sec), float(sec), mtime_ns, mtime_ns, mtime_ns))


def tree(files: dict[str, int | tuple[int, int]], dirs: Sequence[str] = (), *,
         skipped: Sequence[str] = (), errors: Sequence[str] = ()) -> LocalTree:
    entries = {}
    for rel, spec in files.items():
        size, mtime = spec if isinstance(spec, tuple) else (spec, T0)
        entries[rel] = LocalEntry(rel, f"/local/{rel}", stat(size, mtime))
    return LocalTree("/local", entries, sorted(dirs),
                     [{"path": p, "reason": "symlink to a directory: not followed"} for p in skipped],
                     [{"path": p, "error": f"/local/{p}: Permission denied"} for p in errors], [])


def manifest(files: dict[str, int | tuple[int, int]] | None = None, dirs: Sequence[str] = (),
             *, links: Sequence[str] = (), others: Sequence[str] = (), exists: bool = True,
             protected: str | None = None) -> dict[str, Any]:
    rows = []
    for rel, spec in (files or {}).items():
        size, mtime = spec if isinstance(spec, tuple) else (spec, T0)
        rows.append({"path": rel, "size": size, "mtime_ns": mtime, "mode": 0o644})
    return {"path": "/srv/proj", "exists": exists, "files": rows, "dirs": list(dirs),
            "symlinks": [{"path": p, "target": "/elsewhere"} for p in links],
            "others": list(others), "errors": [], "delete_protected": protected}


def test_new_and_resized_files_are_sent_equal_ones_stay() -> None:
    plan = plan_sync(tree({"same.txt": 5, "grown.txt": 9, "new/a.txt": 1}, ["new"]),
                     manifest({"same.txt": 5, "grown.txt": 4}), SyncOptions())
    assert plan.refusals == [] and plan.to_hash == []
    assert plan.upload == ["grown.txt", "new/a.txt"]
    assert plan.upload_bytes == 10
    assert plan.unchanged == 1
    assert plan.delete == []
    assert [[e.rel for e in batch] for batch in plan.batches] == [["grown.txt", "new/a.txt"]]


def test_mtimes_closer_than_a_microsecond_are_equal() -> None:
    plan = plan_sync(tree({"a": 3, "b": 3}), manifest({"a": (3, T0 + 999), "b": (3, T0 + 1000)}),
                     SyncOptions())
    assert plan.unchanged == 1
    assert [e.rel for e in plan.to_hash] == ["b"]


def test_same_size_other_mtime_is_decided_by_content() -> None:
    local = tree({"equal": 4, "differs": 4, "unreadable": 4, "moved_blocker": 1}, ["d"])
    remote = manifest({"equal": (4, 1), "differs": (4, 1), "unreadable": (4, 1), "d": 1})
    first = plan_sync(local, remote, SyncOptions())
    # A first look: the files to hash, and no work or refusal that could change with them.
    assert sorted(e.rel for e in first.to_hash) == ["differs", "equal", "unreadable"]
    assert first.upload == [] and first.refusals == [] and first.batches == []
    hashes = ContentHashes(local={"equal": "aa", "differs": "bb"},
                           remote={"equal": "aa", "differs": "cc", "unreadable": "dd"})
    plan = plan_sync(local, remote, SyncOptions(), hashes)
    assert plan.to_hash == []
    assert plan.unchanged == 1
    assert plan.upload == ["differs", "moved_blocker", "unreadable"]
    # The remote file "d" stands where the local directory goes: refused without delete.
    assert len(plan.refusals) == 1 and "/srv/proj/d" in plan.refusals[0]
    assert "pass delete=True" in plan.refusals[0]


def test_delete_takes_extras_blockers_and_replaced_dirs_never_what_the_scan_skipped() -> None:
    local = tree({"keep.txt": 1, "d/f.txt": 1, "r": 1, "skipme2": 1}, ["d"],
                 skipped=["linkdir"], errors=["locked"])
    remote = manifest({"keep.txt": 1, "extra.txt": 1, "d": 1, "r/inner.txt": 1,
                       "linkdir/x.txt": 1, "locked/y.txt": 1, "locked": 0},
                      ["r", "r/sub", "olddir"], links=["stale-link"], others=["fifo"])
    options = SyncOptions(delete=True, local_dir="/local", remote_dir="proj")
    plan = plan_sync(local, remote, options)
    # "locked" could not be read: a deleting sync refuses, and says so first.
    assert len(plan.refusals) == 1 and "refusing delete=True: 1 local entries" in plan.refusals[0]
    assert plan.refusals[0].startswith("sync /local -> proj: ")
    # What it would delete: extras, the file "d" in the way, the dir "r" a file replaces and
    # its entries; never under a skipped or unreadable local path.
    assert plan.delete == ["d", "extra.txt", "fifo", "r", "r/inner.txt", "r/sub", "stale-link"]
    assert "olddir" not in plan.delete  # remote directories go only with their files
    no_delete = plan_sync(local, remote, SyncOptions(local_dir="/local"))
    assert no_delete.delete == []
    assert len(no_delete.refusals) == 1
    assert no_delete.refusals[0].startswith(
        "sync /local -> /srv/proj: remote entries of another type are in the way: "
        "/srv/proj/d, /srv/proj/r;")


def test_refusals_come_in_order_and_allow_root_delete_lifts_one() -> None:
    local = tree({"big": 10 * MiB}, errors=["locked"])
    remote = manifest(protected="it is the server's root directory")
    options = SyncOptions(delete=True, max_bytes=MiB, local_dir="/local", remote_dir="~")
    plan = plan_sync(local, remote, options)
    assert len(plan.refusals) == 3
    assert plan.refusals[0].startswith("sync /local -> ~: refusing delete=True: 1 local entries")
    assert plan.refusals[1].startswith("sync /local: /srv/proj: refusing to delete files there: "
                                       "it is the server's root directory")
    assert "allow_root_delete" in plan.refusals[1]
    assert plan.refusals[2].startswith("sync /local -> /srv/proj: 1 changed files hold "
                                       f"{10 * MiB} bytes, over max_bytes={MiB}")
    lifted = plan_sync(local, remote, SyncOptions(delete=True, max_bytes=None,
                                                  allow_root_delete=True))
    assert len(lifted.refusals) == 1 and "refusing delete=True" in lifted.refusals[0]
    clean = plan_sync(tree({"big": 10 * MiB}), remote,
                      SyncOptions(max_bytes=10 * MiB))  # no delete: a protected root is fine
    assert clean.refusals == [] and clean.upload == ["big"]


def test_empty_local_dirs_are_made_and_a_missing_root_only_when_nothing_is_sent() -> None:
    local = tree({"a/b/x": 1}, ["a", "a/b", "e", "e/f", "g"])
    plan = plan_sync(local, manifest(dirs=["g"]), SyncOptions())
    assert plan.mkdirs == ["e/f"]  # "a", "a/b" come with x; mkdir makes "e" with "e/f"
    assert plan.make_root is False
    assert plan_sync(tree({}), manifest(exists=False), SyncOptions()).make_root is True
    assert plan_sync(local, manifest(exists=False), SyncOptions()).make_root is False


def test_batches_are_cut_by_bytes_count_and_envelope_and_big_files_go_alone() -> None:
    def entries(count: int, size: int, name_len: int = 1) -> list[LocalEntry]:
        return [LocalEntry(f"{i:06d}" + "n" * name_len, "/x", stat(size)) for i in range(count)]

    batches, large = group_for_upload(entries(5, MiB) + entries(2, SMALL_FILE_BYTES + 1))
    assert [len(b) for b in batches] == [4, 1] and len(large) == 2
    batches, _ = group_for_upload(entries(BATCH_FILES + 1, 1))
    assert [len(b) for b in batches] == [BATCH_FILES, 1]
    # 2,000-byte names: the 512 KiB envelope fills at 250 files, before any other limit.
    batches, _ = group_for_upload(entries(300, 1, name_len=1994))
    assert [len(b) for b in batches] == [250, 50]
