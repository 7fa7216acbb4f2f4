"""``Tether``: the blocking API, safe inside a running notebook (the async core runs on a portal).

A notebook kernel already runs an event loop on its main thread, so ``asyncio.run`` is not
an option; an anyio ``BlockingPortal`` runs the async core on its own thread instead, and
every method here is a thin synchronous call into it.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from types import TracebackType

from anyio.from_thread import BlockingPortal, start_blocking_portal

from .blocking_services import Files, Jobs
from .forward import BlockingPortForward
from .link import LinkOptions
from .notebooks.blocking import Notebooks
from .target import Target
from .tether import AsyncTether
from .twins import share_doc, twin, twin_sync, twin_wrapping


class Tether:
    """Blocking handle on a remote Jupyter server. Use ``jupyter_tether.connect(...)``.

    Every method is the blocking twin of ``AsyncTether``'s, with the same arguments and
    docstring; ``jobs``, ``files`` and ``notebooks`` likewise mirror the async services.
    """

    @share_doc(AsyncTether.__init__, returns="None",
               intro="Connect now (blocking; ``close()`` or ``with`` ends it).")
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        target: Target | str | None = None,
        options: LinkOptions | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        embedded_root: str | os.PathLike[str] | None = None,
    ) -> None:
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._closed = True
        try:
            self.aio = AsyncTether(url, token, target=target, options=options,
                                   output_dir=output_dir, embedded_root=embedded_root)
            self._cm = self._portal.wrap_async_context_manager(self.aio)
            self._cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self._closed = False

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
        """Close the link (jobs keep running on the remote) and stop an embedded server."""
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

    # --- the API: twins of AsyncTether's methods (tests/test_first_hour_api.py checks all) ---

    ping = twin(AsyncTether.ping)
    info = twin(AsyncTether.info)
    status = twin(AsyncTether.status)
    env_snapshot = twin(AsyncTether.env_snapshot)
    resources = twin(AsyncTether.resources)
    exec = twin(AsyncTether.exec)
    submit = twin(AsyncTether.submit)
    collect = twin(AsyncTether.collect)
    forward = twin_wrapping(AsyncTether.forward, BlockingPortForward, "BlockingPortForward")
    forwards = twin_sync(AsyncTether.forwards)
    server_version = twin(AsyncTether.server_version)
    list_kernels = twin(AsyncTether.list_kernels)
    list_sessions = twin(AsyncTether.list_sessions)
    start_kernel = twin(AsyncTether.start_kernel)
    shutdown_kernel = twin(AsyncTether.shutdown_kernel)
    work_kernel_id = twin(AsyncTether.work_kernel_id)


@share_doc(AsyncTether.__init__, returns="Tether", drop_self=True, intro=(
    "Open a blocking ``Tether`` to a Jupyter server: ``with connect(...) as t: ...``.\n\n"
    "Safe inside a running notebook (the async core runs on a thread of its own)."))
def connect(
    url: str | None = None,
    token: str | None = None,
    *,
    target: Target | str | None = None,
    options: LinkOptions | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    embedded_root: str | os.PathLike[str] | None = None,
) -> Tether:
    return Tether(url, token, target=target, options=options, output_dir=output_dir,
                  embedded_root=embedded_root)
