"""Planning a sync, pure: what to upload, what to delete, in which batches, or why not.

``plan_sync`` compares a scanned local tree with the remote manifest and does no I/O, so it
is tested with plain inputs (tests/test_sync_plan.py); ``sync.py`` executes its plan.
Files are compared by size and mtime. Where the sizes match but the mtimes differ only the
content can tell: the plan lists those files in ``to_hash`` and is planned again with the
hashes of both sides (``ContentHashes``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...agent_payload.manifest import protected_root_error
from .scan import LocalEntry, LocalTree
from .tuning import (
    BATCH_BYTES,
    BATCH_ENVELOPE_BYTES,
    BATCH_FILES,
    DEFAULT_SYNC_MAX_BYTES,
    SMALL_FILE_BYTES,
)

# Remote file systems may keep only microseconds: closer mtimes than this are equal.
MTIME_TOLERANCE_NS = 1_000


@dataclass(frozen=True)
class SyncOptions:
    """What ``sync`` was asked for, and how its refusals name the two directories."""

    delete: bool = False
    max_bytes: int | None = DEFAULT_SYNC_MAX_BYTES
    allow_root_delete: bool = False
    #: the local directory as refusals show it
    local_dir: str = "."
    #: the remote directory as asked (the manifest's ``path`` is the resolved one)
    remote_dir: str = ""


@dataclass(frozen=True)
class ContentHashes:
    """sha256 by relative path of the files in ``SyncPlan.to_hash``, local and remote."""

    local: dict[str, str]
    remote: dict[str, Any]


@dataclass
class SyncPlan:
    """What a sync does: refusals first (any of them means: do nothing), then the work."""

    #: the remote directory, resolved
    remote_root: str
    #: why a real run must not go ahead, in the order they were found (a dry run reports them)
    refusals: list[str] = field(default_factory=list)
    #: files whose content decides (same size, other mtime): plan again with their hashes.
    #: Until then the plan holds only the refusals about the roots, and no work.
    to_hash: list[LocalEntry] = field(default_factory=list)
    #: relative paths to send, sorted, and their bytes
    upload: list[str] = field(default_factory=list)
    upload_bytes: int = 0
    unchanged: int = 0
    #: remote paths to delete, sorted (only with ``delete``)
    delete: list[str] = field(default_factory=list)
    #: the files to send: small ones grouped into batch messages, big ones one by one
    batches: list[list[LocalEntry]] = field(default_factory=list)
    large: list[LocalEntry] = field(default_factory=list)
    #: empty local directories the remote lacks (mkdir makes their parents)
    mkdirs: list[str] = field(default_factory=list)
    #: the remote directory does not exist and no file's upload would create it
    make_root: bool = False


def parents(rel: str) -> Iterator[str]:
    """``a``, ``a/b`` for ``a/b/c``."""
    parts = rel.split("/")
    for depth in range(1, len(parts)):
        yield "/".join(parts[:depth])


def _covered(rel: str, prefixes: set[str]) -> bool:
    """Whether ``rel`` is one of ``prefixes`` or lies under one of them."""
    return rel in prefixes or any(parent in prefixes for parent in parents(rel))


def unreadable_refusal(tree: LocalTree, where: str) -> str | None:
    """Why ``delete`` must not run over a tree with unreadable entries, or None."""
    if not tree.errors:
        return None
    # A remote file under an unreadable local directory may well exist locally too.
    shown = "; ".join(e["error"] for e in tree.errors[:5])
    return (f"{where}: refusing delete=True: {len(tree.errors)} local entries could not be "
            f"read ({', '.join(e['path'] for e in tree.errors[:5])}"
            f"{' ...' if len(tree.errors) > 5 else ''}), so remote files cannot be judged "
            f"absent locally; nothing was sent or deleted. Make them readable, exclude "
            f"them, or sync without delete. {shown}")


def plan_sync(tree: LocalTree, remote: dict[str, Any], options: SyncOptions,
              hashes: ContentHashes | None = None) -> SyncPlan:
    """The plan to make the remote tree described by ``remote`` (a manifest) hold ``tree``.

    ``delete`` removes remote files (not excluded ones, which the manifest leaves out) that
    the local tree lacks, and remote entries of the wrong type in the way; never a remote
    path at or under one the scan skipped or could not read. A remote directory that a
    local file replaces goes entry by entry.
    """
    local_dir = options.local_dir
    remote_root = str(remote["path"])
    plan = SyncPlan(remote_root)
    if options.delete:
        refusal = unreadable_refusal(tree, f"sync {local_dir} -> {options.remote_dir}")
        if refusal is not None:
            plan.refusals.append(refusal)
    protected = remote.get("delete_protected")
    if options.delete and protected and not options.allow_root_delete:
        # Decided by the supervisor from the real paths; its sync_delete refuses too.
        plan.refusals.append(f"sync {local_dir}: " + protected_root_error(
            remote_root, str(protected)).message)

    rfiles: dict[str, dict[str, Any]] = {f["path"]: f for f in remote.get("files", [])}
    rdirs = set(remote.get("dirs", []))
    rlinks = {s["path"] for s in remote.get("symlinks", [])}
    rothers = set(remote.get("others", []))

    changed: list[str] = []
    candidates: list[LocalEntry] = []
    for rel, entry in tree.files.items():
        theirs = rfiles.get(rel)
        if theirs is None or theirs.get("size") != entry.size:
            changed.append(rel)
        elif abs(int(theirs.get("mtime_ns") or 0) - entry.st.st_mtime_ns) < MTIME_TOLERANCE_NS:
            plan.unchanged += 1
        else:
            candidates.append(entry)
    if candidates:
        if hashes is None:
            plan.to_hash = candidates
            return plan
        for entry in candidates:
            mine = hashes.local.get(entry.rel)
            if mine is not None and mine == hashes.remote.get(entry.rel):
                plan.unchanged += 1
            else:
                changed.append(entry.rel)
    changed.sort()
    plan.upload = changed

    # Remote entries of the wrong type in the way, and remote extras.
    where = f"sync {local_dir} -> {remote_root}"
    needed_dirs = set(tree.dirs)
    for rel in tree.files:
        needed_dirs.update(parents(rel))
    blockers = sorted({rel for rel in tree.files if rel in rdirs}
                      | {d for d in needed_dirs if d in rfiles or d in rlinks or d in rothers})
    # A remote directory a local file replaces goes entry by entry (its files are extras):
    # its subdirectories are listed too, and the supervisor removes none that still holds
    # something unlisted (an excluded entry).
    replaced = {rel for rel in tree.files if rel in rdirs}
    inner_dirs = sorted(d for d in rdirs if any(p in replaced for p in parents(d)))
    # What the scan skipped (links to directories, FIFOs...) or could not read is not
    # "absent locally": remote files at or under those paths are never extras.
    unseen = {str(s["path"]) for s in tree.skipped} | {str(e["path"]) for e in tree.errors}
    extras = sorted(rel for rel in (set(rfiles) | rlinks | rothers)
                    - set(tree.files) - set(blockers) if not _covered(rel, unseen))
    if blockers and not options.delete:
        shown = ", ".join(f"{remote_root}/{b}" for b in blockers[:5])
        plan.refusals.append(f"{where}: remote entries of another type are in the way: "
                             f"{shown}{' ...' if len(blockers) > 5 else ''}; pass "
                             "delete=True to replace them")
    total = sum(tree.files[rel].size for rel in changed)
    plan.upload_bytes = total
    if options.max_bytes is not None and total > options.max_bytes:
        plan.refusals.append(f"{where}: {len(changed)} changed files hold {total} bytes, over "
                             f"max_bytes={options.max_bytes}; nothing was sent. Pass a larger "
                             f"max_bytes (e.g. max_bytes={total}) or exclude big files")
    if options.delete:
        plan.delete = sorted(set(blockers) | set(extras) | set(inner_dirs))
    plan.batches, plan.large = group_for_upload([tree.files[rel] for rel in changed])
    # Empty local directories travel too (others appear with their files).
    missing_dirs = set(tree.dirs) - rdirs - {d for rel in changed for d in parents(rel)}
    inner = {p for d in missing_dirs for p in parents(d)}
    plan.mkdirs = sorted(missing_dirs - inner)
    plan.make_root = not remote.get("exists") and not changed
    return plan


def group_for_upload(entries: Sequence[LocalEntry]) -> tuple[
        list[list[LocalEntry]], list[LocalEntry]]:
    """Small files in ``batch_write``-sized groups (bytes, count, envelope), and the big ones."""
    small = [e for e in entries if e.size <= SMALL_FILE_BYTES]
    large = [e for e in entries if e.size > SMALL_FILE_BYTES]
    batches: list[list[LocalEntry]] = []
    current: list[LocalEntry] = []
    size = envelope = 0
    for entry in small:
        cost = len(entry.rel.encode()) + 96
        if current and (size + entry.size > BATCH_BYTES or len(current) >= BATCH_FILES
                        or envelope + cost > BATCH_ENVELOPE_BYTES):
            batches.append(current)
            current, size, envelope = [], 0, 0
        current.append(entry)
        size += entry.size
        envelope += cost
    if current:
        batches.append(current)
    return batches, large
