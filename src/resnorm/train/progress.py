"""The training progress bar."""

from __future__ import annotations

import time

from .._progress import StderrProgress


class _Progress(StderrProgress):
    """A rich progress bar on stderr (steps, loss, accuracy, samples/s, ETA), or nothing."""

    transient = True

    def __init__(self, show: bool, description: str, total: int, done: int) -> None:
        super().__init__(show)
        self.description, self.total, self.done = description, total, done
        self.task = None
        self.samples = 0
        self.start = time.perf_counter()

    def columns(self) -> tuple:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        return (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[rate]} samples/s"
            ),
            TimeRemainingColumn(),
        )

    def on_start(self) -> None:
        self.task = self.progress.add_task(
            self.description, total=self.total, completed=self.done, loss="-", acc="-", rate="-"
        )

    def advance(self, loss: float, acc: float, samples: int) -> None:
        if self.progress is None:
            return
        self.samples += samples
        rate = self.samples / max(1e-9, time.perf_counter() - self.start)
        self.progress.update(
            self.task, advance=1, loss=f"{loss:.3f}", acc=f"{acc:.1%}", rate=f"{rate:,.0f}"
        )
