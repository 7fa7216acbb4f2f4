"""Progress reports: the ``progress(done, total)`` callback and a running byte count for it."""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[int, int], None]


class Progress:
    """Running byte count handed to a ``progress(done, total)`` callback."""

    def __init__(self, callback: ProgressCallback | None, total: int, done: int = 0) -> None:
        self.callback = callback
        self.total = total
        self.done = done

    def set(self, done: int) -> None:
        self.done = done
        self._emit()

    def per_file(self) -> ProgressCallback:
        """A callback for one file's own progress that adds its increments to this total."""
        seen = 0

        def on_file(done: int, total: int) -> None:
            nonlocal seen
            self.add(done - seen)
            seen = done

        return on_file

    def add(self, count: int) -> None:
        self.done += count
        self._emit()

    def _emit(self) -> None:
        if self.callback is not None:
            self.callback(self.done, self.total)
