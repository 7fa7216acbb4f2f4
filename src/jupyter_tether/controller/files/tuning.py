"""Sizes, windows, timeouts and retries of file transfers, and the check of caller-given tuning.

Memory on each side stays bounded by ``window * chunk_size`` whatever the file size.
"""

from __future__ import annotations

from ...agent_payload import wire

MiB = 1024 * 1024
DEFAULT_CHUNK_BYTES = wire.DEFAULT_CHUNK_BYTES
DEFAULT_WINDOW = 8
DEFAULT_SYNC_MAX_BYTES = 200 * MiB
# Files up to this size travel inside batch messages; bigger ones are uploaded in chunks.
SMALL_FILE_BYTES = 1 * MiB
# One batch message: a few MiB of data (client->kernel frames above 10 MiB close the
# socket) and a bounded envelope (the supervisor refuses envelopes above 1 MiB).
BATCH_BYTES = 4 * MiB
BATCH_FILES = 500
BATCH_ENVELOPE_BYTES = 512 * 1024
BATCH_WINDOW = 4
PARALLEL_UPLOADS = 3
PARALLEL_DOWNLOADS = 2
# Above this size a write goes through the chunked upload instead of one fs_write.
INLINE_WRITE_BYTES = 4 * MiB
CHUNK_TIMEOUT_S = 120.0
MANIFEST_TIMEOUT_S = 600.0
MAX_ATTEMPTS = 4


def check_tuning(chunk_size: int, window: int) -> None:
    """Refuse (ValueError) a chunk size the socket cannot carry or a window below one."""
    if not 0 < chunk_size <= wire.MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be 1..{wire.MAX_CHUNK_BYTES} bytes (client->kernel "
                         f"frames above 10 MiB close the socket), got {chunk_size}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
