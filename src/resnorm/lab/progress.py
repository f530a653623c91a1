"""What the lab shows while it runs: runs done, a line per running run, a measured ETA."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .._progress import StderrProgress


class _LabProgress(StderrProgress):
    """What the lab is doing, on stderr when it is a terminal: runs done of all, a line per
    running run (its run_id and ``epoch e/E``) and an estimate of the time left.

    The estimate comes from costs measured in this invocation, never from the runs it
    reused: the worker-seconds per epoch trained here (from each run's start to its
    latest epoch; an init-only study counts runs instead of epochs), times the epochs
    left (a run resumed from a checkpoint counts from its latest reported epoch), over
    the workers that still have runs. Nothing is shown until an epoch was measured, and
    nothing in distributed runs, which do not report epochs. It counts down between
    reports; it is off as far as the runs left differ in cost from those measured."""

    def __init__(
        self,
        show: bool,
        total: int,
        done: int,
        epochs: int,
        workers: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(show)
        self.total, self.done = total, done
        self.epochs, self.workers, self.clock = epochs, workers, clock
        self.running: dict[str, dict] = {}  # run_id -> started, epoch, units, mark, task
        self.ended_seconds = 0.0  # worker-seconds of the ended runs' units
        self.ended_units = 0
        self.estimate: tuple[float, float] | None = None  # (seconds left, clock then)
        self.lock = threading.Lock()  # the display renders from its own thread
        self.task = None

    def columns(self) -> tuple:
        from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeElapsedColumn
        from rich.table import Column
        from rich.text import Text

        lab = self

        class EtaColumn(ProgressColumn):
            def render(self, task) -> Text:
                left = lab.seconds_left() if task.id == lab.task else None
                return Text("" if left is None else f"ETA {_hms(left)}", style="progress.remaining")

        # Fixed widths, the run_id cut with an ellipsis: on an 80-column terminal the
        # bar, the counts and the ETA stay readable.
        return (
            TextColumn(
                "{task.description}",
                table_column=Column(min_width=12, max_width=24, no_wrap=True, overflow="ellipsis"),
            ),
            BarColumn(bar_width=10),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            EtaColumn(),
        )

    def on_start(self) -> None:
        self.task = self.progress.add_task(
            "lab", total=self.total, completed=self.done, status=self._lab_status()
        )

    def started(self, run_id: str) -> None:
        now = self.clock()
        with self.lock:
            self.running[run_id] = {
                "started": now,
                "epoch": 0,
                "units": 0,
                "mark": now,
                "task": None,
            }
            self._estimate(now)
        if self.progress is not None:
            self.running[run_id]["task"] = self.progress.add_task(
                f"  {run_id}",
                total=self.epochs or None,
                status="starting" if self.epochs else "running",
            )
            self.progress.update(self.task, status=self._lab_status())

    def epoch(self, run_id: str, epoch: int) -> None:
        """``run_id`` has trained its epoch ``epoch`` (counted from 1)."""
        now = self.clock()
        with self.lock:
            run = self.running.get(run_id)
            if run is None:
                return
            run.update(epoch=epoch, units=run["units"] + 1, mark=now)
            self._estimate(now)
        if self.progress is not None:
            self.progress.update(
                run["task"], completed=epoch, status=f"epoch {epoch}/{self.epochs}"
            )

    def finished(self, run_id: str) -> None:
        now = self.clock()
        with self.lock:
            run = self.running.pop(run_id, None)
            if run is not None:
                if not self.epochs:  # init-only: a run is the unit of work
                    run.update(units=1, mark=now)
                if run["units"]:
                    self.ended_seconds += run["mark"] - run["started"]
                    self.ended_units += run["units"]
            self.done += 1
            self._estimate(now)
        if self.progress is not None:
            if run is not None and run["task"] is not None:
                self.progress.remove_task(run["task"])
            self.progress.update(self.task, advance=1, status=self._lab_status())

    def seconds_left(self) -> float | None:
        """The estimated seconds until the last run ends, or ``None`` before anything was
        measured."""
        with self.lock:
            if self.estimate is None:
                return None
            left, then = self.estimate
        return max(0.0, left - (self.clock() - then))

    def _estimate(self, now: float) -> None:
        seconds = self.ended_seconds + sum(r["mark"] - r["started"] for r in self.running.values())
        units = self.ended_units + sum(r["units"] for r in self.running.values())
        runs_left = self.total - self.done
        if not units or not runs_left:
            self.estimate = (0.0, now) if not runs_left else None
            return
        per_run = self.epochs or 1
        units_left = (runs_left - len(self.running)) * per_run + sum(
            max(0, per_run - r["epoch"]) for r in self.running.values()
        )
        self.estimate = (units_left * seconds / units / min(self.workers, runs_left), now)

    def _lab_status(self) -> str:
        return f"{self.done}/{self.total} done, {len(self.running)} running"


def _hms(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
