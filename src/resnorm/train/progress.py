"""The training progress bar."""
from __future__ import annotations

import time


class _Progress:
    """A rich progress bar on stderr (steps, loss, accuracy, samples/s, ETA), or nothing."""

    def __init__(self, show: bool, description: str, total: int, done: int) -> None:
        self.show, self.description, self.total, self.done = show, description, total, done
        self.progress = None
        self.task = None
        self.samples = 0
        self.start = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.show:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  "
                           "{task.fields[rate]} samples/s"),
                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=self.total,
                                               completed=self.done, loss="-", acc="-", rate="-")
        return self

    def advance(self, loss: float, acc: float, samples: int) -> None:
        if self.progress is None:
            return
        self.samples += samples
        rate = self.samples / max(1e-9, time.perf_counter() - self.start)
        self.progress.update(self.task, advance=1, loss=f"{loss:.3f}", acc=f"{acc:.1%}",
                             rate=f"{rate:,.0f}")

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
