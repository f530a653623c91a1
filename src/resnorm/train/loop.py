"""A small, deterministic training loop for classifiers on in-memory data sets."""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_float, check_int
from ..data import DataSplit


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`fit`: AdamW with a one-cycle learning-rate schedule."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_float("lr", self.lr, low=0.0, low_inclusive=False)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_int("seed", self.seed, minimum=0)


@dataclass
class FitResult:
    """What :func:`fit` measured: one row per epoch (``epoch``, ``train_loss``,
    ``train_acc``, ``test_loss``, ``test_acc``; accuracies as fractions), and whether and
    at which step the loss stopped being finite."""

    history: list[dict] = field(default_factory=list)
    diverged_at_step: int | None = None
    seconds: float = 0.0

    @property
    def diverged(self) -> bool:
        return self.diverged_at_step is not None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict:
        return {**asdict(self), "diverged": self.diverged}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return total_loss / len(x), correct / len(x)


def fit(model: nn.Module, data: DataSplit, config: TrainConfig = TrainConfig(), *,
        progress: bool | None = None, description: str = "train",
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train ``model`` on ``data`` with cross-entropy; evaluate on the test split each epoch.

    Deterministic for a given ``config.seed`` on the CPU. A loss that becomes NaN or
    infinite stops the run cleanly (``FitResult.diverged_at_step``) instead of raising.
    ``progress=None`` shows a progress bar only when stderr is a terminal.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                   total_steps=config.epochs * steps_per_epoch)
    result = FitResult()
    show = sys.stderr.isatty() if progress is None else progress
    start_time = time.perf_counter()
    with _progress_bar(show, description, config.epochs * steps_per_epoch) as advance:
        step = 0
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(n, generator=generator)
            loss_sum, correct = 0.0, 0
            for start in range(0, n, config.batch_size):
                index = order[start:start + config.batch_size]
                if len(index) < 2 and len(order) > 1:
                    continue  # a batch of one breaks batch norm; drop the ragged end
                logits = model(data.x_train[index])
                loss = F.cross_entropy(logits, data.y_train[index])
                step += 1
                if not torch.isfinite(loss):
                    result.diverged_at_step = step
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(index)
                correct += (logits.argmax(1) == data.y_train[index]).sum().item()
                advance(loss.item())
            if result.diverged:
                break
            test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
            row = {"epoch": epoch, "train_loss": loss_sum / n, "train_acc": correct / n,
                   "test_loss": test_loss, "test_acc": test_acc}
            result.history.append(row)
            if on_epoch is not None:
                on_epoch(row)
    result.seconds = time.perf_counter() - start_time
    return result


class _progress_bar:
    """A rich progress bar on stderr (or nothing), used as ``with ... as advance``."""

    def __init__(self, show: bool, description: str, total: int) -> None:
        self.show, self.description, self.total = show, description, total
        self.progress = None

    def __enter__(self) -> Callable[[float], None]:
        if not self.show:
            return lambda loss: None
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                                 TimeRemainingColumn(), console=Console(stderr=True),
                                 transient=True)
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total, loss="-")
        return lambda loss: self.progress.update(task, advance=1, loss=f"{loss:.3f}")

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
