"""One ``AsyncTether`` per target, opened on first use and held for the server's lifetime.

An ``AsyncTether`` owns a task group, and anyio insists a task group is left from the task
that entered it. Tool calls run in short-lived request tasks, so a tether is never entered
there: each one lives in a holder task of the pool's own task group (opened by the server's
lifespan), and closing the pool cancels the holders, which closes every tether.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from .. import AsyncTether, LinkOptions, Target, parse_target
from ..config import (
    config_path,
    configured_for,
    describe_targets,
    named_targets,
    resolve_name,
    select_target,
)
from ..controller.target import split_url
from ..credentials import TOKEN_ENV, carries_credential, origin, redact, scrub_secrets
from ..errors import ConfigError, TetherError, TetherTimeout

DEFAULT_KEY = "default"
#: The longest a caller waits for a tether to open (tool calls are bounded tighter still);
#: opening goes on in its holder task, so a later call finds it open.
OPEN_WAIT_S = 180.0


@dataclass
class _Slot:
    """A tether being opened or open; ``error`` is set when opening failed."""

    target: Target | None  # the URL and token it opens with (None: the embedded server)
    ready: anyio.Event = field(default_factory=anyio.Event)
    stop: anyio.Event = field(default_factory=anyio.Event)  # set: close this tether
    tether: AsyncTether | None = None
    error: BaseException | None = None
    display_url: str = ""
    name: str = ""  # the config file's name for the target, when reached by name

    @property
    def failed(self) -> bool:
        return self.ready.is_set() and self.tether is None


def _same_credential(a: Target | None, b: Target | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.base_url, a.token) == (b.base_url, b.token)


class TetherPool:
    """Lazily opened tethers keyed by target, plus which target each known job lives on.

    Slots are keyed by where the server is (``DEFAULT_KEY``, else the redacted base URL, so
    a rotated Kaggle URL is the same place). A call that brings its own credential (a token
    in ``server_url``, a named target) different from the open slot's is tried on a tether of
    its own: refused, it fails with the server's answer and the open tether stays; accepted,
    it replaces the slot's tether (same supervisor, jobs and logs) for every later call.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 options: LinkOptions | None = None,
                 output_dir: str | os.PathLike[str] | None = None,
                 embedded_root: str | os.PathLike[str] | None = None,
                 allow_any_server: bool = False) -> None:
        self._token = token
        self._options = options
        self._output_dir = Path(output_dir) if output_dir else None
        self._embedded_root = embedded_root
        # The same rule as connect() and the CLI: a URL or name, $REMOTE_JUPYTER_URL, the
        # config file's default, else (None) the embedded local server.
        self._default_target = select_target(url, token).target
        self._allow_any_server = allow_any_server
        self._slots: dict[str, _Slot] = {}
        self._pending: dict[tuple[str, Target], _Slot] = {}  # a new credential being tried
        self._targets: dict[str, Target] = {}  # pool key -> target, tokens included
        self._lock = anyio.Lock()
        self._task_group: anyio.abc.TaskGroup | None = None
        self.job_targets: dict[str, str] = {}  # job_id -> pool key, for tools without server_url

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> TetherPool:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            task_group.cancel_scope.cancel()  # holders leave their `async with tether` blocks
            await task_group.__aexit__(None, None, None)
        self._slots.clear()
        self._pending.clear()

    # --- secrets ------------------------------------------------------------------------------

    def secrets(self) -> list[str]:
        """Every credential this pool may hold, so error text can be scrubbed of them."""
        found = [self._token or "", os.environ.get(TOKEN_ENV, "")]
        if self._default_target is not None:
            found.append(self._default_target.token)
        for slot in [*self._slots.values(), *self._pending.values()]:
            if slot.target is not None:
                found.append(slot.target.token)
            if slot.tether is not None:  # set only once the tether is open, target known
                found.append(slot.tether.target.token)
        found += [target.token for target in self._targets.values()]
        return [s for s in found if len(s) >= 4]

    def scrub(self, text: str) -> str:
        return scrub_secrets(text, self.secrets())

    # --- targets ------------------------------------------------------------------------------

    def _resolve(self, server_url: str | None) -> tuple[str, Target | None, bool]:
        """The pool key and target for a tool's ``server_url`` (None target: embedded server),
        and whether the call brings a credential of its own (a named target, a token in the
        URL) rather than borrowing the one bound to that server.

        ``server_url`` is a URL (the reference's meaning) or the name of a target in the
        config file (targets.toml), which brings its own token. A URL must be on the default
        server's origin or a named target's (whose token it then borrows when it carries
        none); any other is refused unless ``allow_any_server``, and then gets no token but
        its own. Keys are redacted base URLs, so a server reached by name and by URL shares
        one tether.
        """
        default = self._default_target
        if not server_url or not server_url.strip():
            return DEFAULT_KEY, default, False
        named = resolve_name(server_url)
        if named is not None:
            return self._key(named), named, True
        base, url_token = split_url(server_url)
        explicit = carries_credential(server_url)
        if default is not None and origin(base) == origin(default.base_url):
            target = Target(base, url_token or default.token)
        else:
            configured = configured_for(server_url)
            if configured is not None:
                same = redact(configured.base_url) == redact(base)
                target = Target(base, url_token or configured.token,
                                name=configured.name if same else "")
            elif self._allow_any_server:
                target = Target(base, url_token)
            else:
                raise ConfigError(
                    f"server_url {redact(base)} is neither this MCP server's Jupyter server "
                    f"({default.display_url if default else 'the embedded local server'}) nor "
                    f"a named target in {config_path()}, so it is refused: its tokens go only "
                    "to their own servers. Omit server_url to use the default, or pass a "
                    "target's name (jupyter_status lists them); to reach another server, add "
                    "it to that file, or start the MCP server with --allow-any-server (such "
                    "URLs then get no token unless they carry one)")
        return self._key(target), target, explicit

    def _key(self, target: Target) -> str:
        default = self._default_target
        if default is not None and redact(target.base_url) == redact(default.base_url):
            return DEFAULT_KEY
        return redact(target.base_url)

    def key_for(self, server_url: str | None) -> str:
        return self._resolve(server_url)[0]

    async def get(self, server_url: str | None = None) -> AsyncTether:
        """The open tether for ``server_url`` (default target when None), opening it once."""
        key, target, explicit = self._resolve(server_url)
        return await self._open(key, target, explicit)

    async def _open(self, key: str, target: Target | None, explicit: bool = False
                    ) -> AsyncTether:
        if self._task_group is None:
            raise TetherError("the MCP server is shutting down")
        while True:
            candidate: _Slot | None = None
            pending_key: tuple[str, Target] | None = None
            async with self._lock:
                slot = self._slots.get(key)
                if slot is not None and slot.failed:
                    del self._slots[key]  # the last attempt failed: try again
                    slot = None
                if slot is None:
                    slot = self._start(target)
                    self._slots[key] = slot
                    if target is not None:
                        self._targets[key] = target
                elif explicit and not _same_credential(slot.target, target):
                    # Another credential for this server: tried on its own tether, so a
                    # wrong one fails here while the open tether goes on serving.
                    assert target is not None
                    pending_key = (key, target)
                    candidate = self._pending.get(pending_key)
                    if candidate is None or candidate.failed:
                        candidate = self._start(target)
                        self._pending[pending_key] = candidate
                if target is not None and target.name and not slot.name:
                    slot.name = target.name  # first reached by URL, now by its name too
            if candidate is None or pending_key is None:
                tether = await self._wait(slot)
                if tether is not None:
                    return tether
                continue  # replaced by another credential while opening: use that one
            try:
                tether = await self._wait(candidate)
            finally:
                # Still opening (this caller gave up): it stays pending for the next call.
                if candidate.ready.is_set() and self._pending.get(pending_key) is candidate:
                    del self._pending[pending_key]
            if tether is None:
                continue
            # Swapped with no await in between, so a cancelled caller cannot leave it half done.
            current = self._slots.get(key)
            if current is not candidate and candidate.tether is not None:
                candidate.name = candidate.name or (current.name if current else "")
                self._slots[key] = candidate
                self._targets[key] = pending_key[1]
                if current is not None:
                    current.stop.set()  # the old credential's tether closes
            return tether

    def _start(self, target: Target | None) -> _Slot:
        assert self._task_group is not None
        slot = _Slot(target, display_url=target.display_url if target else
                     "embedded local server", name=target.name if target else "")
        self._task_group.start_soon(self._hold, slot, target)
        return slot

    async def _wait(self, slot: _Slot) -> AsyncTether | None:
        """The slot's tether once open; None when it was closed (replaced) meanwhile."""
        # Opening goes on in the holder even if this caller gives up waiting.
        with anyio.move_on_after(OPEN_WAIT_S) as scope:
            await slot.ready.wait()
        if scope.cancelled_caught:
            raise TetherTimeout(f"connecting to {slot.display_url} took longer than "
                                f"{OPEN_WAIT_S:g}s; "
                                "it goes on in the background (jupyter_status shows its state)")
        if slot.tether is None:
            if slot.stop.is_set() and slot.error is None:
                return None
            if isinstance(slot.error, TetherError):
                raise slot.error  # already names the target, and its type picks the hint
            raise TetherError(f"could not connect to {slot.display_url}: {slot.error}")
        return slot.tether

    async def _hold(self, slot: _Slot, target: Target | None) -> None:
        kwargs: dict[str, Any] = {"options": self._options, "output_dir": self._output_dir}
        if target is None:
            if self._embedded_root is not None:
                kwargs["embedded_root"] = self._embedded_root
            tether = AsyncTether(**kwargs)
        else:
            tether = AsyncTether(target=target, **kwargs)
        try:
            async with tether:
                slot.tether = tether
                slot.display_url = tether.target.display_url
                slot.ready.set()
                await slot.stop.wait()
        except Exception as exc:
            slot.error = exc
        finally:
            slot.tether = None
            slot.ready.set()

    def opened(self) -> dict[str, AsyncTether]:
        return {key: slot.tether for key, slot in self._slots.items() if slot.tether is not None}

    def describe(self) -> list[dict[str, Any]]:
        """Targets this server has used, open or not, without credentials."""
        rows = []
        for key, slot in self._slots.items():
            state = "open" if slot.tether else ("failed" if slot.ready.is_set() else "opening")
            row: dict[str, Any] = {"target": slot.display_url, "name": slot.name or None,
                                   "default": key == DEFAULT_KEY, "state": state}
            if slot.error is not None:
                row["error"] = self.scrub(str(slot.error))
            rows.append(row)
        return rows

    def configured(self) -> dict[str, Any]:
        """Every named target of the config file (no secrets), with its state in this pool:
        one of open, opening, failed, or not opened."""
        path = config_path()
        out: dict[str, Any] = {"config": str(path), "targets": []}
        try:
            rows = describe_targets(path)
            entries = named_targets(path)
        except ConfigError as exc:
            out["error"] = self.scrub(str(exc))
            return out
        default_url = redact(self._default_target.base_url) if self._default_target else None
        for row in rows:
            url = entries.get(row["name"], {}).get("url")
            key = None
            if isinstance(url, str) and url.strip():
                with contextlib.suppress(ConfigError):
                    key = redact(parse_target(url, token="").base_url)
            is_default = key is not None and key == default_url
            slot = self._slots.get(DEFAULT_KEY if is_default else key or "")
            state = "not opened"
            if slot is not None:
                state = "open" if slot.tether else ("failed" if slot.ready.is_set()
                                                    else "opening")
            out["targets"].append({**row, "mcp_default": is_default, "state": state})
        return out

    # --- jobs ---------------------------------------------------------------------------------

    def remember_job(self, job_id: str, server_url: str | None) -> None:
        self.job_targets[job_id] = self.key_for(server_url)

    async def for_job(self, job_id: str, server_url: str | None = None) -> AsyncTether:
        """The tether a job lives on: ``server_url`` if given, else where we saw it, else default."""
        if server_url:
            return await self.get(server_url)
        key = self.job_targets.get(job_id, DEFAULT_KEY)
        if key == DEFAULT_KEY:
            return await self.get(None)
        # The target (and token) that reached the job before, even if given by name.
        target = self._targets.get(key)
        return await self._open(key, target) if target is not None else await self.get(key)
