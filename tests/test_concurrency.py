"""``gather_limited``: bounded concurrency, results in order, the first error wins."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

from jupyter_tether.controller.concurrency import gather_limited


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
