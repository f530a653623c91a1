"""The one progress display of the package: a rich live display on stderr, shown only when
asked (or, by default, when stderr is a terminal), so piped output stays clean.

:class:`StderrProgress` owns starting and stopping it; the training bar
(:mod:`resnorm.train.progress`) and the lab's display (:mod:`resnorm.lab.progress`) say
only which columns and tasks they show.
"""

from __future__ import annotations

import contextlib
import sys


def show_progress(progress: bool | None) -> bool:
    """Whether to draw a progress display: ``progress`` when given, else whether stderr is
    a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


class StderrProgress:
    """A context manager around a ``rich.progress.Progress`` on stderr, or around nothing
    when ``show`` is false (then :attr:`progress` stays ``None`` and updates are no-ops).

    Subclasses give the display's columns in :meth:`columns` and add their tasks in
    :meth:`on_start`."""

    transient = False

    def __init__(self, show: bool) -> None:
        self.show = bool(show)
        self.progress = None

    def columns(self) -> tuple:
        raise NotImplementedError

    def on_start(self) -> None:
        """Called once the display is running: add the tasks."""

    def __enter__(self):
        if self.show:
            from rich.console import Console
            from rich.progress import Progress

            self.progress = Progress(
                *self.columns(), console=Console(stderr=True), transient=self.transient
            )
            self.progress.start()
            self.on_start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


@contextlib.contextmanager
def status(show: bool, text: str):
    """A spinner with ``text`` on stderr while the block runs (nothing when not ``show``)."""
    if not show:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield
