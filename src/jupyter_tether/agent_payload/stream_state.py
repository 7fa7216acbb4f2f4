"""Pure protocol state of forwarded TCP streams, shared by both ends: credit and limits.

No I/O here: the supervisor's stream service (``streams``) and the controller's port forwards
(``controller/forward``) both keep one ``SendCredit`` and one ``ReceiveCredit`` per stream and
ask them what to do, so the flow control is the same object on both sides of the wire.

Flow control: a sender may have at most ``window`` bytes that the receiver has not consumed
(written to its local socket). The receiver reports its running total of consumed bytes
once at least a quarter window has built up since its last report, so a sender is never
stalled while bytes are consumed, and neither side ever buffers more than one window.

Messages from the supervisor to one controller (never broadcast, never replayed)::

    {"type": "stream", "owner": OWNER, "items": [[sid, kind, value], ...]}

with one blob per ``data`` item, in order. Kinds: ``data`` (value: its offset in the
stream, so a lost message is noticed), ``eof``
(the remote end finished sending), ``reset`` (value: why), ``ack`` (value: running total of
bytes written to the remote socket). Standard library only; Python >= 3.9.
"""

from typing import Any, Callable, Collection, Dict, List, Optional, Set, Tuple

from .wire import ErrorCode, OpError, arg

KIB = 1024
MIB = 1024 * 1024

ENVELOPE_TYPE = "stream"
DATA = "data"
EOF = "eof"
RESET = "reset"
ACK = "ack"
KINDS = (DATA, EOF, RESET, ACK)

# Everything a stream has in flight sits in the same queues (iopub, the server's websocket) as
# the replies to small calls: the window is how long a ping waits behind a saturated tunnel.
# bench/bench_forward.py, one 64 MiB GET saturating the link: a 1 MiB window gives ping p99
# 17 ms and 185 MiB/s, 2 MiB 22-25 ms and 257 MiB/s, 4 MiB 25-32 ms and 245-276 MiB/s.
DEFAULT_WINDOW = 1 * MIB
MIN_WINDOW = 64 * KIB
MAX_WINDOW = 16 * MIB
#: the most bytes one write may carry (well under the 10 MiB client frame limit)
MAX_WRITE_BYTES = MIB
#: streams one supervisor keeps open, in all and per controller
MAX_STREAMS = 512
MAX_STREAMS_PER_OWNER = 256
MAX_OWNER_CHARS = 64
MAX_SID = (1 << 53) - 1
MAX_HOST_CHARS = 255
#: the longest reset reason either side passes on
MAX_REASON_CHARS = 300
#: hosts a stream may reach without ``allow_remote_host``: the remote machine itself
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class SendCredit:
    """The sending side of one direction: ``sent`` bytes so far, ``acked`` consumed by the peer."""

    __slots__ = ("acked", "sent", "window")

    def __init__(self, window: int = DEFAULT_WINDOW):
        self.window = window
        self.sent = 0
        self.acked = 0

    @property
    def available(self) -> int:
        """How many more bytes may go out now."""
        return max(0, self.window - (self.sent - self.acked))

    def on_sent(self, count: int) -> None:
        self.sent += count

    def on_ack(self, total: Any) -> bool:
        """A running total from the peer; False (and ignored) when it is impossible."""
        if not isinstance(total, int) or isinstance(total, bool) or total > self.sent:
            return False
        if total > self.acked:
            self.acked = total
        return True


class ReceiveCredit:
    """The receiving side of one direction: what arrived, what was consumed, what was told."""

    __slots__ = ("consumed", "received", "reported", "window")

    def __init__(self, window: int = DEFAULT_WINDOW):
        self.window = window
        self.received = 0
        self.consumed = 0
        self.reported = 0

    @property
    def buffered(self) -> int:
        return self.received - self.consumed

    def on_data(self, count: int) -> bool:
        """Bytes arrived; False when the peer overran the window (a broken or hostile peer)."""
        self.received += count
        return self.received - self.reported <= self.window

    def on_consumed(self, count: int) -> Optional[int]:
        """Bytes written out locally; the running total to report, when a report is due."""
        self.consumed += count
        if self.consumed - self.reported >= max(1, self.window // 4):
            self.reported = self.consumed
            return self.consumed
        return None


def window_arg(args: Dict[str, Any], name: str = "window") -> int:
    """A window asked for, clamped to the limits (a tiny window would stall, a huge one
    would let one stream hold a lot of memory)."""
    value = arg(args, name, int, DEFAULT_WINDOW)
    return max(MIN_WINDOW, min(MAX_WINDOW, value))


def check_port(port: Any, what: str = "port") -> int:
    """A TCP port 1..65535, or OpError(invalid_argument) saying what is wrong."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise OpError(ErrorCode.INVALID_ARGUMENT,
                      "%s must be a TCP port number 1..65535, got %r" % (what, port))
    return port


def check_host(host: Any, allow_remote_host: bool) -> str:
    """The host a stream may connect to: the remote's loopback, anything else only when the
    client asked for it explicitly (a forward is not an open proxy into the remote's network)."""
    # No control characters: the host is echoed in messages a terminal or an agent reads.
    if not isinstance(host, str) or not host or len(host) > MAX_HOST_CHARS \
            or any(c in "/ " or not c.isprintable() for c in host):
        raise OpError(ErrorCode.INVALID_ARGUMENT, "remote_host must be a host name or address, "
                      "got %r" % (host,))
    try:  # what the resolver would refuse with UnicodeError (an empty or 64+ char label)
        host.encode("idna")
    except UnicodeError:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "remote_host %r is not a valid host name "
                      "(each dot-separated part 1..63 chars)" % (host,)) from None
    if host.lower() not in LOOPBACK_HOSTS and not allow_remote_host:
        raise OpError(ErrorCode.PERMISSION_DENIED,
                      "connecting to %s from the remote needs allow_remote_host=True: a forward "
                      "reaches the remote's own loopback (127.0.0.1) unless asked otherwise"
                      % host, {"host": host})
    return host


def clean_reason(value: Any, limit: int = MAX_REASON_CHARS) -> str:
    """A peer's reason as one bounded line: control characters (a terminal's escapes, line
    breaks) become spaces, so it can be shown in a terminal line or a tool result as is."""
    text = value if isinstance(value, str) else repr(value)
    return "".join(c if c.isprintable() else " " for c in text[:limit])


def check_owner(args: Dict[str, Any]) -> str:
    owner = arg(args, "owner", str)
    if not 1 <= len(owner) <= MAX_OWNER_CHARS:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "owner must have 1 to %d chars"
                      % MAX_OWNER_CHARS)
    return owner


