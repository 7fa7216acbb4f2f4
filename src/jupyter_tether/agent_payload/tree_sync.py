"""Directory sync ops: a tree's manifest, many small files written or read in one message,
and deletes confined to the tree.

The controller plans a sync from two manifests (built by the same ``build_manifest`` on
both sides); these ops carry it out. Every relative path is checked (``check_relpath``) and
confined to the tree's real root before anything is touched.
"""

import hashlib
import os
import stat
from typing import Any, Dict, List, Optional, Tuple

from . import paths, wire
from .args import optional_mode, optional_mtime_ns, string_list
from .fsutil import atomic_write, ensure_parent, open_regular, refuse_directory
from .hashing import HashCache
from .manifest import build_manifest, delete_protection, protected_root_error, unlisted_entries
from .paths import check_relpath, join_inside
from .supervisor import Request, Result, Supervisor
from .wire import ErrorCode, OpError, arg

BATCH_READ_DEFAULT_BYTES = wire.MAX_CHUNK_BYTES
BATCH_READ_MAX_BYTES = 4 * wire.MAX_CHUNK_BYTES
# Above this a manifest no longer fits an envelope (wire.MAX_ENVELOPE_BYTES): ask for a blob.
MANIFEST_INLINE_MAX_BYTES = wire.MAX_ENVELOPE_BYTES - 64 * 1024


