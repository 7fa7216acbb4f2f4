"""``Tether``: the blocking API, safe inside a running notebook (the async core runs on a portal).

A notebook kernel already runs an event loop on its main thread, so ``asyncio.run`` is not
an option; an anyio ``BlockingPortal`` runs the async core on its own thread instead, and
every method here is a thin synchronous call into it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from .blocking_services import Files, Jobs, run_on_portal
from .execute import ExecResult, OutputCallback
from .forward import BlockingPortForward
from .notebooks.blocking import Notebooks
from .submit import SubmitProgress
from .tether import AsyncTether

T = TypeVar("T")


class Tether:
    """Blocking handle on a remote Jupyter server. Use ``jupyter_tether.connect(...)``."""

    def __init__(self, url: str | None = None, token: str | None = None, **kwargs: Any) -> None:
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self.aio = AsyncTether(url, token, **kwargs)
        self._cm = self._portal.wrap_async_context_manager(self.aio)
        try:
            self._cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self._closed = False

    def _call(self, func: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        # Cancels the remote-side task if the caller is interrupted (Ctrl-C, notebook stop),
        # so nothing is left running on the portal for close() to wait on.
        return run_on_portal(self._portal, functools.partial(func, *args, **kwargs))

    @property
    def portal(self) -> BlockingPortal:
        return self._portal

    @property
    def jobs(self) -> Jobs:
        return Jobs(self._portal, self.aio.jobs)

    @property
    def files(self) -> Files:
        return Files(self._portal, self.aio.files)

    @property
    def notebooks(self) -> Notebooks:
        return Notebooks(self._portal, self.aio.notebooks)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> Tether:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Tether {self.aio.target.display_url} {state}>"

    # --- the API, mirrored from AsyncTether ----------------------------------------------------

    def ping(self, timeout: float = 30.0) -> dict[str, Any]:
        return self._call(self.aio.ping, timeout)

    def info(self) -> dict[str, Any]:
        return self._call(self.aio.info)

    def status(self) -> dict[str, Any]:
        return self._call(self.aio.status)

    def env_snapshot(self, timeout: float = 120.0) -> dict[str, Any]:
        return self._call(self.aio.env_snapshot, timeout)

    def exec(self, code: str, *, kernel_id: str | None = None, timeout: float | None = 120.0,
             max_output_chars: int = 20_000, on_output: OutputCallback | None = None) -> ExecResult:
        return self._call(self.aio.exec, code, kernel_id=kernel_id, timeout=timeout,
                          max_output_chars=max_output_chars, on_output=on_output)

    def submit(self, spec: dict[str, Any], *, progress: SubmitProgress | None = None,
               dry_run: bool = False) -> dict[str, Any]:
        """Sync, bootstrap and start a job spec's run; see ``AsyncTether.submit``."""
        return self._call(self.aio.submit, spec, progress=progress, dry_run=dry_run)

    def collect(self, job_id: str, local_dir: str | os.PathLike[str], *,
                require_done: bool = True,
                progress: SubmitProgress | None = None) -> dict[str, Any]:
        """Download a submitted job's artifacts; see ``AsyncTether.collect``."""
        return self._call(self.aio.collect, job_id, local_dir, require_done=require_done,
                          progress=progress)

    def forward(self, remote_port: int, local_port: int = 0, remote_host: str = "127.0.0.1",
                *, allow_remote_host: bool = False) -> BlockingPortForward:
        """Forward a local port to a remote one; see ``AsyncTether.forward``."""
        return BlockingPortForward(self._portal, self._call(
            self.aio.forward, remote_port, local_port, remote_host,
            allow_remote_host=allow_remote_host))

    def forwards(self) -> list[dict[str, Any]]:
        return self._portal.call(self.aio.forwards)

    def list_kernels(self) -> list[dict[str, Any]]:
        return self._call(self.aio.list_kernels)

    def list_sessions(self) -> list[dict[str, Any]]:
        return self._call(self.aio.list_sessions)

    def start_kernel(self, kernel_name: str = "python3") -> dict[str, Any]:
        return self._call(self.aio.start_kernel, kernel_name)

    def shutdown_kernel(self, kernel_id: str, now: bool = True) -> None:
        self._call(self.aio.shutdown_kernel, kernel_id, now)


def connect(url: str | None = None, token: str | None = None, **kwargs: Any) -> Tether:
    """Connect to a Jupyter server (or start a local one when no URL is given or set)."""
    return Tether(url, token, **kwargs)
