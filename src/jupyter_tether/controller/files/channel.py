"""What the file services use of a tether: calls over its link, the link's state, ``/files``.

``Channel`` narrows ``AsyncTether`` to those few things, so the upload, download and sync
code depends on this small surface rather than on the whole tether. Also here: the error
helpers every transfer shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ...errors import ConnectionLost, NotFound, RemoteError, TetherTimeout
from ..rpc import Reply, check_manifest, decode_manifest
from .tuning import MANIFEST_TIMEOUT_S

if TYPE_CHECKING:
    from ..tether import AsyncTether


class ManifestFetch(Protocol):
    """``manifest(path, excludes, hash_files=...)``: the remote tree under ``path``, checked."""

    async def __call__(self, path: str, excludes: Sequence[str], *,
                       hash_files: bool) -> dict[str, Any]: ...


class Channel:
    """The link calls, link state and streamed GETs of one tether, for the file services."""

    def __init__(self, tether: AsyncTether) -> None:
        self._tether = tether

    async def call(self, op: str, args: dict[str, Any], *, buffers: Sequence[bytes] = (),
                   timeout: float | None = 60.0, idempotent: bool = True) -> Reply:
        # Every file op is safe to repeat (chunks rewrite the same bytes, commits are checked),
        # so the link may re-send any of them after a reconnect.
        return await self._tether.link.call(op, args, buffers=list(buffers), timeout=timeout,
                                            idempotent=idempotent)

    @property
    def connected(self) -> bool:
        """Whether the link is up now (after a ConnectionLost: whether it came back)."""
        return self._tether.link.connected

    @property
    def root_dir(self) -> str | None:
        """The server's root directory as the supervisor reported it (what ``/files`` serves)."""
        root = self._tether.link.facts.get("root_dir")
        return str(root) if root else None

    def stream_get(self, url_path: str, headers: dict[str, str]) -> Any:
        """``async with channel.stream_get(path, headers) as response``: a streamed GET."""
        return self._tether.rest.stream_get(url_path, headers)

    async def manifest(self, path: str, excludes: Sequence[str], *,
                       hash_files: bool) -> dict[str, Any]:
        reply = await self.call("manifest", {"path": path, "excludes": list(excludes),
                                             "hash": hash_files, "as_blob": True},
                                timeout=MANIFEST_TIMEOUT_S)
        if reply.buffers:
            return decode_manifest(reply.buffers[0])
        return check_manifest(reply.result)


def with_context(exc: RemoteError, context: str) -> RemoteError:
    """The same typed error (NotFound stays NotFound) with what we were doing in front."""
    return type(exc)(exc.code, f"{context}: {exc.message}", exc.details)


def resumable(exc: BaseException) -> bool:
    """Errors after which the same transfer can go on (the remote kept what arrived)."""
    if isinstance(exc, (ConnectionLost, TetherTimeout)):
        return True
    # A new supervisor (kernel restart) forgot the transfer id; begin again resumes it.
    return isinstance(exc, NotFound) and "transfer_id" in exc.details