class TreeSync:
    """The ``manifest``, ``batch_write``, ``sync_delete`` and ``batch_read`` ops."""

    def __init__(self, supervisor: Supervisor, hashes: HashCache):
        self.supervisor = supervisor
        self.hashes = hashes

    def resolve(self, path: Any) -> str:
        return paths.resolve(self.supervisor.root_dir, path)

    def manifest(self, req: Request) -> Any:
        root = self.resolve(arg(req.args, "path", str, ""))
        excludes = string_list(req.args, "excludes")
        want_hash = arg(req.args, "hash", bool, True)
        as_blob = arg(req.args, "as_blob", bool, False)
        result = build_manifest(root, excludes, hash_files=want_hash, cache=self.hashes,
                                skip_dirs=[self.supervisor.state_dir])
        # The controller refuses a deleting sync here up front; sync_delete enforces it too.
        result["delete_protected"] = self.delete_protection(root)
        if as_blob:
            blob = wire.encode(result, req.codec)
            summary = {k: v for k, v in result.items()
                       if k not in ("files", "dirs", "symlinks", "others")}
            summary.update(file_count=len(result["files"]), codec=req.codec, blob_bytes=len(blob))
            return Result(summary, [blob])
        encoded = len(wire.encode(result, req.codec))
        if encoded > MANIFEST_INLINE_MAX_BYTES:
            raise OpError(ErrorCode.TOO_LARGE,
                          "%s: manifest of %d files is %d bytes, too big for an envelope; "
                          "ask with as_blob=true" % (root, len(result["files"]), encoded),
                          {"path": root, "bytes": encoded})
        return result

    def delete_protection(self, root: str) -> Optional[str]:
        """Why a sync must not delete inside ``root`` (see manifest.delete_protection)."""
        return delete_protection(root, self.supervisor.root_dir, self.supervisor.state_dir)

    def _sync_root(self, req: Request, create: bool) -> Tuple[str, str]:
        root = self.resolve(arg(req.args, "root", str))
        if create and not os.path.lexists(root):
            try:
                os.makedirs(root, exist_ok=True)
            except OSError as exc:
                raise paths.os_error(exc, root) from None
        if not os.path.isdir(root):
            if os.path.lexists(root):
                raise OpError(ErrorCode.NOT_A_DIRECTORY, "%s: not a directory" % root,
                              {"path": root})
            raise OpError(ErrorCode.NOT_FOUND, "%s: no such directory" % root, {"path": root})
        return root, os.path.realpath(root)

    def batch_write(self, req: Request) -> Dict[str, Any]:
        specs = arg(req.args, "files", list)
        if len(specs) != len(req.buffers):
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "batch_write got %d file entries but %d buffers"
                          % (len(specs), len(req.buffers)))
        plan: List[Tuple[str, bytes, Optional[int], Optional[int]]] = []
        for index, spec in enumerate(specs):
            if not isinstance(spec, dict):
                raise OpError(ErrorCode.INVALID_ARGUMENT, "files[%d] must be a map" % index)
            rel = check_relpath(spec.get("path"))
            size = arg(spec, "size", int)
            data = req.buffers[index]
            if size != len(data):
                raise OpError(ErrorCode.INVALID_ARGUMENT, "file %r: size says %d bytes but %d "
                              "were sent" % (rel, size, len(data)))
            plan.append((rel, data, optional_mode(spec), optional_mtime_ns(spec)))
        root, real_root = self._sync_root(req, create=arg(req.args, "make_dirs", bool, True))
        # Every path is checked before anything is written.
        targets = [join_inside(root, rel, real_root=real_root) for rel, _, _, _ in plan]
        written = 0
        total = 0
        for index, (_, data, mode, mtime_ns) in enumerate(plan):
            target = targets[index]
            try:
                refuse_directory(target)
                ensure_parent(target, True)
                st = atomic_write(target, data, mode, mtime_ns)
            except OpError as exc:
                exc.details.setdefault("written", written)
                raise
            except OSError as exc:
                error = paths.os_error(exc, target)
                error.details["written"] = written
                raise error from None
            self.hashes.put(target, st, hashlib.sha256(data).hexdigest())
            written += 1
            total += len(data)
        return {"root": root, "written": written, "bytes": total}

    def sync_delete(self, req: Request) -> Dict[str, Any]:
        rels = [check_relpath(p) for p in string_list(req.args, "paths")]
        prune = arg(req.args, "prune_empty_dirs", bool, True)
        allow_root_delete = arg(req.args, "allow_root_delete", bool, False)
        root, real_root = self._sync_root(req, create=False)
        protected = self.delete_protection(root)
        if protected is not None and not allow_root_delete:
            raise protected_root_error(root, protected)
        targets = [join_inside(root, rel, real_root=real_root) for rel in rels]
        # A listed directory goes only once it is empty: its listed contents go first
        # (deepest first), and anything under it that is not listed (entries the sync
        # excludes, so never saw) keeps it, and the whole call, from deleting anything.
        listed = set(rels)
        for index, rel in enumerate(rels):
            if os.path.isdir(targets[index]) and not os.path.islink(targets[index]):
                kept = unlisted_entries(targets[index], rel, listed)
                if kept:
                    raise OpError(ErrorCode.CONFLICT,
                                  "%s: not deleted (nor anything else): it holds %s, which the "
                                  "sync does not send (excluded?) and so never deletes. Move or "
                                  "remove them yourself, or stop excluding them"
                                  % (targets[index], ", ".join(map(repr, kept))),
                                  {"path": targets[index], "reason": "directory_not_empty",
                                   "kept": kept})
        deleted: List[str] = []
        missing: List[str] = []
        pruned = 0
        for index in sorted(range(len(rels)), key=lambda i: -rels[i].count("/")):
            rel, target = rels[index], targets[index]
            try:
                st = os.lstat(target)
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(target)  # emptied above; never a recursive delete
                else:
                    os.unlink(target)
                deleted.append(rel)
            except (FileNotFoundError, NotADirectoryError):
                missing.append(rel)
                continue
            except OSError as exc:
                raise paths.os_error(exc, target) from None
            if prune:
                parent = os.path.dirname(target)
                while len(parent) > len(root) and paths.is_inside(parent, root):
                    try:
                        os.rmdir(parent)  # fails, as wanted, on a non-empty directory
                    except OSError:
                        break
                    pruned += 1
                    parent = os.path.dirname(parent)
        return {"root": root, "deleted": deleted, "missing": missing, "pruned_dirs": pruned}

    def batch_read(self, req: Request) -> Result:
        rels = [check_relpath(p) for p in string_list(req.args, "paths")]
        budget = arg(req.args, "max_bytes", int, BATCH_READ_DEFAULT_BYTES)
        if not 0 < budget <= BATCH_READ_MAX_BYTES:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "max_bytes must be 1..%d"
                          % BATCH_READ_MAX_BYTES)
        root, real_root = self._sync_root(req, create=False)
        entries: List[Dict[str, Any]] = []
        blobs: List[bytes] = []
        remaining: List[str] = []
        used = 0
        for index, rel in enumerate(rels):
            target = os.path.join(root, *rel.split("/"))
            try:
                join_inside(root, rel, follow_final=True, real_root=real_root)
                refuse_directory(target)
                fd, st = open_regular(target)  # a FIFO would block open() forever
                with os.fdopen(fd, "rb") as handle:
                    left = budget - used
                    if st.st_size > left and blobs:
                        remaining = rels[index:]  # the client asks again for these
                        break
                    data = handle.read(left + 1)
                    if len(data) > left:
                        raise OpError(ErrorCode.TOO_LARGE,
                                      "%s: larger than max_bytes=%d: download it in chunks"
                                      % (target, budget), {"path": target})
            except OpError as exc:
                entries.append({"path": rel, "error": {"code": exc.code, "message": exc.message}})
                blobs.append(b"")
                continue
            except OSError as exc:
                error = paths.os_error(exc, target)
                entries.append({"path": rel, "error": {"code": error.code,
                                                       "message": error.message}})
                blobs.append(b"")
                continue
            used += len(data)
            # The sha256 lets the client check each blob as it checks big downloads.
            entries.append({"path": rel, "size": len(data), "mode": stat.S_IMODE(st.st_mode),
                            "mtime": st.st_mtime, "mtime_ns": st.st_mtime_ns,
                            "sha256": hashlib.sha256(data).hexdigest()})
            blobs.append(data)
        return Result({"root": root, "files": entries, "remaining": remaining}, blobs)
