"""Blocking ``tether.jobs`` and ``tether.files``: the async services driven through the portal.

Every call starts a task on the Tether's portal and waits for it in short slices, so that a
Ctrl-C (or a notebook's interrupt) cancels the remote-facing task instead of leaving it
running on the portal, where it would also block ``Tether.close()``. Progress displays are
drawn from the caller's thread: a notebook routes output by the thread that writes it.
"""

from __future__ import annotations

import codecs
import functools
import html
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import IO, Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..formatting import human_bytes, job_duration, usage_line
from .files import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_SYNC_MAX_BYTES,
    DEFAULT_WINDOW,
    AsyncFiles,
    ProgressCallback,
    TransferResult,
)
from .jobs import FOLLOW_WINDOW, AsyncJob, AsyncJobs, JobInfo
from .twins import run_on_portal, share_doc, twin, twin_wrapping

T = TypeVar("T")
# None: a progress bar when running in a notebook; False: none; a callable: yours (it is
# called on the portal's event loop thread, so keep it quick).
ProgressArg = ProgressCallback | bool | None

_REPR_TIMEOUT_S = 5.0
_REPR_TAIL_LINES = 20


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where HTML displays render), False in a terminal."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class NotebookProgress:
    """A ``<progress>`` bar in a notebook cell, updated in place (no ipywidgets needed).

    ``callback`` is handed to the async service and runs on the loop thread: it only stores
    numbers. ``render()`` runs on the notebook's thread and redraws at most every tick.
    """

    def __init__(self, label: str) -> None:
        from IPython.display import HTML, display

        self._html = HTML
        self.label = label
        self.done = 0
        self.total = 0
        self.started = time.monotonic()
        self._shown = (-1, -1)
        self._handle = display(HTML(self._markup()), display_id=True)

    def callback(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def _markup(self, final: str = "") -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        text = f"{human_bytes(self.done)}"
        if self.total:
            text += f" / {human_bytes(self.total)}"
        text += f" &middot; {human_bytes(rate)}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f" &middot; ETA {math.ceil((self.total - self.done) / rate)} s"
        maximum = max(self.total, 1)
        value = min(self.done, maximum) if self.total else 0
        return (f"<div><code>{html.escape(self.label)}</code> "
                f"<progress value='{value}' max='{maximum}' style='width:40%'></progress> "
                f"{text}{(' &middot; ' + html.escape(final)) if final else ''}</div>")

    def render(self, final: str = "") -> None:
        if not final and (self.done, self.total) == self._shown:
            return
        self._shown = (self.done, self.total)
        if self._handle is not None:
            self._handle.update(self._html(self._markup(final)))


def _progress_for(progress: ProgressArg, label: str) -> tuple[ProgressCallback | None,
                                                               NotebookProgress | None]:
    if callable(progress):
        return progress, None
    if progress is False or not in_notebook():
        return None, None  # progress=True outside a notebook: the CLI draws its own bars
    bar = NotebookProgress(label)
    return bar.callback, bar


# --- jobs ------------------------------------------------------------------------------------


class LogFollower(Iterator[bytes]):
    """A job's log as a blocking iterator of byte chunks, until the job ends.

    One task on the portal runs the async ``follow`` and hands chunks over a small buffer,
    so the async generator lives in a single task (as cancel scopes require). Closing the
    iterator (or dropping it, or Ctrl-C) cancels that task.
    """

    def __init__(self, portal: BlockingPortal, job: AsyncJob, offset: int = 0,
                 buffer: int = 64, *, window: int = FOLLOW_WINDOW) -> None:
        self._closed = False
        self._portal = portal
        self._job = job
        self.offset = offset  # the log offset after the last chunk handed out
        send, receive = anyio.create_memory_object_stream[bytes | BaseException](buffer)
        self._receive: MemoryObjectReceiveStream[bytes | BaseException] = receive
        self._pump = portal.start_task_soon(self._run_pump, send, offset, window)

    async def _run_pump(self, send: MemoryObjectSendStream[bytes | BaseException],
                        offset: int, window: int) -> None:
        async with send:
            try:
                async for chunk in self._job.follow(offset, window=window):
                    await send.send(chunk)
            except Exception as exc:  # handed to the reader, raised in its thread
                await send.send(exc)

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        try:
            item = run_on_portal(self._portal, self._receive.receive)
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self.close()
            raise StopIteration from None
        except BaseException:
            self.close()
            raise
        if isinstance(item, BaseException):
            self.close()
            raise item
        self.offset += len(item)
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            pump = getattr(self, "_pump", None)
            if pump is not None:
                pump.cancel()

    def __enter__(self) -> LogFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A ``for`` loop left with ``break`` drops the iterator: stop the pump with it.
        self.close()


class Job:
    """Blocking handle on a remote job: ``status``, ``tail``, ``follow``, ``wait``, ``kill``."""

    def __init__(self, portal: BlockingPortal, aio: AsyncJob) -> None:
        self._portal = portal
        self.aio = aio

    @property
    def job_id(self) -> str:
        return self.aio.job_id

    @property
    def info(self) -> JobInfo | None:
        """The last state seen (no round trip); ``status()`` asks the remote."""
        return self.aio.info

    status = twin(AsyncJob.status)
    tail = twin(AsyncJob.tail)
    read = twin(AsyncJob.read)
    wait = twin(AsyncJob.wait)
    kill = twin(AsyncJob.kill)

    @share_doc(AsyncJob.follow, returns="LogFollower")
    def follow(self, offset: int = 0, *, window: int = FOLLOW_WINDOW) -> LogFollower:
        # A blocking iterator (``for chunk in job.follow()``); closing it stops the follow.
        return LogFollower(self._portal, self.aio, offset, window=window)

    def watch(self, offset: int = 0, file: IO[str] | None = None) -> JobInfo:
        """Print the log as it comes (from ``offset``) until the job ends; return its state."""
        out = file or sys.stdout
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with self.follow(offset) as chunks:
            for chunk in chunks:
                out.write(decoder.decode(chunk))
                out.flush()
        out.write(decoder.decode(b"", final=True))
        return self.wait()

    # --- display -------------------------------------------------------------------------------

    def _snapshot(self, tail_lines: int) -> tuple[JobInfo | None, str | None, str | None]:
        """Fresh state and log tail for a repr; the last known state if the remote is slow."""

        async def fetch() -> tuple[JobInfo, str | None]:
            with anyio.fail_after(_REPR_TIMEOUT_S):
                if not tail_lines:
                    return await self.aio.status(), None
                text = await self.aio.tail(tail_lines)  # the state comes with it
                return self.aio.info or await self.aio.status(), text

        try:
            info, text = run_on_portal(self._portal, fetch)
            return info, text, None
        except Exception as exc:  # a repr must not raise: show what we last knew
            return self.aio.info, None, f"{type(exc).__name__}: {exc}"

    def __repr__(self) -> str:
        info, _, problem = self._snapshot(0)
        return _job_text(self.job_id, info, problem)

    def _repr_html_(self) -> str:
        info, text, problem = self._snapshot(_REPR_TAIL_LINES)
        return _job_html(self.job_id, info, text, problem)


def _exit_text(info: JobInfo) -> str:
    if info.state == "running":
        return f"pid {info.pid}"
    if info.signal:
        return f"signal {info.signal}"
    return "" if info.exit_code is None else f"exit {info.exit_code}"


def _job_text(job_id: str, info: JobInfo | None, problem: str | None) -> str:
    if info is None:
        return f"<Job {job_id} unknown{' (' + problem + ')' if problem else ''}>"
    bits = [info.state, _exit_text(info), job_duration(info), repr(info.command[:80]),
            usage_line(info.usage, info.reason)]
    stale = " (last known)" if problem else ""
    return f"<Job {job_id} {' '.join(b for b in bits if b)}{stale}>"


_STATE_COLOURS = {"running": "#1a73e8", "exited": "#188038", "killed": "#b06000", "lost": "#c5221f"}


def _job_html(job_id: str, info: JobInfo | None, tail: str | None, problem: str | None) -> str:
    state = info.state if info else "unknown"
    if info is not None and info.state == "exited" and info.exit_code not in (0, None):
        colour = "#c5221f"
    else:
        colour = _STATE_COLOURS.get(state, "#5f6368")
    parts = [f"<div><b>job <code>{html.escape(job_id)}</code></b> "
             f"<span style='color:{colour};font-weight:bold'>{html.escape(state)}</span>"]
    if info is not None:
        details = " &middot; ".join(html.escape(b) for b in (_exit_text(info), job_duration(info)) if b)
        if details:
            parts.append(f" &middot; {details}")
        parts.append(f"<br><code>{html.escape(info.command)}</code>")
        if info.cwd:
            parts.append(f" <small>in {html.escape(info.cwd)}</small>")
        if usage_line(info.usage, info.reason):
            parts.append(f"<br><small>{html.escape(usage_line(info.usage, info.reason))}</small>")
    if problem:
        parts.append(f"<br><small>(last known state: {html.escape(problem)})</small>")
    if tail:
        parts.append("<pre style='max-height:20em;overflow:auto;margin-top:0.5em'>"
                     f"{html.escape(tail)}</pre>")
    parts.append("</div>")
    return "".join(parts)


class Jobs:
    """``tether.jobs`` on the blocking Tether."""

    def __init__(self, portal: BlockingPortal, aio: AsyncJobs) -> None:
        self._portal = portal
        self.aio = aio

    start = twin_wrapping(AsyncJobs.start, Job, "Job")
    get = twin_wrapping(AsyncJobs.get, Job, "Job")
    list = twin(AsyncJobs.list)
    run_commands = twin(AsyncJobs.run_commands)


# --- files -----------------------------------------------------------------------------------


class Files:
    """``tether.files`` on the blocking Tether; transfers show a progress bar in notebooks.

    ``progress``: None draws a bar when running in a notebook, False draws none, and a
    callable ``progress(done_bytes, total_bytes)`` is called instead (on the loop thread).
    """

    def __init__(self, portal: BlockingPortal, aio: AsyncFiles) -> None:
        self._portal = portal
        self.aio = aio

    def _transfer(self, label: str, func: Callable[..., Awaitable[T]], progress: ProgressArg,
                  *args: Any, **kwargs: Any) -> T:
        callback, bar = _progress_for(progress, label)
        call = functools.partial(func, *args, progress=callback, **kwargs)
        try:
            result = run_on_portal(self._portal, call, tick=bar.render if bar else None)
        except BaseException as exc:
            if bar is not None:
                bar.render(final=f"failed: {type(exc).__name__}")
            raise
        if bar is not None:
            bar.render(final="done")
        return result

    # Transfers take ``progress`` as ``ProgressArg`` (a notebook bar by default); the rest of
    # their faces, docstrings included, are the async ones (``share_doc`` checks the match).

    @share_doc(AsyncFiles.upload, annotations={"progress": "ProgressArg"})
    def upload(self, local_path: str | os.PathLike[str], remote_path: str, *,
               progress: ProgressArg = None, chunk_size: int = DEFAULT_CHUNK_BYTES,
               window: int = DEFAULT_WINDOW) -> TransferResult:
        return self._transfer(f"upload {local_path} -> {remote_path}", self.aio.upload, progress,
                              local_path, remote_path, chunk_size=chunk_size, window=window)

    @share_doc(AsyncFiles.download, annotations={"progress": "ProgressArg"})
    def download(self, remote_path: str, local_path: str | os.PathLike[str], *,
                 progress: ProgressArg = None, chunk_size: int = DEFAULT_CHUNK_BYTES,
                 window: int = DEFAULT_WINDOW, via: str = "auto") -> TransferResult:
        return self._transfer(f"download {remote_path} -> {local_path}", self.aio.download,
                              progress, remote_path, local_path, chunk_size=chunk_size,
                              window=window, via=via)

    @share_doc(AsyncFiles.sync, annotations={"progress": "ProgressArg"})
    def sync(self, local_dir: str | os.PathLike[str], remote_dir: str, *,
             exclude: str | Sequence[str] | None = None, delete: bool = False,
             max_bytes: int | None = DEFAULT_SYNC_MAX_BYTES, progress: ProgressArg = None,
             gitignore: bool = True, dry_run: bool = False,
             allow_root_delete: bool = False) -> dict[str, Any]:
        return self._transfer(f"sync {local_dir} -> {remote_dir}", self.aio.sync, progress,
                              local_dir, remote_dir, exclude=exclude, delete=delete,
                              max_bytes=max_bytes, gitignore=gitignore, dry_run=dry_run,
                              allow_root_delete=allow_root_delete)

    @share_doc(AsyncFiles.download_dir, annotations={"progress": "ProgressArg"})
    def download_dir(self, remote_dir: str, local_dir: str | os.PathLike[str], *,
                     progress: ProgressArg = None,
                     exclude: str | Sequence[str] | None = None) -> dict[str, Any]:
        return self._transfer(f"download {remote_dir} -> {local_dir}", self.aio.download_dir,
                              progress, remote_dir, local_dir, exclude=exclude)

    list = twin(AsyncFiles.list)
    stat = twin(AsyncFiles.stat)
    read_bytes = twin(AsyncFiles.read_bytes)
    read_text = twin(AsyncFiles.read_text)
    write_bytes = twin(AsyncFiles.write_bytes)
    write_text = twin(AsyncFiles.write_text)
    remove = twin(AsyncFiles.remove)
    mkdir = twin(AsyncFiles.mkdir)
