"""What the remote box has and what its jobs use: the supervisor's ``resources`` op.

The result is the full picture (host, GPUs with their processes mapped to jobs, each running
job's usage, warnings, the sampler's own cost); ``jupyter_tether.formatting`` shrinks it for
each face. Memory is in bytes on the wire.
"""

from __future__ import annotations

from typing import Any

from ..agent_payload.wire import Op
from .caller import Caller


async def fetch_resources(caller: Caller, *, jobs: bool = True, gpus: bool = True,
                          watch_s: float = 15.0, timeout: float = 30.0) -> dict[str, Any]:
    """The supervisor's ``resources`` result; it keeps sampling once a second for
    ``watch_s`` more seconds (0: just this once)."""
    reply = await caller.call(Op.RESOURCES, {"jobs": jobs, "gpus": gpus, "watch_s": watch_s},
                              timeout=timeout)
    result: dict[str, Any] = reply.result
    return result
