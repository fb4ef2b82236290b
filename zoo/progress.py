"""Every progress bar zoo shows.

Two kinds: `image_progress` for work counted in images (decoding a dataset, drawing synthetic
faces, scoring a benchmark), on stderr so stdout stays clean for tables, with the images per
second a user compares between machines; and `training_progress` for a training loop's steps
with its live numbers and ETA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


class _RateColumn(ProgressColumn):
    """Images per second, which is the number a user compares between machines."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} img/s" if speed else "- img/s", style="progress.data.speed")


@contextmanager
def image_progress(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A bar over `total` images; yields ``advance(n)``."""
    columns = (
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done: bar.advance(task, done)


def training_progress(enabled: bool) -> Progress:
    """The bar of every training loop: steps, the loop's live numbers (`stats`), time and ETA."""
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}", markup=False),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )
