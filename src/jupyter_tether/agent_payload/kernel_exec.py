"""Run code in a work kernel on this host over its own ZMQ ports: one reply per cell.

Over the server's websocket a cell comes back as four or five messages, and behind a proxy
each small message after the first of a burst can wait ~40 ms for a delayed ACK. So the
supervisor reads the work kernel's connection file (``kernel-<id>.json``, beside its own)
and talks to its ports with jupyter_client's ``Session``: the outputs come back in the
reply, one comm message. A cell running past ``STREAM_AFTER_S`` streams what it prints as
``exec_output`` events (a console sees it live); the reply says how many there were.

Bounded per batch: each stream's last ``max_output_chars * 2`` chars, at most
``MAX_BATCH_OUTPUTS`` outputs / ``MAX_BATCH_BYTES`` (the rest counted as omitted; the cell's
``execute_result`` always kept); the controller applies its exec limits on top.

Where this cannot work (no connection file: a gateway's remote kernels; no pyzmq or
jupyter_client; ports we cannot reach) ``kernel_exec`` answers ``not_found`` with
``details.local_exec = "unavailable"`` (and ``lasting`` where it never will work) before
anything ran: the controller uses the websocket. A kernel that dies or restarts under a
running cell answers ``"kernel_lost"``. Timeouts interrupt through the server.
"""

import collections
import json
import os
import threading
import time
import uuid
from typing import Any, Deque, Dict, List, Optional, Tuple

from .args import int_arg
from .procs import same_process, start_token
from .supervisor import Deferred, Request, Supervisor
from .wire import ErrorCode, Op, OpError, arg

MIB = 1024 * 1024

STREAM_AFTER_S = 0.1  # a cell done sooner is one reply; a longer one streams its outputs
# An output waits this long for more (or for the reply, which then carries it): events at
# most once per tick, none just before the reply (two small messages: a delayed ACK).
FLUSH_TICK_S = 0.05
MAX_BATCH_OUTPUTS = 200
MAX_BATCH_BYTES = 16 * MIB
MIN_STREAM_CHARS = 64 * 1024
UNLIMITED_STREAM_CHARS = 8 * MIB
IDLE_GRACE_S = 2.0  # outputs may trail the execute_reply until the idle status
NUDGE_INTERVAL_S = 0.02  # doubling up to NUDGE_MAX_INTERVAL_S
NUDGE_MAX_INTERVAL_S = 0.5
NUDGE_TIMEOUT_S = 5.0  # a kernel whose shell and iopub do not both answer by then: unusable
# A cell running this long has its kernel watched: its process where /proc shows it (the
# command line names the connection file), else its heartbeat. The process is the sure
# sign: a kernel restarted on the same ports would answer the heartbeat for the dead one.
WATCH_AFTER_S = 0.5
WATCH_INTERVAL_S = 0.5
HB_DEAD_S = 10.0  # no heartbeat for this long: the kernel died (no /proc here)
MAX_KERNELS = 16
MAX_CODE_CHARS = 64 * MIB
OUTPUT_TYPES = ("stream", "display_data", "execute_result", "error")


def unavailable(message: str, lasting: bool = False) -> OpError:
    """Nothing ran; ``lasting``: never reachable from here (the client stops asking)."""
    extra = {"lasting": True} if lasting else {}
    return OpError(ErrorCode.NOT_FOUND, message, {"local_exec": "unavailable", **extra})


def own_connection_file() -> Optional[str]:
    """The supervisor kernel's own connection file (None outside a kernel)."""
    try:
        from ipykernel.connect import get_connection_file

        return os.path.abspath(get_connection_file())
    except Exception:  # not in a kernel (tests), or an ipykernel without it
        return None


def connection_dirs() -> List[str]:
    """Where the server writes kernels' connection files: beside the supervisor kernel's own
    (what the server gave it), then the Jupyter runtime dir."""
    found: List[str] = []
    own = own_connection_file()
    if own is not None:
        found.append(os.path.dirname(own))
    try:
        from jupyter_core.paths import jupyter_runtime_dir

        found.append(jupyter_runtime_dir())
    except Exception:
        pass
    return [d for i, d in enumerate(found) if d and d not in found[:i]]


def find_connection_file(kernel_id: str) -> Optional[str]:
    name = "kernel-%s.json" % kernel_id
    for folder in connection_dirs():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def kernel_processes(path: str) -> List[Tuple[int, str]]:
    """The processes whose command line names the connection file ``path`` (the kernel and
    any launcher around it), with their start tokens; [] without /proc."""
    found: List[Tuple[int, str]] = []
    wanted = os.fsencode(path)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if wanted in args or any(a.endswith(b"=" + wanted) for a in args):
            token = start_token(int(entry))
            if token is not None:
                found.append((int(entry), token))
    return found


