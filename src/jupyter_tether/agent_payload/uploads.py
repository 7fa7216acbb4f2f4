"""Resumable uploads: chunks in any order into a part file, renamed into place once verified.

Memory stays bounded by the chunks in flight: each chunk is written with a positional
write into ``<target>.tether-part`` (pre-sized, possibly sparse) beside the target, its range
recorded in the sidecar ``<target>.tether-part.json`` (see transfer_state), and the part is
renamed onto the target only once its sha256 matches. A new supervisor (after a kernel
restart) resumes a part from its sidecar; ``upload_begin`` says which ranges are still
missing.

Chunks are written by one thread of their own, in arrival order (so they hash as they
come): the kernel's thread only queues them, and answers a ping arriving behind a few MiB
of chunks at once.
"""

import json
import os
import queue
import re
import shutil
import stat
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import paths, wire
from .args import check_chunk_length, optional_mode, optional_mtime_ns
from .fsutil import O_BINARY, ensure_parent, refuse_directory, write_at
from .hashing import HashCache, hash_fd, require_unchanged
from .paths import PART_SUFFIX, SIDECAR_SUFFIX, side_path
from .supervisor import Deferred, Request, Supervisor
from .transfer_state import TransferState, parse_sidecar
from .wire import ErrorCode, OpError, arg

# Open upload part files kept between chunks; the least recently used are closed and
# reopened lazily by their next chunk, so abandoned uploads cannot use up descriptors.
MAX_OPEN_UPLOADS = 32
# A sidecar is rewritten at most this often while chunks arrive (and when the supervisor
# closes): a stale one only makes a resumed upload send a few chunks again.
SIDECAR_SAVE_INTERVAL_S = 0.5
# How long a commit waits for the chunks queued before it to be written.
COMMIT_WAIT_S = 120.0
#: chunk bytes accepted and not yet written, all uploads together
MAX_QUEUED_BYTES = 64 * 1024 * 1024

# Transfer ids, and the keys a client names content by before it has hashed it.
_TOKEN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _optional_sha256(args: Dict[str, Any]) -> str:
    """The ``sha256`` argument, lower case; "" when not given."""
    value = (arg(args, "sha256", str, "", allow_none=True) or "").lower()
    if value and not _SHA256.match(value):
        raise OpError(ErrorCode.INVALID_ARGUMENT, "sha256 must be 64 hex digits")
    return str(value)


class _Upload:
    """One upload in progress: its part file, sidecar and the ranges that have arrived."""

    def __init__(self, transfer_id: str, target: str, state: TransferState, chunk_size: int):
        self.transfer_id = transfer_id
        self.target = target
        self.part = side_path(target, PART_SUFFIX)
        self.sidecar = side_path(target, SIDECAR_SUFFIX)
        # Chunks usually arrive in order: the state hashes them as they come so commit need
        # not re-read the file.
        self.state = state
        self.chunk_size = chunk_size
        self.mode: Optional[int] = None
        self.mtime_ns: Optional[int] = None
        self.lock = threading.Lock()
        # Chunks accepted but not yet written; a commit waits for none to be left.
        self.pending = 0
        self.written = threading.Condition(self.lock)
        self.saved_at = 0.0
        self.fd: Optional[int] = None
        self.committing = False
        self.done = False

    @property
    def size(self) -> int:
        return self.state.size

    @property
    def sha256(self) -> str:
        return self.state.sha256

    def open(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.part, os.O_RDWR | O_BINARY)
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            finally:
                self.fd = None

    def save_sidecar(self) -> None:
        # Written after the data it describes: a sidecar never claims bytes not on disk.
        self.saved_at = time.monotonic()
        data = self.state.sidecar({"transfer_id": self.transfer_id, "target": self.target,
                                   "chunk_size": self.chunk_size, "updated": time.time()})
        with open(self.sidecar, "w", encoding="utf-8") as handle:
            json.dump(data, handle, separators=(",", ":"))

    def describe(self) -> Dict[str, Any]:
        return {"transfer_id": self.transfer_id, "path": self.target, "size": self.size,
                "sha256": self.sha256, "chunk_size": self.chunk_size,
                "received": [list(r) for r in self.state.received],
                "received_bytes": self.state.received_bytes,
                "complete": self.state.complete,
                "committing": self.committing}

    def remove_debris(self) -> List[str]:
        self.close()
        removed = []
        for path in (self.part, self.sidecar):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
        return removed


def _load_sidecar(target: str) -> Optional[Dict[str, Any]]:
    try:
        with open(side_path(target, SIDECAR_SUFFIX), encoding="utf-8") as handle:
            data = json.load(handle)
        part_size = os.stat(side_path(target, PART_SUFFIX)).st_size
    except (OSError, ValueError):
        return None
    return parse_sidecar(data, part_size)


