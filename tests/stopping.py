"""A monitor for the tests of interrupted training: fit and fit_stacked call a monitor
after every step, so raising from it stops the run mid-epoch, as a kill or Ctrl-C would."""


class StopAt:
    """Raises ``exception`` at the monitor's ``steps``-th step."""

    def __init__(self, steps: int, exception: type[BaseException] = KeyboardInterrupt):
        self.steps, self.seen, self.exception = steps, 0, exception

    def step(self, loss) -> None:
        self.seen += 1
        if self.seen == self.steps:
            raise self.exception
