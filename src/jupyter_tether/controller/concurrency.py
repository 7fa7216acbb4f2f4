"""Bounded concurrency where the first error wins: ``limited_tasks`` starts tasks one by one
(a producer that reads as it goes), ``gather_limited`` runs a list of jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import anyio
import anyio.abc

T = TypeVar("T")


class LimitedTasks:
    """Tasks of one task group, at most ``limit`` running; see ``limited_tasks``."""

    def __init__(self, group: anyio.abc.TaskGroup, limit: int) -> None:
        self._group = group
        self._gate = anyio.Semaphore(limit)
        self.failures: list[BaseException] = []

    async def slot(self) -> bool:
        """Wait for a free slot; False once a task has failed (start nothing more)."""
        await self._gate.acquire()
        return not self.failures

    def start(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``func(*args)`` in the slot that ``slot()`` gave."""
        self._group.start_soon(self._run, func, args)

    def fail(self, exc: BaseException) -> None:
        """Record ``exc`` (the first one recorded wins) and cancel the rest."""
        self.failures.append(exc)
        self._group.cancel_scope.cancel()

    async def _run(self, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await func(*args)
        except Exception as exc:
            self.fail(exc)
        finally:
            self._gate.release()


@asynccontextmanager
async def limited_tasks(limit: int) -> AsyncIterator[LimitedTasks]:
    """``async with limited_tasks(n) as tasks``: ``if not await tasks.slot(): break``, then
    ``tasks.start(func, *args)``, as often as there is work. Leaving waits for the tasks.

    The first error wins, the body's own included: no further task starts, the running ones
    are cancelled, and that error is raised as it is (not wrapped in an ExceptionGroup).
    """
    async with anyio.create_task_group() as group:
        tasks = LimitedTasks(group, limit)
        try:
            yield tasks
        except Exception as exc:  # raised from inside the group it would be wrapped
            tasks.fail(exc)
    if tasks.failures:
        raise tasks.failures[0]


async def gather_limited(jobs: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run coroutine factories with at most ``limit`` at once; their results, in ``jobs`` order.

    The first error wins: no further job starts, the running ones are cancelled, and that
    error is raised as it is (not wrapped in an ExceptionGroup).
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    results: list[T | None] = [None] * len(jobs)
    if not jobs:
        return []

    async def run(index: int) -> None:
        results[index] = await jobs[index]()

    async with limited_tasks(limit) as tasks:
        for index in range(len(jobs)):
            if not await tasks.slot():
                break
            tasks.start(run, index)
    return cast("list[T]", results)  # every job ran and filled its slot
