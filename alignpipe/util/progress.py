"""The one rich progress bar layout: description, bar, done/total, the caller's own columns,
elapsed time and time left. rich is imported on first use, so importing this module is cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


def progress_bar(*columns: str, description: str = "{task.description}",
                 speed_unit: str | None = None, console: Console | None = None,
                 stderr: bool = False) -> Progress:
    """A `rich.progress.Progress` (not started; use it as a context manager).

    `columns` are rich format strings over the task (e.g. ``"loss {task.fields[loss]}"``) shown
    after done/total; `speed_unit` adds rich's measured rate as ``1,234 <unit>/s``. `console`
    is the rich console to draw on (one shared with log lines keeps them above the bar);
    `stderr` makes a new one on stderr instead.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed or 0:,.0f} {speed_unit}/s")

    shown = [TextColumn(column) for column in columns]
    if speed_unit:
        shown.append(Speed())
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), *shown,
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True) if stderr else console)
