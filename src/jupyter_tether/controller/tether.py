"""``AsyncTether``: the async controller API over one remote (or embedded local) Jupyter server."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import platformdirs

from ..agent_payload.wire import Op
from ..config import select_target
from ..errors import ConfigError, ConnectionLost, KernelError, TetherError, TetherTimeout
from .embedded import LocalJupyterServer
from .execute import ExecResult, OutputCallback, execute
from .files import AsyncFiles
from .forward import Forwarder, PortForward
from .jobs import AsyncJobs
from .kernel_ws import KernelSocket
from .kernels import SUPERVISOR_SESSION, WORK_SESSION, discard_failed_start, find_or_start
from .link import LinkOptions, SupervisorLink
from .notebooks.service import AsyncNotebooks
from .relayed_exec import RelayUnavailable, execute_relayed
from .resources import fetch_resources
from .rest import JupyterRest
from .state import TargetState
from .submit import SubmitProgress, Submits
from .target import Target


def default_output_dir() -> Path:
    return Path(platformdirs.user_cache_dir("jupyter-tether")) / "outputs"


class AsyncTether:
    """Async handle on a remote Jupyter server and the supervisor injected into it.

    ``async with AsyncTether(url, token) as t: await t.exec("print(1)")``. Which server it
    reaches follows one rule with the CLI and the MCP server (see ``__init__``).
    """

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
        """Pick the Jupyter server (``AsyncTether`` connects on ``async with``).

        The server, first match wins:

        1. ``url``: a URL as pasted from a browser (``http://host:8888/?token=...``,
           Kaggle's ``.../proxy``, JupyterHub's ``.../user/NAME/lab``), or the name of a
           target in ``targets.toml`` (``connect("lab")``);
        2. ``target``: a target's name in ``targets.toml``, or a ``Target``;
        3. ``$REMOTE_JUPYTER_URL`` (with ``$REMOTE_JUPYTER_TOKEN``);
        4. the ``default = "NAME"`` of ``targets.toml`` (``jupyter-tether targets`` lists it);
        5. none of these: an embedded local Jupyter server, rooted at ``embedded_root``
           (default: a workspace folder under the user data dir).

        ``token`` goes to the chosen server; without it a URL's own ``?token=`` or a target's
        configured token is used, and ``$REMOTE_JUPYTER_TOKEN`` is sent only to
        ``$REMOTE_JUPYTER_URL``'s origin. A name that is neither a URL nor a configured
        target raises ``ConfigError``. ``options`` tunes the link (keepalive, reconnect);
        ``output_dir`` is where ``exec`` saves images.
        """
        self._embedded: LocalJupyterServer | None = None
        if isinstance(target, Target):
            if url is not None:
                raise ConfigError("give either a URL or target=, not both")
            chosen: Target | None = target
        else:
            chosen = select_target(url, token, target).target
        if chosen is None:
            self._embedded = LocalJupyterServer(embedded_root)
        elif embedded_root is not None:
            raise ConfigError(f"embedded_root is the folder of the embedded local server, but "
                              f"{chosen.display_url} is selected: leave out one of them")
        self._target = chosen
        self.options = options or LinkOptions()
        self.output_dir = Path(output_dir) if output_dir else default_output_dir()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._rest: JupyterRest | None = None
        self._link: SupervisorLink | None = None
        self._work_sockets: dict[str, KernelSocket] = {}
        self._work_locks: dict[str, anyio.Lock] = {}
        self._default_work_kernel: str | None = None
        #: the default work kernel, when this tether started it and it has not answered yet
        self._unproven_work_kernel: str | None = None
        self._state: TargetState | None = None
        self._forwarder: Forwarder | None = None
        #: ``exec`` through the supervisor, which drives the work kernel over its ZMQ ports
        #: on the remote host (one message per small cell); False: the work kernel's
        #: websocket. Kernels the supervisor cannot reach use the websocket anyway.
        self.relay_exec = True
        self._no_relay: set[str] = set()
        #: the server's ``/api`` answer and the link generation it was asked in (``ping``)
        self._server_version: tuple[int, dict[str, Any]] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncTether:
        if self._embedded is not None:
            await anyio.to_thread.run_sync(self._embedded.start)
            self._target = self._embedded.target
        assert self._target is not None
        self._state = TargetState(self._target.key)
        self._rest = JupyterRest(self._target)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        try:
            await self._rest.status()  # fail fast, with a clear message, on a bad URL/token
            self._link = SupervisorLink(self._target, self._rest, self._state, self.options)
            await self._link.start(self._task_group)
            # The services see the supervisor only through the link (a ``Caller``).
            self.jobs = AsyncJobs(self._link)
            self.files = AsyncFiles(self._link)
            self._submits = Submits(self._link, self.files, self.jobs)
            self.notebooks = AsyncNotebooks(self)
        except BaseException as exc:
            await self._shutdown(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._shutdown(exc_type, exc, tb)

    async def _shutdown(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        with anyio.CancelScope(shield=True):
            if self._forwarder is not None:
                await self._forwarder.aclose()
            if self._link is not None:
                await self._link.aclose()
            for sock in self._work_sockets.values():
                await sock.aclose()
                if self._state is not None:
                    self._state.release_session_id(sock.session_id)
        try:
            if self._task_group is not None:
                # Exited outside the shield: a task group must close in the scope it opened in.
                task_group, self._task_group = self._task_group, None
                task_group.cancel_scope.cancel()
                # The caller's exception did not come from our tasks: do not wrap it in a group.
                await task_group.__aexit__(None, None, None)
        finally:
            # Whatever the tasks raised, the HTTP client and the embedded server must go.
            with anyio.CancelScope(shield=True):
                if self._rest is not None:
                    await self._rest.aclose()
                if self._embedded is not None:
                    await anyio.to_thread.run_sync(self._embedded.stop)

    async def aclose(self) -> None:
        await self._shutdown(None, None, None)

    # --- internals (the CLI's interrupt and tests reach the link and the REST client) ------

    @property
    def link(self) -> SupervisorLink:
        if self._link is None:
            raise ConnectionLost("the tether is not open: use `async with AsyncTether(...)`")
        return self._link

    @property
    def rest(self) -> JupyterRest:
        if self._rest is None:
            raise ConnectionLost("the tether is not open: use `async with AsyncTether(...)`")
        return self._rest

    @property
    def target(self) -> Target:
        assert self._target is not None
        return self._target

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        assert self._task_group is not None
        return self._task_group

    # --- port forwarding ---------------------------------------------------------------------

    async def forward(self, remote_port: int, local_port: int = 0,
                      remote_host: str = "127.0.0.1", *,
                      allow_remote_host: bool = False) -> PortForward:
        """Reach ``remote_host:remote_port`` on the remote at ``http://127.0.0.1:PORT`` here.

        Listens on 127.0.0.1 only (``local_port`` 0: any free port); each connection is one
        stream over the link. A ``remote_host`` other than the remote's loopback needs
        ``allow_remote_host=True``. ``await fwd.close()`` or ``async with`` ends it.
        """
        if self._forwarder is None:
            self._forwarder = Forwarder(self.link, self.rest, self.task_group)
        return await self._forwarder.open(remote_port, local_port, remote_host,
                                          allow_remote_host=allow_remote_host)

    def forwards(self) -> list[dict[str, Any]]:
        """The open forwards, with their connection and byte counts."""
        return self._forwarder.list() if self._forwarder is not None else []

    # --- server and supervisor ----------------------------------------------------------------

    async def ping(self, timeout: float = 30.0) -> dict[str, Any]:
        """Round trip to the supervisor; returns the RTT and the server's version.

        One round trip: the version is asked once per connection (beside the first ping,
        not after it) and kept; a reconnect may reach an upgraded server, so it is asked
        again then.
        """
        link = self.link
        version = self._server_version
        fetched: list[BaseException] = []
        done = anyio.Event()
        deadline = anyio.current_time() + timeout
        if version is None or version[0] != link.generation:
            # Beside the ping, not after it: the first one costs one round trip too.
            self.task_group.start_soon(self._fetch_server_version, fetched, done)
        else:
            done.set()
        started = time.perf_counter()
        await link.call(Op.PING, timeout=timeout)
        rtt = time.perf_counter() - started
        with anyio.move_on_after(deadline - anyio.current_time()):  # what is left of it
            await done.wait()
        if not done.is_set():
            raise TetherTimeout(f"the server's /api did not answer within {timeout}s")
        if fetched:
            raise fetched[0]
        version = self._server_version
        return {"ok": True, "rtt_ms": round(rtt * 1000, 3),
                "server_version": (version[1] if version else {}).get("version"),
                "url": self.target.display_url, "supervisor_pid": link.facts.get("pid")}

    async def _fetch_server_version(self, fetched: list[BaseException],
                                    done: anyio.Event) -> None:
        """``/api`` into the cache; what it raised into ``fetched``, for ``ping`` to raise."""
        generation = self.link.generation
        try:
            self._server_version = (generation, await self.rest.version())
        except Exception as exc:
            fetched.append(exc)
        finally:
            done.set()

    async def info(self) -> dict[str, Any]:
        """What the supervisor told us at ``hello``: python, host, root dir, capabilities."""
        return dict(self.link.facts)

    async def env_snapshot(self, timeout: float = 120.0) -> dict[str, Any]:
        """The remote's environment: Python, platform, CPUs, CUDA, nvidia-smi, pip freeze, torch."""
        reply = await self.link.call(Op.ENV_SNAPSHOT, {"timeout": max(5.0, timeout - 5)},
                                     timeout=timeout)
        result: dict[str, Any] = reply.result
        return result

    async def resources(self, *, jobs: bool = True, gpus: bool = True, watch_s: float = 15.0,
                        timeout: float = 30.0) -> dict[str, Any]:
        """What the remote has and what its jobs use: ``host`` (RAM, swap, load, CPUs, disks),
        ``gpus`` (nvidia-smi's devices, their processes mapped to jobs; ``available`` False
        where there is none), ``jobs`` (each running job's CPU %, RSS and peak, threads,
        open files, GPU memory), ``warnings`` and the ``sampler``'s own cost. The remote
        keeps sampling once a second for ``watch_s`` more seconds."""
        return await fetch_resources(self.link, jobs=jobs, gpus=gpus, watch_s=watch_s,
                                     timeout=timeout)

    async def status(self) -> dict[str, Any]:
        """The link's state (connected, reconnects, last error), the target and its kernels."""
        link = self.link
        return {"target": self.target.display_url, "name": self.target.name,
                "embedded": self._embedded is not None, **link.status(),
                "work_kernel_id": self._default_work_kernel,
                "root_dir": link.facts.get("root_dir"), "hostname": link.facts.get("hostname")}

    # --- job specs ---------------------------------------------------------------------------

    async def submit(self, spec: dict[str, Any], *, progress: SubmitProgress | None = None,
                     dry_run: bool = False) -> dict[str, Any]:
        """Sync, bootstrap, then start the spec's run as a background job; returns at once.

        ``spec`` is ``{"sync": [...], "bootstrap": {...}, "run": {...}, "artifacts": [...]}``
        (``run`` is required). The result names the job (``job_id``) and what was synced and
        bootstrapped; a failing bootstrap command starts no run (``ok`` is false, ``error``
        says which). A retried identical submit returns the same job. ``dry_run`` changes
        nothing and reports what each sync would send and delete. ``progress(phase, done,
        total)`` is called as it goes.
        """
        return await self._submits.submit(spec, progress=progress, dry_run=dry_run)

    async def collect(self, job_id: str, local_dir: str | os.PathLike[str], *,
                      require_done: bool = True,
                      progress: SubmitProgress | None = None) -> dict[str, Any]:
        """Download the artifacts a submitted job listed into ``local_dir``.

        Works from any controller (the submit's record is on the remote). Refuses while the
        job runs unless ``require_done`` is False; a missing artifact does not stop the
        others (each download reports ``ok`` and ``error``).
        """
        return await self._submits.collect(job_id, local_dir, require_done=require_done,
                                           progress=progress)

    # --- kernels and sessions -------------------------------------------------------------

    async def server_version(self) -> dict[str, Any]:
        """The Jupyter server's ``/api`` answer (its version)."""
        version = await self.rest.version()
        self._server_version = (self.link.generation, version)
        return version

    async def list_kernels(self) -> list[dict[str, Any]]:
        """The server's running kernels (id, name, execution state, last activity)."""
        return await self.rest.list_kernels()

    async def list_sessions(self) -> list[dict[str, Any]]:
        """The server's sessions (notebooks and consoles with their kernels); ``[]`` if none."""
        return await self.rest.list_sessions()

    async def start_kernel(self, kernel_name: str = "python3") -> dict[str, Any]:
        """Start a kernel of ``kernel_name`` on the server; returns its model (with ``id``)."""
        return await self.rest.start_kernel(kernel_name, path="")

    async def shutdown_kernel(self, kernel_id: str, now: bool = True) -> None:
        """Shut a kernel down (``now=False``: interrupt it first); never the supervisor's."""
        if kernel_id == self.link.kernel_id:
            raise ConfigError(
                f"kernel {kernel_id} is jupyter-tether's supervisor; shutting it down would stop "
                "job supervision (jobs keep running). Use `jupyter-tether` status to see it."
            )
        sock = self._work_sockets.pop(kernel_id, None)
        if sock is not None:
            await sock.aclose()
        if not now:
            # A polite shutdown: ask the kernel itself first, then let the server reap it.
            await self.rest.interrupt_kernel(kernel_id)
        await self.rest.shutdown_kernel(kernel_id)
        if kernel_id == self._default_work_kernel:
            self._default_work_kernel = None

    # --- exec ---------------------------------------------------------------------------------

    async def work_kernel_id(self) -> str:
        """The persistent default work kernel (a named session), started on first use."""
        if self._default_work_kernel is None:
            assert self._state is not None
            kernel_id, started = await find_or_start(self.rest, WORK_SESSION,
                                                     kernel_name=self.options.kernel_name,
                                                     state=self._state)
            self._default_work_kernel = kernel_id
            self._unproven_work_kernel = kernel_id if started else None
        return self._default_work_kernel

    def _proven(self, kernel_id: str) -> None:
        if kernel_id == self._unproven_work_kernel:
            self._unproven_work_kernel = None

    async def _work_socket(self, kernel_id: str) -> KernelSocket:
        sock = self._work_sockets.get(kernel_id)
        if sock is None or sock.closed.is_set():
            assert self._state is not None
            if sock is not None:
                self._state.release_session_id(sock.session_id)
            session_id = self._state.claim_session_id(f"kernel:{kernel_id}")
            sock = KernelSocket(self.target, kernel_id, session_id=session_id,
                                cookies=self.rest.cookie_header, ping_interval=self.options.ping_interval,
                                ping_timeout=self.options.ping_timeout,
                                max_message_bytes=self.options.max_message_bytes,
                                open_timeout=self.options.open_timeout)
            await sock.open(self.task_group)
            self._work_sockets[kernel_id] = sock
        return sock

    async def exec(
        self,
        code: str,
        *,
        kernel_id: str | None = None,
        timeout: float | None = None,
        max_output_chars: int = 20_000,
        on_output: OutputCallback | None = None,
        output_dir: str | os.PathLike[str] | None = None,
    ) -> ExecResult:
        """Run Python in a work kernel (never the supervisor's) and return its outputs.

        The default work kernel is one persistent kernel (its variables stay between
        calls); ``kernel_id`` picks another. Runs until the code ends, like a notebook cell;
        with ``timeout`` (seconds) the kernel is interrupted then and the result's status
        is ``"timeout"``. Output streams to ``on_output(kind, text)`` as it arrives
        (``kind``: stdout, stderr, result or error); stdout and stderr keep their last
        ``max_output_chars`` chars. Images are saved to files under ``output_dir``.

        The ``ExecResult`` is true when the code ran without error; ``.value`` is the last
        expression's text, ``.raise_for_error()`` raises ``ExecError`` with the remote
        traceback (``TetherTimeout`` on timeout).
        """
        if kernel_id is not None and kernel_id == self.link.kernel_id:
            raise ConfigError(
                "that kernel runs jupyter-tether's supervisor; user code runs in a work kernel "
                "(omit kernel_id for the default one)"
            )
        target_kernel = kernel_id or await self.work_kernel_id()
        image_dir = Path(output_dir) if output_dir else self.output_dir
        lock = self._work_locks.setdefault(target_kernel, anyio.Lock())
        async with lock:
            if self.relay_exec and target_kernel not in self._no_relay and \
                    Op.KERNEL_EXEC in self.link.facts.get("ops", ()):
                try:
                    # Through the supervisor: one message per small cell behind a proxy.
                    result = await self._run_cell(functools.partial(
                        execute_relayed, self.link, target_kernel, code, timeout=timeout,
                        max_output_chars=max_output_chars, image_dir=image_dir,
                        on_output=on_output, interrupt=self._interrupter(target_kernel)))
                    self._proven(target_kernel)
                    return result
                except RelayUnavailable as exc:
                    # Not on the supervisor's host (a gateway), or gone: the websocket
                    # path says which, and starts a fresh default work kernel if need be.
                    # A passing cause (a slow start, a restart) is tried again next time.
                    if exc.lasting:
                        self._no_relay.add(target_kernel)
            if kernel_id is not None and await self.rest.get_kernel(kernel_id) is None:
                raise KernelError(f"no kernel {kernel_id} on {self.target.display_url}; "
                                  "list them with list_kernels()")
            try:
                sock = await self._work_socket(target_kernel)
            except KernelError:
                if kernel_id is not None:
                    raise
                # The default work kernel was culled or shut down elsewhere: start anew.
                self._default_work_kernel = None
                target_kernel = await self.work_kernel_id()
                sock = await self._work_socket(target_kernel)
            except ConnectionLost as exc:
                if target_kernel != self._unproven_work_kernel:
                    raise
                # Ours, just started, and it never answered: replace it once, as the
                # supervisor's own.
                await discard_failed_start(self.rest, "work", target_kernel, exc)
                self._default_work_kernel = None
                target_kernel = await self.work_kernel_id()
                sock = await self._work_socket(target_kernel)
            self._proven(target_kernel)
            return await self._run_cell(functools.partial(
                execute, sock, code, timeout=timeout, max_output_chars=max_output_chars,
                image_dir=image_dir, on_output=on_output,
                interrupt=self._interrupter(target_kernel)))

    def _interrupter(self, kernel_id: str) -> Callable[[], Awaitable[None]]:
        async def interrupt() -> None:
            with contextlib.suppress(TetherError):  # a kernel gone meanwhile says so itself
                await self.rest.interrupt_kernel(kernel_id)

        return interrupt

    @staticmethod
    async def _run_cell(attempt: Callable[[], Awaitable[ExecResult]]) -> ExecResult:
        """``attempt()``, sent again (twice at most) while it comes back "aborted": the
        kernel skipped the code without running it (it was still flushing its queue after
        an interrupted cell), so sending it again is safe."""
        for _ in range(3):
            result = await attempt()
            if result.status != "aborted":
                break
            await anyio.sleep(0.2)
        return result


__all__ = ["SUPERVISOR_SESSION", "AsyncTether"]
