"""Progress bars for long data work (scanning 277k files, packing the cache, writing synthetic slides).

Drawn with rich on the process of global rank 0, and only when its stderr is a terminal: DDP ranks, SLURM logs
and CI output stay free of bar redraws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Advance = Callable[[int], None]


def _no_progress(_: int) -> None:
    """Advance nothing: no bar is drawn."""


@contextmanager
def progress_bar(description: str, total: int | None, console: Console | None = None) -> Iterator[Advance]:
    """Yield `advance(n)`; `total=None` counts without a bar (the number of items is not known ahead)."""
    console = console or Console(stderr=True)
    if rank_zero_only.rank != 0 or not console.is_terminal:
        yield _no_progress
        return
    columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if total is not None:
        columns.append(TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
