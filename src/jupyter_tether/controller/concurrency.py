"""Bounded concurrency where the first error wins: ``gather_limited``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar, cast

import anyio

T = TypeVar("T")


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
    failures: list[BaseException] = []
    gate = anyio.Semaphore(limit)

    async def run(index: int, scope: anyio.CancelScope) -> None:
        try:
            results[index] = await jobs[index]()
        except Exception as exc:
            failures.append(exc)
            scope.cancel()
        finally:
            gate.release()

    async with anyio.create_task_group() as group:
        for index in range(len(jobs)):
            await gate.acquire()
            if failures:
                break
            group.start_soon(run, index, group.cancel_scope)
    if failures:
        raise failures[0]
    return cast("list[T]", results)  # every job ran and filled its slot