class _ChunkWriter:
    """One thread running queued work in order (started with the first chunk).

    At most ``MAX_QUEUED_BYTES`` wait: past that ``submit`` blocks its caller (the kernel's
    comm thread) until the disk catches up, as writing inline did, so a client that sends
    faster than the disk writes, or ignores its window, cannot grow our memory.
    """

    def __init__(self, counters: Dict[str, int]) -> None:
        self._counters = counters  # the supervisor's, beside its other error counts
        self._queue: "queue.SimpleQueue[Optional[Tuple[Callable[[], None], int]]]" = \
            queue.SimpleQueue()
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._queued_bytes = 0
        self._thread: Optional[threading.Thread] = None

    def submit(self, work: Callable[[], None], nbytes: int = 0) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tether-upload",
                                                daemon=True)
                self._thread.start()
            while self._queued_bytes and self._queued_bytes + nbytes > MAX_QUEUED_BYTES:
                self._drained.wait(1.0)
            self._queued_bytes += nbytes
            self._queue.put((work, nbytes))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, nbytes = item
            try:
                work()
            except Exception:  # the one writer must outlive any chunk
                self._counters["upload_writer_errors"] += 1
            finally:
                with self._lock:
                    self._queued_bytes -= nbytes
                    self._drained.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


class Uploads:
    """The ``upload_*`` ops and the uploads in progress, least recently used first."""

    def __init__(self, supervisor: Supervisor, hashes: HashCache):
        self.supervisor = supervisor
        self.hashes = hashes
        self._lock = threading.Lock()
        self._uploads: "OrderedDict[str, _Upload]" = OrderedDict()  # least recent first
        self._writer = _ChunkWriter(supervisor.counters)

    def resolve(self, path: Any) -> str:
        return paths.resolve(self.supervisor.root_dir, path)

    def close(self) -> None:
        self._writer.close()  # the chunks already accepted are written first
        with self._lock:
            uploads = list(self._uploads.values())
            self._uploads.clear()
        for upload in uploads:
            with upload.lock:
                # The part and sidecar stay: a new supervisor resumes them.
                if not upload.done:
                    try:
                        upload.save_sidecar()
                    except OSError:
                        pass
                upload.close()

    def _upload(self, transfer_id: Any) -> _Upload:
        if not isinstance(transfer_id, str):
            raise OpError(ErrorCode.INVALID_ARGUMENT, "argument 'transfer_id' must be str")
        with self._lock:
            upload = self._uploads.get(transfer_id)
            if upload is not None:
                self._uploads.move_to_end(transfer_id)
        if upload is None or upload.done:
            raise OpError(ErrorCode.NOT_FOUND,
                          "unknown upload %r: call upload_begin again to resume it"
                          % transfer_id, {"transfer_id": transfer_id})
        return upload

    def _trim_open_uploads(self, keep: _Upload) -> None:
        """Close the least recently used part files beyond MAX_OPEN_UPLOADS (not ``keep``).

        A closed one reopens on its next chunk; one being committed is left alone (its
        commit reads the descriptor without the upload's lock). Call without any lock held.
        """
        with self._lock:
            open_ones = [u for u in self._uploads.values() if u.fd is not None and u is not keep]
            excess = len(open_ones) + (keep.fd is not None) - MAX_OPEN_UPLOADS
            candidates = open_ones[:max(0, excess)]
        for upload in candidates:
            with upload.lock:
                if not upload.committing:
                    upload.close()

    def _forget(self, upload: _Upload) -> None:
        upload.done = True
        with self._lock:
            if self._uploads.get(upload.transfer_id) is upload:
                del self._uploads[upload.transfer_id]

    def upload_begin(self, req: Request) -> Dict[str, Any]:
        """Start or resume an upload of ``size`` bytes to ``path``. Its content is named by
        ``sha256``, or, by a client that hashes while it sends, by a ``key`` of its own (the
        sha256 then comes with ``upload_commit``, and is checked all the same)."""
        args = req.args
        target = self.resolve(arg(args, "path", str))
        size = arg(args, "size", int)
        sha256 = _optional_sha256(args)
        key = arg(args, "key", str, "", allow_none=True) or ""
        chunk_size = arg(args, "chunk_size", int, wire.DEFAULT_CHUNK_BYTES)
        wanted_id = arg(args, "transfer_id", str, None, allow_none=True)
        mode = optional_mode(args)
        mtime_ns = optional_mtime_ns(args)
        make_dirs = arg(args, "make_dirs", bool, True)
        if size < 0:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "size must be >= 0")
        if key and not _TOKEN.match(key):
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "key must be 1-64 characters of [A-Za-z0-9_.-]")
        if not sha256 and not key:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "give the content's sha256, or a key "
                          "naming it and the sha256 at upload_commit")
        if not 0 < chunk_size <= wire.MAX_CHUNK_BYTES:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "chunk_size must be 1..%d"
                          % wire.MAX_CHUNK_BYTES)
        if wanted_id is not None and not _TOKEN.match(wanted_id):
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "transfer_id must be 1-64 characters of [A-Za-z0-9_.-]")
        refuse_directory(target)
        ensure_parent(target, make_dirs)

        with self._lock:
            current = next((u for u in self._uploads.values() if u.target == target), None)
            if wanted_id is not None:
                other = self._uploads.get(wanted_id)
                if other is not None and other.target != target:
                    raise OpError(ErrorCode.CONFLICT, "transfer_id %r is in use for %s"
                                  % (wanted_id, other.target), {"transfer_id": wanted_id})
            if current is not None and current.committing:
                raise OpError(ErrorCode.BUSY, "%s: an upload to this path is being committed"
                              % target, {"path": target})
            if current is not None and current.state.same_content(size, sha256, key):
                upload = current  # a retried or resumed begin: keep what arrived
                upload.state.sha256 = upload.state.sha256 or sha256
                upload.state.key = upload.state.key or key
            else:
                if current is not None:
                    self._uploads.pop(current.transfer_id, None)
                    current.done = True
                upload = None
        if current is not None and upload is None:
            with current.lock:
                current.remove_debris()  # a different file now goes to this path: restart
        if upload is None:
            upload = self._resume_or_create(target, size, sha256, key, chunk_size, wanted_id)
            with self._lock:
                self._uploads[upload.transfer_id] = upload
        else:
            with self._lock:
                if self._uploads.get(upload.transfer_id) is upload:
                    self._uploads.move_to_end(upload.transfer_id)
        upload.mode = mode
        upload.mtime_ns = mtime_ns
        self._trim_open_uploads(upload)
        return upload.describe()

    def _resume_or_create(self, target: str, size: int, sha256: str, key: str, chunk_size: int,
                          wanted_id: Optional[str]) -> _Upload:
        sidecar = _load_sidecar(target)
        if sidecar is not None:
            known = sidecar.get("sha256")
            state = TransferState.resume(
                size, known if isinstance(known, str) and _SHA256.match(known) else "",
                sidecar["received"], str(sidecar.get("key") or ""))
            if state.same_content(size, sha256, key):
                # Bytes from an earlier life: the state hashes the file at commit.
                state.sha256, state.key = state.sha256 or sha256, state.key or key
                return _Upload(wanted_id or str(sidecar.get("transfer_id") or uuid.uuid4().hex),
                               target, state, chunk_size)
        upload = _Upload(wanted_id or uuid.uuid4().hex, target, TransferState(size, sha256, key),
                         chunk_size)
        upload.remove_debris()  # another file's partial, or a damaged one
        try:
            free = shutil.disk_usage(os.path.dirname(target)).free
        except OSError:
            free = None
        if free is not None and free < size:
            raise OpError(ErrorCode.TOO_LARGE, "%s: %d bytes do not fit in %d free bytes"
                          % (target, size, free), {"path": target, "free": free})
        try:
            fd = os.open(upload.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC | O_BINARY, 0o666)
            upload.fd = fd
            os.ftruncate(fd, size)  # sparse: out-of-order chunks land where they belong
            upload.save_sidecar()
        except OSError as exc:
            upload.remove_debris()
            raise paths.os_error(exc, upload.part) from None
        return upload

    def upload_chunk(self, req: Request) -> Deferred:
        offset = arg(req.args, "offset", int)
        if not req.buffers:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "upload_chunk needs the bytes in buffers[1]")
        data = req.buffers[0]
        check_chunk_length(len(data), "chunk")
        upload = self._upload(req.args.get("transfer_id"))
        end = offset + len(data)
        if offset < 0 or end > upload.size:
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "chunk [%d, %d) lies outside the file's %d bytes"
                          % (offset, end, upload.size), {"size": upload.size})
        with upload.lock:
            if upload.committing or upload.done:
                raise OpError(ErrorCode.CONFLICT, "upload %s is being committed or is over"
                              % upload.transfer_id, {"transfer_id": upload.transfer_id})
            upload.pending += 1
        reply = self.supervisor.defer(req)
        self._writer.submit(lambda: self._write_chunk(upload, offset, data, reply), len(data))
        return reply

    def _write_chunk(self, upload: _Upload, offset: int, data: bytes, reply: Deferred) -> None:
        """Write one accepted chunk (the writer thread) and settle its reply."""
        try:
            with upload.lock:
                try:
                    if upload.done:
                        raise OpError(ErrorCode.CONFLICT, "upload %s is over"
                                      % upload.transfer_id, {"transfer_id": upload.transfer_id})
                    write_at(upload.open(), offset, data)
                    upload.state.add(offset, data)
                    if time.monotonic() - upload.saved_at >= SIDECAR_SAVE_INTERVAL_S:
                        upload.save_sidecar()
                except OSError as exc:
                    raise paths.os_error(exc, upload.part) from None
                finally:
                    upload.pending -= 1
                    upload.written.notify_all()
                result = {"received_bytes": upload.state.received_bytes,
                          "complete": upload.state.complete}
        except Exception as exc:
            reply.reject(exc)
            return
        self._trim_open_uploads(upload)
        reply.resolve(result)

    def upload_commit(self, req: Request) -> Dict[str, Any]:
        upload = self._upload(req.args.get("transfer_id"))
        sha256 = _optional_sha256(req.args)
        if_sha256 = arg(req.args, "if_sha256", str, None, allow_none=True)
        with upload.lock:
            if upload.committing:
                raise OpError(ErrorCode.BUSY, "upload %s is already being committed"
                              % upload.transfer_id)
            if sha256 and upload.sha256 and sha256 != upload.sha256:
                raise OpError(ErrorCode.INVALID_ARGUMENT, "upload %s was begun for sha256 %s, "
                              "not %s" % (upload.transfer_id, upload.sha256, sha256))
            if not (sha256 or upload.sha256):
                raise OpError(ErrorCode.INVALID_ARGUMENT, "upload %s was begun with a key only: "
                              "commit needs the sha256" % upload.transfer_id)
            upload.state.sha256 = upload.sha256 or sha256
            # Chunks accepted before this commit may still be queued for writing.
            deadline = time.monotonic() + COMMIT_WAIT_S
            while upload.pending and time.monotonic() < deadline:
                upload.written.wait(deadline - time.monotonic())
            if upload.pending:  # committing now would race the writes still queued
                raise OpError(ErrorCode.BUSY, "upload %s: %d chunk(s) still being written; "
                              "commit again" % (upload.transfer_id, upload.pending))
            missing = upload.state.missing()
            if missing:
                received = upload.state.received_bytes
                raise OpError(ErrorCode.CONFLICT,
                              "%s: upload incomplete: %d of %d bytes received"
                              % (upload.target, received, upload.size),
                              {"reason": "incomplete", "missing": missing[:1000],
                               "received_bytes": received, "size": upload.size})
            upload.committing = True
        try:
            return self._commit(upload, if_sha256)
        finally:
            upload.committing = False

    def _commit(self, upload: _Upload, if_sha256: Optional[str] = None) -> Dict[str, Any]:
        try:
            fd = upload.open()
            st = os.fstat(fd)
            hasher, start = upload.state.hash_resume()
            hasher, end = hash_fd(fd, start, hasher)
            actual = hasher.hexdigest()
            upload.close()
        except OSError as exc:
            raise paths.os_error(exc, upload.part) from None
        if st.st_size != upload.size or end != upload.size or actual != upload.sha256:
            upload.remove_debris()
            self._forget(upload)
            raise OpError(ErrorCode.CONFLICT,
                          "%s: upload does not match: expected %d bytes with sha256 %s, got "
                          "%d bytes with sha256 %s; the partial file was removed, upload again"
                          % (upload.target, upload.size, upload.sha256, st.st_size, actual),
                          {"reason": "hash_mismatch", "path": upload.target,
                           "expected_sha256": upload.sha256, "actual_sha256": actual,
                           "expected_size": upload.size, "actual_size": st.st_size})
        mode = upload.mode
        if mode is None:
            try:
                existing = os.stat(upload.target)
                if stat.S_ISREG(existing.st_mode):
                    mode = stat.S_IMODE(existing.st_mode)
            except OSError:
                pass
        try:
            if mode is not None:
                os.chmod(upload.part, mode & 0o7777)
            if upload.mtime_ns is not None:
                os.utime(upload.part, ns=(upload.mtime_ns, upload.mtime_ns))
            refuse_directory(upload.target)
            require_unchanged(upload.target, if_sha256)  # the part file stays: commit again
            os.replace(upload.part, upload.target)
        except OSError as exc:
            raise paths.os_error(exc, upload.target) from None
        try:
            os.unlink(upload.sidecar)
        except OSError:
            pass
        self._forget(upload)
        try:
            self.hashes.put(upload.target, os.stat(upload.target), actual)
        except OSError:
            pass
        return {"path": upload.target, "size": upload.size, "sha256": actual}
