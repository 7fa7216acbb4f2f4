"""Human output: tables (plain columns when piped), key/value listings, progress bars."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich import box
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .. import ProgressCallback
from ..formatting import human_bytes
from .context import Ctx, json_default


def plural(count: int, noun: str) -> str:
    """``1 file``, ``2 files``, ``0 files``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def rate(size: int, seconds: float) -> str:
    """``, 12.3 MiB/s`` (binary units, as in the progress bars); "" when nothing moved, so
    a report never says ``0 B/s``."""
    if size <= 0 or seconds <= 0:
        return ""
    return f", {human_bytes(size / seconds)}/s"


class _RateColumn(ProgressColumn):
    """The transfer rate in the units of the summaries (rich's own column is decimal, MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if not speed else f"{human_bytes(speed)}/s", style="progress.data.speed")


def new_table(ctx: Ctx, *columns: str) -> Table:
    # Plain aligned columns (no box drawing) when piped, so grep/awk see clean text.
    table = Table(box=box.SIMPLE_HEAD if ctx.tty else None, show_edge=False, pad_edge=False,
                  header_style="bold" if ctx.tty else "")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def escape(text: str) -> str:
    """Text for a rich table cell, shown as is (no markup)."""
    return text.replace("[", r"\[")


def styled(ctx: Ctx, text: str, colour: str) -> str:
    return f"[{colour}]{escape(text)}[/]" if ctx.tty else escape(text)


def when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    stamp = dt.datetime.fromtimestamp(epoch)
    if stamp.date() == dt.date.today():
        return stamp.strftime("%H:%M:%S")
    return stamp.strftime("%Y-%m-%d %H:%M")


def print_mapping(ctx: Ctx, mapping: dict[str, Any], title: str = "") -> None:
    """A result dict as aligned ``key  value`` lines; lists shown as counts (use --json)."""
    table = new_table(ctx, "", "")
    table.show_header = False
    for key, value in mapping.items():
        if isinstance(value, list):
            shown = ", ".join(str(v) for v in value[:5]) + (" ..." if len(value) > 5 else "")
            text = f"{len(value)}" + (f": {shown}" if value else "")
        elif isinstance(value, dict):
            text = json.dumps(value, default=json_default)
        else:
            text = "-" if value is None else str(value)
        table.add_row(key, text)
    if title:
        ctx.out.print(title, markup=False, highlight=False)
    ctx.table(table)


def stream_chunks(chunks: Iterator[bytes]) -> None:
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
        out.flush()


@contextlib.contextmanager
def phase_progress(ctx: Ctx) -> Iterator[Callable[[str, int, int], None] | None]:
    """One bar for multi-step work (submit, collect): ``progress(phase, done, total)``."""
    if ctx.json or not ctx.tty or not ctx.err.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               _RateColumn(), TimeRemainingColumn())
    with Progress(*columns, console=ctx.err, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=None)
            progress.update(tasks[phase], completed=done, total=total or None)

        yield update


@contextlib.contextmanager
def transfer_progress(ctx: Ctx, label: str) -> Iterator[ProgressCallback | None]:
    """A rich bar (bytes, rate, ETA) when on a terminal; nothing when piped or --json."""
    with phase_progress(ctx) as progress:
        if progress is None:
            yield None
        else:
            # Called on the portal's loop thread; rich's Progress is thread-safe.
            yield lambda done, total: progress(label, done, total)
