"""One forwarded connection on the remote: its socket, its credit, and its socket chores.

``streams.StreamService`` owns the streams and the I/O thread; this module holds what one
stream is (``Stream``), the batch of items waiting for one channel (``Batch``), and the
socket steps that need no service state: starting a connect, saying why it failed,
closing with or without a reset. Standard library only.
"""

import collections
import errno
import socket
import struct
import time
from typing import Any, Deque, List, Optional, Tuple

from . import stream_state as st
from .fsutil import wait_ready
from .supervisor import Deferred
from .wire import ErrorCode, OpError

CONNECT_TIMEOUT_S = 10.0


class Stream:
    """One forwarded connection: its remote socket and both directions' credit."""

    __slots__ = ("channel", "connect_deadline", "connecting", "deferred", "down", "host",
                 "key", "mask", "opened_at", "out_eof", "outq", "port", "read_done", "sock",
                 "up", "wr_shut")

    def __init__(self, key: Tuple[str, int], sock: Optional[socket.socket], channel: Any,
                 host: str, port: int, window: int):
        self.key = key
        self.sock = sock
        self.channel = channel
        self.host = host
        self.port = port
        self.down = st.SendCredit(window)  # remote socket -> controller
        self.up = st.ReceiveCredit(window)  # controller -> remote socket
        self.outq: Deque[bytes] = collections.deque()
        self.out_eof = False  # the controller finished sending: shut down once drained
        self.wr_shut = False
        self.read_done = False  # the remote end finished sending (or failed)
        self.mask = 0
        self.opened_at = time.time()
        self.connecting = False  # a non-blocking connect in progress
        self.connect_deadline = 0.0
        self.deferred: Optional[Deferred] = None  # the open's reply, until connected


class Batch:
    """Items and blobs waiting to be pushed to one channel."""

    __slots__ = ("blobs", "bytes", "channel", "items", "owner")

    def __init__(self, channel: Any, owner: str):
        self.channel = channel
        self.owner = owner
        self.items: List[List[Any]] = []
        self.blobs: List[bytes] = []
        self.bytes = 0


def channel_key(channel: Any) -> Any:
    """What tells channels apart (a comm's id; the object itself for in-process ones)."""
    return getattr(channel, "comm_id", None) or id(channel)


def literal_family(host: str) -> Optional[int]:
    """The address family of an IP address literal, None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return family
    return None


def start_connect(host: str, port: int, family: int) -> Tuple[socket.socket, Optional[int]]:
    """Begin a non-blocking connect to an address: the socket, and the connect's result
    code (0: connected, else an errno), or None while it is still in progress."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    code = sock.connect_ex((host, port))
    if code in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
        return sock, None
    return sock, code


def connect_done(sock: socket.socket) -> bool:
    """Whether a non-blocking connect has ended (writable), without waiting."""
    try:
        return wait_ready(sock.fileno(), write=True)
    except (OSError, ValueError):
        return False


def connect_by_name(host: str, port: int) -> socket.socket:
    """Resolve and connect (blocking: a connector thread calls it); raises ``OSError``."""
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect_error(exc: OSError, host: str, port: int) -> OpError:
    """Why a connect failed, as the controller shows it."""
    where = {"host": host, "port": port}
    if isinstance(exc, socket.timeout) or exc.errno == errno.ETIMEDOUT:  # 3.9: not TimeoutError
        return OpError(ErrorCode.TIMEOUT, "connecting to %s:%d on the remote timed out after "
                       "%gs" % (host, port, CONNECT_TIMEOUT_S), where)
    if isinstance(exc, socket.gaierror):
        return OpError(ErrorCode.INVALID_ARGUMENT, "cannot resolve %r on the remote: %s"
                       % (host, exc), where)
    if exc.errno == errno.ECONNREFUSED:
        return OpError(ErrorCode.NOT_FOUND, "nothing listens on %s:%d on the remote "
                       "(connection refused): start the server there first, or check the "
                       "port" % (host, port), where)
    return OpError(ErrorCode.NOT_FOUND, "cannot connect to %s:%d on the remote: %s"
                   % (host, port, exc.strerror or exc), where)


def close_quietly(sock: socket.socket) -> None:
    """Close, ignoring a socket that is already broken."""
    try:
        sock.close()
    except OSError:
        pass


def reset_socket(sock: socket.socket) -> None:
    """Close with RST: the peer sees the connection fail rather than end normally."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    close_quietly(sock)
