"""Progress bars (rich) on a terminal; nothing when output is piped or --json is asked."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Bar", "progress_bar"]


class Bar:
    """A byte counter: ``advance(n)`` as data moves, ``set_total(n)`` when it is known."""

    def __init__(self, advance: Callable[[int], None], set_total: Callable[[int], None]) -> None:
        self.advance = advance
        self.set_total = set_total


@contextmanager
def progress_bar(description: str, total: int | None = None, enabled: bool = True) -> Iterator[Bar]:
    if not (enabled and sys.stderr.isatty()):
        yield Bar(lambda n: None, lambda n: None)
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as prog:
        task = prog.add_task(description, total=total)
        yield Bar(
            lambda n: prog.advance(task, n),
            lambda n: prog.update(task, total=n),
        )