def check_sid(value: Any, what: str = "sid") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SID:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "%s must be an integer 1..2**53-1, got %r"
                      % (what, value))
    return value


def sid_list(args: Dict[str, Any], name: str) -> List[int]:
    values = arg(args, name, list, [])
    if len(values) > MAX_STREAMS:
        raise OpError(ErrorCode.TOO_LARGE, "%s lists more than %d streams" % (name, MAX_STREAMS))
    return [check_sid(v, name) for v in values]


def parse_items(envelope: Dict[str, Any], blob_count: int) -> Optional[List[List[Any]]]:
    """The items of a stream message, checked against its blobs; None when malformed."""
    items = envelope.get("items")
    if not isinstance(items, list):
        return None
    data_items = 0
    for item in items:
        if not isinstance(item, list) or len(item) != 3 or item[1] not in KINDS:
            return None
        if not isinstance(item[0], int) or isinstance(item[0], bool):
            return None
        if item[1] == DATA:
            data_items += 1
    return items if data_items == blob_count else None


class Leases:
    """When each controller (owner) was last heard from; its streams end when it goes
    silent for a lease. Only an open makes an entry, so owners a client makes up in other
    ops never grow the table, and a full table first drops the owners with no stream."""

    def __init__(self) -> None:
        self._at: Dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._at)

    def opened(self, owner: str, now: float, live: Callable[[], Set[str]]) -> None:
        if owner not in self._at and len(self._at) >= MAX_STREAMS:
            keep = live()
            self._at = {o: t for o, t in self._at.items() if o in keep}
        self._at[owner] = now

    def renew(self, owner: str, now: float) -> None:
        if owner in self._at:
            self._at[owner] = now

    def expired(self, owner: str, now: float, lease_s: float) -> bool:
        return now - self._at.get(owner, 0.0) > lease_s

    def forget_expired(self, now: float, lease_s: float, live: Set[str]) -> None:
        """Drop the silent owners that have no stream left."""
        self._at = {o: t for o, t in self._at.items() if o in live or now - t <= lease_s}


def check_room(keys: Collection[Tuple[str, int]], owner: str, key: Tuple[str, int]) -> None:
    """Refuse a new stream ``key`` when it is open already or a limit is reached; ``keys``
    are the open streams' (owner, sid)."""
    if key in keys:
        raise OpError(ErrorCode.CONFLICT, "stream %d is already open" % key[1])
    if len(keys) >= MAX_STREAMS:
        raise OpError(ErrorCode.TOO_LARGE, "the remote has %d forwarded connections open, "
                      "its limit: close some" % MAX_STREAMS, {"limit": MAX_STREAMS})
    if sum(1 for k in keys if k[0] == owner) >= MAX_STREAMS_PER_OWNER:
        raise OpError(ErrorCode.TOO_LARGE, "this controller has %d forwarded connections "
                      "open, the limit per controller: close some" % MAX_STREAMS_PER_OWNER,
                      {"limit": MAX_STREAMS_PER_OWNER})


class PushPacer:
    """A token bucket for pushed messages: iopub carries about 1000 messages a second, so a
    saturated tunnel sends few large messages while the first after a quiet spell goes at
    once. ``rate`` tokens a second, at most ``burst`` saved up; a push spends one."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._at = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self._at) * self.rate)
        self._at = now

    def wait_s(self) -> float:
        """How long until a token is there (0: now)."""
        return max(0.0, (1.0 - self.tokens) / self.rate)

    def take(self, count: int) -> None:
        self.tokens -= count