def _stamp(path: str) -> Tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _approx_size(content: Dict[str, Any]) -> int:
    size = 100
    for key in ("data", "text", "traceback", "evalue"):
        value = content.get(key)
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, dict):
            size += sum(len(v) if isinstance(v, str) else 100 for v in value.values())
        elif isinstance(value, list):
            size += sum(len(v) if isinstance(v, str) else 100 for v in value)
    return size


class _Exec:
    """One cell in flight: what came back so far, bounded per batch."""

    def __init__(self, exec_id: str, msg: Dict[str, Any], deferred: Deferred,
                 max_output_chars: int):
        self.exec_id = exec_id
        self.msg = msg
        self.msg_id = msg["header"]["msg_id"]
        self.deferred = deferred
        self.started = time.monotonic()
        self.sent = False
        self.stream_cap = (max(2 * max_output_chars, MIN_STREAM_CHARS) if max_output_chars > 0
                           else UNLIMITED_STREAM_CHARS)
        self.outputs: List[List[Any]] = []
        self.batch_bytes = 0
        self.omitted = 0
        self.omitted_chars = 0
        self.events = 0
        self.batch_since = 0.0  # when the batch's first output came (0: empty batch)
        self.reply: Optional[Dict[str, Any]] = None
        self.reply_at = 0.0
        self.idle = False

    def add(self, msg_type: str, content: Dict[str, Any]) -> None:
        if not self.batch_since:
            self.batch_since = time.monotonic()
        if msg_type == "stream":
            name = str(content.get("name", "stdout"))
            text = content.get("text", "")
            text = text if isinstance(text, str) else str(text)
            last = self.outputs[-1] if self.outputs else None
            if last is not None and last[0] == "stream" and last[1]["name"] == name:
                entry = last[1]
                entry["text"] += text
            else:
                entry = {"name": name, "text": text, "dropped": 0}
                self.outputs.append(["stream", entry])
            if len(entry["text"]) > self.stream_cap:
                cut = len(entry["text"]) - self.stream_cap
                entry["text"] = entry["text"][cut:]
                entry["dropped"] += cut
            return
        size = _approx_size(content)
        if msg_type != "execute_result" and (len(self.outputs) >= MAX_BATCH_OUTPUTS
                                             or self.batch_bytes + size > MAX_BATCH_BYTES):
            self.omitted += 1
            self.omitted_chars += size
            return
        self.batch_bytes += size
        self.outputs.append([msg_type, content])

    def take(self) -> Dict[str, Any]:
        """The batch so far (and its counts), leaving an empty one."""
        batch = {"outputs": self.outputs, "omitted": self.omitted,
                 "omitted_chars": self.omitted_chars}
        self.outputs, self.batch_bytes, self.omitted, self.omitted_chars = [], 0, 0, 0
        self.batch_since = 0.0
        return batch


