"""``Tether.notebooks``: the blocking face of ``AsyncNotebooks``, driven through the portal."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from anyio.from_thread import BlockingPortal

from ..blocking_services import Job, run_on_portal
from .document import ProgressFn
from .service import AsyncNotebooks


class Notebooks:
    """Read, edit and run remote notebooks; ``start`` runs one as a job (see AsyncNotebooks)."""

    def __init__(self, portal: BlockingPortal, aio: AsyncNotebooks) -> None:
        self._portal = portal
        self.aio = aio

    def _call(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        return run_on_portal(self._portal, functools.partial(func, *args, **kwargs))

    def read(self, path: str, *, start: int = 0, limit: int = 20,
             outputs: str = "brief") -> dict[str, Any]:
        result: dict[str, Any] = self._call(self.aio.read, path, start=start, limit=limit,
                                            outputs=outputs)
        return result

    def edit(self, path: str, ops: Sequence[dict[str, Any]], *,
             expected_revision: str | None = None, create: bool = False,
             force: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._call(self.aio.edit, path, ops,
                                            expected_revision=expected_revision,
                                            create=create, force=force)
        return result

    def run(self, path: str, cells: str | Sequence[str | int] = "all", *,
            kernel: str | None = None, timeout: float = 60.0, stop_on_error: bool = True,
            outputs: str = "brief", force: bool = False,
            progress: ProgressFn | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            self.aio.run, path, cells, kernel=kernel, timeout=timeout,
            stop_on_error=stop_on_error, outputs=outputs, force=force, progress=progress)
        return result

    def wait(self, run_id: str, *, timeout: float = 60.0, outputs: str = "brief",
             progress: ProgressFn | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call(self.aio.wait, run_id, timeout=timeout,
                                            outputs=outputs, progress=progress)
        return result

    def cancel(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(self.aio.cancel, run_id)
        return result

    def start(self, path: str, *, parameters: dict[str, Any] | None = None,
              output: str | None = None, kernel_name: str | None = None,
              cell_timeout: float | None = None, allow_errors: bool = False,
              force: bool = False) -> Job:
        job = self._call(self.aio.start, path, parameters=parameters, output=output,
                         kernel_name=kernel_name, cell_timeout=cell_timeout,
                         allow_errors=allow_errors, force=force)
        return Job(self._portal, job)

    def collaboration(self) -> bool:
        return bool(self._call(self.aio.collaboration))
