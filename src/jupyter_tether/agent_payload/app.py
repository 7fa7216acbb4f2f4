"""Assembles a Supervisor with every service registered: what runs in the remote kernel."""

from typing import Optional

from . import files, hostinfo, jobs, kernel_exec, streams
from .supervisor import SendFn, Supervisor


def create_supervisor(
    send: SendFn,
    *,
    root_dir: Optional[str] = None,
    state_dir: Optional[str] = None,
    payload_hash: str = "",
) -> Supervisor:
    supervisor = Supervisor(send, root_dir=root_dir, state_dir=state_dir,
                            payload_hash=payload_hash)
    hostinfo.register(supervisor)
    files.register(supervisor)
    jobs.register(supervisor)
    kernel_exec.register(supervisor)
    streams.register(supervisor)
    return supervisor
