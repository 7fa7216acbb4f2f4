"""What every transfer shares about the remote: its manifest, and the errors it answers with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ...agent_payload.wire import Op
from ...errors import ConnectionLost, NotFound, RemoteError, TetherTimeout
from ..caller import Caller
from ..rpc import check_manifest, decode_manifest
from .tuning import MANIFEST_TIMEOUT_S


class ManifestFetch(Protocol):
    """``manifest(path, excludes, hash_files=...)``: the remote tree under ``path``, checked."""

    async def __call__(self, path: str, excludes: Sequence[str], *,
                       hash_files: bool) -> dict[str, Any]: ...


async def fetch_manifest(caller: Caller, path: str, excludes: Sequence[str], *,
                         hash_files: bool) -> dict[str, Any]:
    """The remote tree under ``path`` (as a msgpack blob where the remote can), checked."""
    reply = await caller.call(Op.MANIFEST, {"path": path, "excludes": list(excludes),
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
