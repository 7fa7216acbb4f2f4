"""Several named targets at once (``status --all``, ``submit -t A -t B``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio

from .. import ConfigError, Target
from ..config import config_path, named_targets, target_from_config
from .context import one_line


def configured_targets(names: Sequence[str] | None = None
                       ) -> list[tuple[str, Target | None, str | None]]:
    """``(name, target, error)`` for the given names (default: every named target).

    An entry that cannot be used (no url, its token env var unset) keeps its error, so one
    bad entry does not hide the others; a name that is not in the file is a usage error.
    """
    path = config_path()
    known = named_targets(path)
    if names is None:
        names = list(known)
        if not names:
            raise ConfigError(f"no named targets in {path}: add [NAME] tables with a url "
                              "(see `jupyter-tether targets --help`)")
    rows: list[tuple[str, Target | None, str | None]] = []
    for name in names:
        if name not in known:
            target_from_config(name, path)  # raises the "no target named ..." error
        try:
            rows.append((name, target_from_config(name, path), None))
        except ConfigError as exc:
            rows.append((name, None, one_line(exc)))
    return rows


async def gather(items: Sequence[Any], work: Callable[[Any], Any]) -> list[Any]:
    """``await work(item)`` for every item at once; results in the items' order."""
    results: list[Any] = [None] * len(items)

    async def one(index: int) -> None:
        results[index] = await work(items[index])

    async with anyio.create_task_group() as group:
        for index in range(len(items)):
            group.start_soon(one, index)
    return results
