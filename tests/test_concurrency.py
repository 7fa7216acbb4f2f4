"""``gather_limited`` and ``limited_tasks``: bounded concurrency, results in order, the first
error wins."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

from jupyter_tether.controller.concurrency import gather_limited, limited_tasks


def test_runs_at_most_limit_at_once_and_returns_results_in_order() -> None:
    active = peak = 0

    def job(index: int) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            for _ in range(5 + index % 3):  # long enough for the slots to fill; out of order
                await anyio.sleep(0)
            active -= 1
            return index * 10

        return run

    results = anyio.run(gather_limited, [job(i) for i in range(10)], 3)
    assert results == [i * 10 for i in range(10)]
    assert peak == 3


def test_first_error_is_raised_unwrapped_and_stops_the_rest() -> None:
    started: list[int] = []
    cancelled: list[int] = []

    async def waits_forever() -> None:
        started.append(0)
        try:
            await anyio.Event().wait()
        except anyio.get_cancelled_exc_class():
            cancelled.append(0)
            raise

    async def fails() -> None:
        started.append(1)
        raise ValueError("boom")

    async def later(index: int) -> None:
        started.append(index)

    jobs = [waits_forever, fails] + [lambda i=i: later(i) for i in range(2, 6)]
    with pytest.raises(ValueError, match="boom"):
        anyio.run(gather_limited, jobs, 2)
    assert started == [0, 1]
    assert cancelled == [0]


def test_no_jobs_and_a_bad_limit() -> None:
    assert anyio.run(gather_limited, [], 4) == []
    with pytest.raises(ValueError, match="limit must be >= 1"):
        anyio.run(gather_limited, [], 0)


def test_limited_tasks_raises_the_body_s_own_error_unwrapped_and_cancels_the_tasks() -> None:
    cancelled: list[int] = []

    async def waits_forever() -> None:
        try:
            await anyio.Event().wait()
        except anyio.get_cancelled_exc_class():
            cancelled.append(0)
            raise

    async def main() -> None:
        async with limited_tasks(2) as tasks:
            assert await tasks.slot()
            tasks.start(waits_forever)
            await anyio.sleep(0)
            raise OSError("short read")  # a producer's failure, as upload's disk read

    with pytest.raises(OSError, match="short read"):
        anyio.run(main)
    assert cancelled == [0]


def test_limited_tasks_stops_the_producer_at_the_first_task_error() -> None:
    produced: list[int] = []

    async def fails() -> None:
        raise ValueError("chunk refused")

    async def main() -> None:
        async with limited_tasks(1) as tasks:
            for index in range(5):
                if not await tasks.slot():
                    break
                produced.append(index)
                tasks.start(fails)

    with pytest.raises(ValueError, match="chunk refused"):
        anyio.run(main)
    assert produced == [0]
