"""``tether.notebooks``: read, edit and run ``.ipynb`` files on the remote, or run one as a job.

The file is read and written through the supervisor (every server has it; a Kernel Gateway
has no contents API), whole and atomically. Its revision is a hash of its bytes: an edit
given ``expected_revision`` is refused when someone saved in between, and every write
checks right before it that the file did not change since it was read. On a server with
real-time collaboration (jupyter-collaboration), JupyterLab holds open notebooks in a
shared document that file writes would fight: writes are refused there unless forced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import shlex
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc

from ...agent_payload.wire import ErrorCode
from ...errors import Conflict, NotFound, TetherError
from ..files import AsyncFiles
from ..jobs import AsyncJob, AsyncJobs
from ..kernel_ws import KernelSocket
from ..link import LinkOptions, SupervisorLink
from ..rest import JupyterRest
from .document import (
    DOC_LIMITS,
    ImageSaver,
    ProgressFn,
    apply_ops,
    dumps,
    ensure_ids,
    find_cell,
    invalid,
    new_notebook,
    notebook_view,
    parse,
    revision_from_sha256,
    revision_of,
    text_of,
)
from .runs import CellRecord, NotebookRun, RunHooks, Updates, drive

#: a probe for jupyter-collaboration's document-session route: it answers only PUT, so a
#: GET gets 405 where the extension runs and 404 where it does not
_RTC_PROBE = "api/collaboration/session/jupyter-tether-probe.ipynb"
_RTC_CACHE_S = 60.0
#: finished runs remembered for ``wait``
_KEEP_RUNS = 50
KERNEL_CHOICES = ("auto", "session", "notebook", "work")


def rtc_refusal(path: str) -> Conflict:
    return Conflict(ErrorCode.CONFLICT, (
        f"{path}: this Jupyter server runs real-time collaboration (jupyter-collaboration), "
        "where JupyterLab edits open notebooks through a shared document that a file write "
        "would fight (one would overwrite the other). Nothing was written. Make the change "
        "in JupyterLab, or pass force=True (--force) only when no one has the notebook open"),
        {"path": path, "collaboration": True})


def _changed(path: str, expected: str | None, actual: str) -> Conflict:
    was = f" (you read revision {expected}, it is now {actual})" if expected else ""
    return Conflict(ErrorCode.CONFLICT, (
        f"{path} changed since you read it{was}: someone saved it in between. Nothing was "
        "written; read it again and redo the edit"), {"path": path, "revision": actual})


class NotebookHost(Protocol):
    """What the service needs of the ``AsyncTether`` that holds it: the link's facts, REST,
    files and jobs, and its work kernels (their sockets and per-kernel locks)."""

    output_dir: Path
    options: LinkOptions
    files: AsyncFiles
    jobs: AsyncJobs
    _work_locks: dict[str, anyio.Lock]

    @property
    def link(self) -> SupervisorLink: ...

    @property
    def rest(self) -> JupyterRest: ...

    @property
    def task_group(self) -> anyio.abc.TaskGroup: ...

    async def work_kernel_id(self) -> str: ...

    async def _work_socket(self, kernel_id: str) -> KernelSocket: ...


class AsyncNotebooks:
    """``tether.notebooks``: ``read``, ``edit``, ``run`` (+ ``wait``, ``cancel``), ``start``."""

    def __init__(self, tether: NotebookHost) -> None:
        self._tether = tether
        self._runs: dict[str, NotebookRun] = {}
        self._rtc: tuple[float, bool] | None = None

    # --- paths, bytes and the revision ---------------------------------------------------------

    def _rel(self, path: str) -> str:
        """``path`` relative to the server root where it is under it (sessions use those)."""
        if not isinstance(path, str) or not path.strip():
            raise invalid("a notebook path is required")
        path = path.strip()
        root = self._tether.link.facts.get("root_dir")
        if posixpath.isabs(path):
            if root and (path + "/").startswith(str(root).rstrip("/") + "/") and path != root:
                return posixpath.relpath(path, root)
            return posixpath.normpath(path)
        return posixpath.normpath(path)

    def _abs(self, rel: str) -> str:
        root = self._tether.link.facts.get("root_dir") or ""
        return rel if posixpath.isabs(rel) else posixpath.join(str(root), rel)

    async def _exists(self, rel: str) -> bool:
        st = await self._tether.files.stat(rel)
        if st.get("exists") and st.get("type") == "directory":
            raise invalid(f"{rel} is a directory, not a notebook")
        return bool(st.get("exists"))

    async def _load(self, rel: str) -> tuple[str, bytes, dict[str, Any]]:
        """(sha256 of the bytes read, bytes, parsed notebook); NotFound when there is none."""
        if not await self._exists(rel):
            raise NotFound(ErrorCode.NOT_FOUND, f"{rel}: no such notebook", {"path": rel})
        data = await self._tether.files.read_bytes(rel, max_bytes=DOC_LIMITS.max_bytes + 1)
        return hashlib.sha256(data).hexdigest(), data, parse(data, rel)

    async def _write(self, rel: str, read_sha256: str | None, data: bytes) -> str:
        """Write ``data`` unless the file changed since it was read (``read_sha256``, None:
        there was none); its revision. The remote checks right before the rename, so a save
        landing at any moment in between is refused, never overwritten."""
        try:
            await self._tether.files.write_bytes(rel, data, if_sha256=read_sha256 or "")
        except Conflict as exc:
            if exc.details.get("reason") != "changed":
                raise
            now = exc.details.get("sha256")
            raise _changed(rel, None, revision_from_sha256(now) if isinstance(now, str) else "") \
                from None
        return revision_of(data)

    # --- real-time collaboration ------------------------------------------------------------

    async def collaboration(self) -> bool:
        """Whether the server runs jupyter-collaboration (real-time collaboration)."""
        now = time.monotonic()
        if self._rtc is not None and now - self._rtc[0] < _RTC_CACHE_S:
            return self._rtc[1]
        try:
            response = await self._tether.rest.request(
                "GET", _RTC_PROBE, ok=(200, 204, 400, 401, 403, 404, 405, 500))
        except TetherError:
            return False  # unknown now: asked again next time
        found = response.status_code == 405
        self._rtc = (now, found)
        return found

    async def _check_writable(self, rel: str, force: bool) -> None:
        if not force and await self.collaboration():
            raise rtc_refusal(rel)

    # --- read and edit ------------------------------------------------------------------------

    async def read(self, path: str, *, start: int = 0, limit: int = 20,
                   outputs: str = "brief") -> dict[str, Any]:
        """Cells ``start`` .. ``start + limit`` with bounded outputs, and the revision.

        ``outputs``: "brief" (text/plain, images, error lines), "full" (every MIME type,
        longer texts) or "none" (counts only). Images are saved to local files under the
        tether's ``output_dir`` and referenced by path.
        """
        rel = self._rel(path)
        sha256, data, nb = await self._load(rel)
        images = ImageSaver(Path(self._tether.output_dir))
        view = await anyio.to_thread.run_sync(
            lambda: notebook_view(nb, start=start, limit=limit, mode=outputs, images=images))
        session = await self._session_kernel(rel)
        return {"path": rel, "revision": revision_from_sha256(sha256), "size": len(data), **view,
                "open_kernel_id": session}

    async def edit(self, path: str, ops: Sequence[dict[str, Any]], *,
                   expected_revision: str | None = None, create: bool = False,
                   force: bool = False) -> dict[str, Any]:
        """Apply ``ops`` all or nothing; returns the new revision and what each op did.

        Ops: ``{"op": "insert", "source", "cell_type"?, "index"? | "after"?}``,
        ``{"op": "replace", "cell", "source"?, "cell_type"?}``, ``{"op": "delete", "cell"}``,
        ``{"op": "move", "cell", "to"}``, ``{"op": "clear_outputs", "cell"?}``; ``cell`` is
        an id or an index, ``tags`` sets a cell's tags. Refused (Conflict, nothing written)
        when the file's revision is not ``expected_revision``, or changes while editing.
        ``create`` makes a new notebook when there is none at ``path``.
        """
        rel = self._rel(path)
        await self._check_writable(rel, force)
        key: str | None
        try:
            key, _, nb = await self._load(rel)
        except NotFound:
            if not create:
                raise
            key, nb = None, new_notebook()
            created = True
        else:
            created = False
            revision = revision_from_sha256(key)
            if expected_revision is not None and revision != expected_revision:
                raise _changed(rel, expected_revision, revision)
        ensure_ids(nb)
        done = apply_ops(nb, list(ops)) if ops or not created else []
        new = dumps(nb, rel)
        revision = await self._write(rel, key, new)
        return {"path": rel, "revision": revision, "created": created,
                "n_cells": len(nb["cells"]), "ops": done}

    # --- run -----------------------------------------------------------------------------------

    async def _session_kernel(self, rel: str) -> str | None:
        """The kernel of the notebook session JupyterLab has open for ``rel``, if any."""
        with contextlib.suppress(TetherError):
            for session in await self._tether.rest.listable_sessions() or []:
                notebook = session.get("notebook") or {}
                where = str(session.get("path") or notebook.get("path") or "")
                where = where.split(":", 1)[1] if where.startswith("RTC:") else where
                kernel = session.get("kernel") or {}
                if posixpath.normpath(where) == rel and kernel.get("id") and \
                        kernel.get("execution_state") != "dead":
                    return str(kernel["id"])
        return None

    async def _pick_kernel(self, rel: str, kernel: str | None,
                           nb: dict[str, Any]) -> tuple[str, str]:
        choice = kernel or "auto"
        if choice in ("auto", "session", "notebook"):
            found = await self._session_kernel(rel)
            if found is not None:
                return found, "session"
            if choice == "session":
                raise invalid(f"{rel} is not open in JupyterLab (no notebook session): use "
                              "kernel='notebook' to start one, or 'work'")
        if choice == "notebook":
            spec = nb["metadata"].get("kernelspec")  # the file's: any type, any size
            name = spec.get("name") if isinstance(spec, dict) else None
            model = await self._tether.rest.create_session(
                name=posixpath.basename(rel), path=rel, session_type="notebook",
                kernel_name=name if isinstance(name, str) and 0 < len(name) <= 200
                else self._tether.options.kernel_name)
            return str(model["kernel"]["id"]), "notebook"
        if choice in ("auto", "work"):
            return await self._tether.work_kernel_id(), "work"
        if choice == self._tether.link.kernel_id:
            raise invalid("that kernel runs jupyter-tether's supervisor; run cells elsewhere")
        if await self._tether.rest.get_kernel(choice) is None:
            raise NotFound(ErrorCode.NOT_FOUND, f"no kernel {choice}; list them with "
                           "list_kernels(), or use kernel='auto'", {"kernel_id": choice})
        return choice, "given"

    def _select(self, nb: dict[str, Any], cells: str | Sequence[str | int]) -> list[CellRecord]:
        all_cells = nb["cells"]
        if cells == "all":
            indexes = [i for i, c in enumerate(all_cells)
                       if c.get("cell_type") == "code" and text_of(c.get("source")).strip()]
        elif isinstance(cells, (list, tuple)) and cells:
            indexes = [find_cell(all_cells, ref) for ref in cells]
            for i in indexes:
                if all_cells[i].get("cell_type") != "code":
                    raise invalid(f"cell {all_cells[i].get('id') or i} is a "
                                  f"{all_cells[i].get('cell_type')} cell, not code")
        else:
            raise invalid("cells must be 'all' or a non-empty list of cell ids or indexes")
        return [CellRecord(id=str(all_cells[i]["id"]), index=i,
                           code=text_of(all_cells[i].get("source"))) for i in indexes]

    async def _write_outputs(self, rel: str, updates: Updates) -> tuple[str, list[str]]:
        for _ in range(5):
            key, _, nb = await self._load(rel)
            seen = set()
            for cell in nb["cells"]:
                if cell.get("id") in updates and cell.get("cell_type") == "code":
                    cell["execution_count"], cell["outputs"] = updates[cell["id"]]
                    seen.add(cell["id"])
            new = await anyio.to_thread.run_sync(dumps, nb, rel)
            try:
                return await self._write(rel, key, new), [k for k in updates if k not in seen]
            except Conflict:
                continue  # saved in between: merge into the newer file
        raise Conflict(ErrorCode.CONFLICT, f"{rel} kept changing while outputs were written "
                       "back", {"path": rel})

    async def run(self, path: str, cells: str | Sequence[str | int] = "all", *,
                  kernel: str | None = None, timeout: float = 60.0, stop_on_error: bool = True,
                  outputs: str = "brief", force: bool = False,
                  progress: ProgressFn | None = None) -> dict[str, Any]:
        """Run code cells in a kernel and write outputs and execution counts back.

        ``kernel``: "auto" (default: the notebook's own session kernel when JupyterLab has
        it open, so the person sees the same state; else jupyter-tether's work kernel),
        "session", "notebook" (its session kernel, starting one bound to the notebook),
        "work", or a kernel id. Waits at most ``timeout`` seconds: a run still going then
        keeps going, and the result's ``status`` is "running" with a ``run_id`` for
        ``wait``. Without write access (real-time collaboration, unless ``force``) the
        cells still run and the result says the outputs were not written.
        """
        rel = self._rel(path)
        key, _, nb = await self._load(rel)
        revision = revision_from_sha256(key)
        write_back = force or not await self.collaboration()
        if ensure_ids(nb) and write_back:  # the run's revision is the file with the ids
            revision = await self._write(rel, key, await anyio.to_thread.run_sync(dumps, nb, rel))
        records = self._select(nb, cells)
        kernel_id, source = await self._pick_kernel(rel, kernel, nb)
        tether = self._tether

        async def interrupt() -> None:
            with contextlib.suppress(TetherError):
                await tether.rest.interrupt_kernel(kernel_id)

        run = NotebookRun(run_id=uuid.uuid4().hex[:12], path=rel, kernel_id=kernel_id,
                          kernel=source, cells=records, write_back=write_back,
                          stop_on_error=stop_on_error, revision=revision)
        if not write_back:
            run.write_error = str(rtc_refusal(rel))
        hooks = RunHooks(socket=lambda: tether._work_socket(kernel_id),
                         lock=tether._work_locks.setdefault(kernel_id, anyio.Lock()),
                         interrupt=interrupt,
                         write=lambda updates: self._write_outputs(rel, updates))
        self._remember(run)
        tether.task_group.start_soon(drive, run, hooks)
        return await self.wait(run.run_id, timeout=timeout, outputs=outputs, progress=progress)

    def _remember(self, run: NotebookRun) -> None:
        self._runs[run.run_id] = run
        finished = [r for r in self._runs.values() if r.done.is_set()]
        for old in finished[:max(0, len(finished) - _KEEP_RUNS)]:
            del self._runs[old.run_id]

    def _get(self, run_id: str) -> NotebookRun:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFound(ErrorCode.NOT_FOUND, f"no notebook run {run_id} in this controller "
                           "(runs live as long as the controller that started them)",
                           {"run_id": run_id})
        return run

    async def wait(self, run_id: str, *, timeout: float = 60.0, outputs: str = "brief",
                   progress: ProgressFn | None = None) -> dict[str, Any]:
        """A run's state after waiting at most ``timeout`` seconds for it to end."""
        run = self._get(run_id)
        with anyio.move_on_after(timeout):
            while not run.done.is_set():
                if progress is not None:
                    current = run.current()
                    progress(run.finished, len(run.cells),
                             f"cell {current.index}" if current else "")
                with anyio.move_on_after(1.0):
                    await run.done.wait()
        images = ImageSaver(Path(self._tether.output_dir))
        result = run.snapshot(outputs, images)
        if not run.done.is_set():
            result["hint"] = (f"still running: wait with run_id={run_id} "
                              "(the run goes on meanwhile)")
        return result

    async def cancel(self, run_id: str) -> dict[str, Any]:
        """Interrupt the kernel and stop a run (the cells not yet run are skipped)."""
        run = self._get(run_id)
        if not run.done.is_set():
            with contextlib.suppress(TetherError):
                await self._tether.rest.interrupt_kernel(run.kernel_id)
            if run.scope is not None:
                run.scope.cancel()
            with anyio.move_on_after(30):
                await run.done.wait()
        return run.snapshot("none", None)

    # --- a notebook as a job ----------------------------------------------------------------

    async def _runner_path(self) -> str:
        """The runner script on the remote (uploaded once per version of it)."""
        source = (Path(__file__).parent / "remote_runner.py").read_bytes()
        digest = hashlib.sha256(source).hexdigest()[:12]
        state = self._tether.link.facts.get("state_dir") or self._abs(".jupyter_tether")
        path = posixpath.join(str(state), "notebooks", f"runner-{digest}.py")
        st = await self._tether.files.stat(path)
        if not st.get("exists") or st.get("size") != len(source):
            await self._tether.files.write_bytes(path, source)
        return path

    async def start(self, path: str, *, parameters: dict[str, Any] | None = None,
                    output: str | None = None, kernel_name: str | None = None,
                    cell_timeout: float | None = None, allow_errors: bool = False,
                    force: bool = False) -> AsyncJob:
        """Run the whole notebook detached on the remote, as a job; returns at once.

        A runner (standard library and jupyter_client) executes it in its own kernel and
        replaces ``output`` (default: the notebook itself) after every cell. ``parameters``
        go into a cell tagged ``injected-parameters`` after the one tagged ``parameters``
        (papermill's convention). Follow it like any job: its log has a line per cell
        started and finished, and errors with their traceback; it survives drops and
        controller restarts. A failing cell stops it (exit 1) unless ``allow_errors``.
        """
        rel = self._rel(path)
        await self._load(rel)  # there, and a notebook
        out_rel = self._rel(output) if output else rel
        await self._check_writable(out_rel, force)
        params = dict(parameters or {})
        for name in params:
            if not isinstance(name, str) or not name.isidentifier():
                raise invalid(f"parameter name {name!r} is not a Python identifier")
        try:
            json.dumps(params)
        except (TypeError, ValueError) as exc:
            raise invalid(f"parameters must be JSON values: {exc}") from None
        runner = await self._runner_path()
        spec = {"notebook": self._abs(rel), "output": self._abs(out_rel), "parameters": params,
                "kernel_name": kernel_name, "cell_timeout": cell_timeout,
                "allow_errors": allow_errors}
        spec_path = posixpath.join(posixpath.dirname(runner), f"job-{uuid.uuid4().hex[:12]}.json")
        await self._tether.files.write_text(spec_path, json.dumps(spec))
        python = self._tether.link.facts.get("python_executable") or "python3"
        command = " ".join(shlex.quote(part) for part in (str(python), "-u", runner, spec_path))
        return await self._tether.jobs.start(command, cwd=posixpath.dirname(self._abs(rel)),
                                             name=f"notebook {rel}"[:200])