class LocalKernel:
    """One work kernel's ports, all driven from one thread (ZMQ sockets are not
    thread-safe): callers queue cells and wake it through a pipe."""

    def __init__(self, sup: Supervisor, kernel_id: str, path: str):
        import zmq
        from jupyter_client.session import Session

        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        self.stamp = _stamp(path)
        self.sup = sup
        self.kernel_id = kernel_id
        self.path = path
        self.used_at = time.monotonic()
        self._zmq = zmq
        key = info.get("key") or ""
        self.session = Session(key=key.encode("utf-8"), username="jupyter-tether",
                               signature_scheme=info.get("signature_scheme", "hmac-sha256"))
        transport, ip = info.get("transport", "tcp"), info.get("ip", "127.0.0.1")

        def url(port_name: str) -> str:
            port = info[port_name]
            if transport == "ipc":
                return "ipc://%s-%s" % (ip, port)
            return "tcp://%s:%s" % ("127.0.0.1" if ip in ("0.0.0.0", "") else ip, port)

        urls = {name: url(name) for name in ("shell_port", "control_port", "iopub_port",
                                             "hb_port")}  # a KeyError before any socket
        self.ctx = zmq.Context()
        self.shell = self.ctx.socket(zmq.DEALER)
        self.shell.setsockopt(zmq.IDENTITY, self.session.bsession)
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, self.session.bsession)
        self.iopub = self.ctx.socket(zmq.SUB)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.hb = self.ctx.socket(zmq.REQ)
        self.hb.setsockopt(zmq.REQ_RELAXED, 1)
        self.hb.setsockopt(zmq.REQ_CORRELATE, 1)
        for sock in (self.shell, self.control, self.iopub, self.hb):
            sock.setsockopt(zmq.LINGER, 0)
        self.shell.connect(urls["shell_port"])
        self.control.connect(urls["control_port"])
        self.iopub.connect(urls["iopub_port"])
        self.hb.connect(urls["hb_port"])
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._queue: Deque[_Exec] = collections.deque()
        self._pending: Dict[str, _Exec] = {}
        # The kernel answered on control and our iopub subscription saw its status: iopub
        # (a late joiner: a subscription drops what was sent before it took) is live.
        self.ready = False
        self._reply_seen = False
        self._iopub_seen = False
        self.closed = False
        self._nudges: List[str] = []
        self._hb_sent_at = 0.0
        self._hb_seen_at = 0.0
        self._procs: List[Tuple[int, str]] = []  # the kernel's processes, found when ready
        self._thread = threading.Thread(target=self._loop, name="tether-exec-%s" % kernel_id[:8],
                                        daemon=True)
        self._thread.start()

    # --- any thread -----------------------------------------------------------------------

    def submit(self, cell: _Exec) -> None:
        with self._lock:
            if self.closed:
                raise unavailable("the connection to kernel %s was closed" % self.kernel_id)
            self._queue.append(cell)
            self.used_at = time.monotonic()
        self._wake()

    def busy(self) -> bool:
        with self._lock:
            return bool(self._queue or self._pending)

    def close(self) -> None:
        with self._lock:
            self.closed = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # --- the kernel's thread --------------------------------------------------------------

    def _loop(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        for sock in (self.shell, self.control, self.iopub, self.hb):
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        started = time.monotonic()
        next_nudge = started
        interval = NUDGE_INTERVAL_S
        error: Optional[OpError] = None
        try:
            while True:
                now = time.monotonic()
                with self._lock:
                    if self.closed:
                        break
                    queued = list(self._queue) if self.ready else []
                    if self.ready:
                        self._queue.clear()
                    waiting = bool(self._queue)
                for cell in queued:
                    self._send(self.shell, cell.msg)
                    cell.sent = True
                    cell.started = time.monotonic()
                    self._pending[cell.msg_id] = cell
                if not self.ready:
                    if now - started > NUDGE_TIMEOUT_S:
                        error = unavailable("kernel %s did not answer on its ZMQ ports within "
                                            "%gs" % (self.kernel_id, NUDGE_TIMEOUT_S))
                        break
                    if now >= next_nudge:
                        # On control: answered even while the shell runs someone's cell.
                        nudge = self.session.msg("kernel_info_request", {})
                        self._nudges.append(nudge["header"]["msg_id"])
                        self._send(self.control, nudge)
                        next_nudge = now + interval
                        interval = min(interval * 2, NUDGE_MAX_INTERVAL_S)
                lost = self._timers(now)
                if lost:
                    error = OpError(ErrorCode.NOT_FOUND, lost, {"local_exec": "kernel_lost"})
                    break
                timeout = self._next_timeout(now, next_nudge if not self.ready else None,
                                             waiting)
                events = dict(poller.poll(timeout * 1000))
                if self._wake_r in events:
                    os.read(self._wake_r, 4096)
                if self.hb in events:
                    self._drain(self.hb, self._on_hb)
                if self.control in events:
                    self._drain(self.control, self._on_control)
                if self.shell in events:
                    self._drain(self.shell, self._on_shell)
                if self.iopub in events:
                    lost = self._drain(self.iopub, self._on_iopub)
                    if lost:
                        error = OpError(ErrorCode.NOT_FOUND, lost, {"local_exec": "kernel_lost"})
                        break
        except Exception as exc:  # never leave a cell unanswered
            error = OpError(ErrorCode.INTERNAL, "exec in kernel %s failed: %s: %s"
                            % (self.kernel_id, type(exc).__name__, exc))
        finally:
            with self._lock:
                self.closed = True
                cells = list(self._queue) + list(self._pending.values())
                self._queue.clear()
                self._pending.clear()
            for cell in cells:
                if not cell.sent:  # never reached the kernel: the controller may send it again
                    cell.deferred.reject(error if error is not None and error.details.get(
                        "local_exec") == "unavailable" else unavailable(
                        "the connection to kernel %s closed" % self.kernel_id))
                elif error is not None and error.details.get("local_exec") == "unavailable":
                    # Sent, so it may have run: never let the controller send it again.
                    cell.deferred.reject(OpError(ErrorCode.INTERNAL, error.message))
                else:
                    cell.deferred.reject(error or OpError(
                        ErrorCode.INTERNAL, "the supervisor stopped while the code ran in "
                        "kernel %s; it may still be running there" % self.kernel_id))
            for sock in (self.shell, self.control, self.iopub, self.hb):
                sock.close(0)
            self.ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _send(self, sock: Any, msg: Dict[str, Any]) -> None:
        self.session.send(sock, msg)

    def _drain(self, sock: Any, handle: Any) -> Optional[str]:
        zmq = self._zmq
        for _ in range(1000):  # then poll again: timers and other sockets get a turn
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            if sock is self.hb:
                handle(frames)
                continue
            try:
                _, parts = self.session.feed_identities(frames)
                msg = self.session.deserialize(parts, content=True)
            except Exception:
                self.sup.counters["kernel_exec_bad_messages"] += 1
                continue
            lost = handle(msg)
            if lost:
                return str(lost)
        return None

    def _on_hb(self, frames: List[bytes]) -> None:
        self._hb_seen_at = time.monotonic()

    def _on_control(self, msg: Dict[str, Any]) -> None:
        parent = (msg.get("parent_header") or {}).get("msg_id")
        if not self.ready and parent in self._nudges:
            self._reply_seen = True
            self._check_ready()

    def _on_shell(self, msg: Dict[str, Any]) -> None:
        parent = str((msg.get("parent_header") or {}).get("msg_id"))
        cell = self._pending.get(parent)
        if cell is None or msg.get("msg_type") != "execute_reply":
            return
        cell.reply = msg.get("content") or {}
        cell.reply_at = time.monotonic()
        if cell.idle:
            self._finish(cell)

    def _on_iopub(self, msg: Dict[str, Any]) -> Optional[str]:
        msg_type = msg.get("msg_type")
        content = msg.get("content") or {}
        if msg_type == "shutdown_reply":
            # Shut down or restarting: whatever runs is lost, and a restarted kernel needs
            # a fresh subscription (the next cell makes a new LocalKernel).
            return "kernel %s was shut down or restarted while running the code; its state " \
                   "is gone" % self.kernel_id
        parent = str((msg.get("parent_header") or {}).get("msg_id"))
        if not self.ready:
            if parent in self._nudges:
                self._iopub_seen = True
                self._check_ready()
            return None
        cell = self._pending.get(parent)
        if cell is None:
            return None
        if msg_type == "status":
            if content.get("execution_state") == "idle":
                cell.idle = True
                if cell.reply is not None:
                    self._finish(cell)
        elif msg_type in OUTPUT_TYPES:
            cell.add(msg_type, content)
            if cell.batch_bytes >= MAX_BATCH_BYTES:
                self._flush(cell)
        return None

    def _check_ready(self) -> None:
        if self._reply_seen and self._iopub_seen:
            self.ready = True
            self._nudges = []
            # Now, while it surely lives: a cell may end the process at once.
            self._procs = kernel_processes(self.path)

    def _flush(self, cell: _Exec) -> None:
        if not (cell.outputs or cell.omitted):
            return
        body = cell.take()
        body.update({"exec_id": cell.exec_id, "index": cell.events})
        cell.events += 1
        self.sup.emit("exec_output", body)

    def _finish(self, cell: _Exec) -> None:
        self._pending.pop(cell.msg_id, None)
        result = cell.take()
        result.update({"exec_id": cell.exec_id, "reply": cell.reply, "events": cell.events,
                       "idle": cell.idle, "kernel_id": self.kernel_id})
        cell.deferred.resolve(result)

    def _timers(self, now: float) -> Optional[str]:
        """Streams, idle grace and the kernel watch; a message when the kernel is gone."""
        watch = False
        for cell in list(self._pending.values()):
            if cell.reply is not None and now - cell.reply_at >= IDLE_GRACE_S:
                self._finish(cell)  # iopub lost the idle status: the reply must not wait on
                continue
            if cell.batch_since and now >= self._flush_due(cell):
                self._flush(cell)
            watch = watch or now - cell.started >= WATCH_AFTER_S
        if not watch:
            self._hb_seen_at = self._hb_sent_at = 0.0
            return None
        if now - self._hb_sent_at < WATCH_INTERVAL_S:
            return None
        gone = ("kernel %s died or restarted while running the code; its state is gone"
                % self.kernel_id)
        if self._procs:
            self._hb_sent_at = now
            return None if any(same_process(p, t) for p, t in self._procs) else gone
        if not self._hb_sent_at:
            self._hb_seen_at = now  # the watch starts now
        self.hb.send(b"ping")
        self._hb_sent_at = now
        if now - self._hb_seen_at > HB_DEAD_S:
            return gone
        return None

    @staticmethod
    def _flush_due(cell: _Exec) -> float:
        return max(cell.started + STREAM_AFTER_S, cell.batch_since + FLUSH_TICK_S)

    def _next_timeout(self, now: float, next_nudge: Optional[float], waiting: bool) -> float:
        """Seconds until a timer is due (at most 1 s: the heartbeat's granularity)."""
        due = [now + 1.0]
        if next_nudge is not None:
            due.append(next_nudge)
        for cell in self._pending.values():
            if cell.reply is not None:
                due.append(cell.reply_at + IDLE_GRACE_S)
            elif cell.outputs or cell.omitted:
                due.append(self._flush_due(cell))
        if waiting:
            due.append(now + NUDGE_INTERVAL_S)
        return max(min(due) - now, 0.001)


class KernelExec:
    """The ``kernel_exec`` op: one ``LocalKernel`` per work kernel, made on first use."""

    def __init__(self, supervisor: Supervisor):
        self.sup = supervisor
        self._lock = threading.Lock()
        self._kernels: Dict[str, LocalKernel] = {}

    def _kernel(self, kernel_id: str) -> LocalKernel:
        if os.name == "nt":  # the wake pipe cannot be polled with ZMQ sockets there
            raise unavailable("the supervisor drives work kernels itself on POSIX hosts only",
                              lasting=True)
        path = find_connection_file(kernel_id)
        if path is not None and path == own_connection_file():
            raise OpError(ErrorCode.INVALID_ARGUMENT, "kernel %s runs the supervisor: user "
                          "code runs in a work kernel" % kernel_id)
        try:
            stamp = _stamp(path) if path is not None else None
        except OSError:
            stamp = None
        if path is None or stamp is None:
            raise unavailable("no connection file for kernel %s on this host (a remote or "
                              "gateway kernel, or one that is gone)" % kernel_id, lasting=True)
        with self._lock:
            kernel = self._kernels.get(kernel_id)
            if kernel is not None and (kernel.closed or kernel.stamp != stamp):
                kernel.close()  # gone, or restarted with a new connection file
                kernel = None
            if kernel is None:
                try:
                    kernel = LocalKernel(self.sup, kernel_id, path)
                except ImportError as exc:
                    raise unavailable("pyzmq or jupyter_client is missing here: %s"
                                      % exc, lasting=True) from None
                except (OSError, ValueError, KeyError) as exc:
                    raise unavailable("cannot use kernel %s's connection file %s: %s"
                                      % (kernel_id, path, exc)) from None
                self._kernels[kernel_id] = kernel
                self._evict()
            return kernel

    def _evict(self) -> None:
        """Call with the lock held: the least recently used idle kernels go past the cap."""
        idle = sorted((k for k in self._kernels.values() if not k.busy()),
                      key=lambda k: k.used_at)
        while len(self._kernels) > MAX_KERNELS and idle:
            kernel = idle.pop(0)
            kernel.close()
            del self._kernels[kernel.kernel_id]

    def op_exec(self, req: Request) -> Deferred:
        args = req.args
        kernel_id = arg(args, "kernel_id", str)
        if not kernel_id or "/" in kernel_id or len(kernel_id) > 128:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "kernel_id %r is not a kernel id"
                          % kernel_id[:40])
        code = arg(args, "code", str)
        if len(code) > MAX_CODE_CHARS:
            raise OpError(ErrorCode.TOO_LARGE, "code of %d chars is over %d"
                          % (len(code), MAX_CODE_CHARS))
        exec_id = arg(args, "exec_id", str, "") or uuid.uuid4().hex
        max_chars = int_arg(args, "max_output_chars", 20000, -1, 1 << 40)
        expressions = arg(args, "user_expressions", dict, {})
        kernel = self._kernel(kernel_id)
        msg = kernel.session.msg("execute_request", {
            "code": code, "silent": bool(arg(args, "silent", bool, False)),
            "store_history": bool(arg(args, "store_history", bool, True)),
            "user_expressions": expressions, "allow_stdin": False,
            "stop_on_error": bool(arg(args, "stop_on_error", bool, True))})
        deferred = self.sup.defer(req)
        kernel.submit(_Exec(exec_id, msg, deferred, max_chars))
        return deferred

    def close(self) -> None:
        with self._lock:
            kernels = list(self._kernels.values())
            self._kernels.clear()
        for kernel in kernels:
            kernel.close()


def register(supervisor: Supervisor) -> None:
    service = KernelExec(supervisor)
    supervisor.register(Op.KERNEL_EXEC, service.op_exec)
    supervisor.add_closer(service.close)
