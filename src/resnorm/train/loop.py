"""``fit``: the training loop, with progress, metrics files, checkpoints and exact resume."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_open, json_safe
from ..data import DataSplit
from .checkpoint import CheckpointDir
from .config import TrainConfig
from .optim import augment_images, make_optimizer, make_scheduler

METRIC_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")


@dataclass
class FitResult:
    """What :func:`fit` measured: one row per epoch (``epoch``, ``train_loss``,
    ``train_acc``, ``test_loss``, ``test_acc`` (accuracies as fractions), ``lr`` at the
    epoch's end and ``seconds``), whether and at which step the loss stopped being
    finite, and the run directory when there is one."""

    history: list[dict] = field(default_factory=list)
    diverged_at_step: int | None = None
    seconds: float = 0.0
    out: Path | None = None
    resumed_from_step: int | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_at_step is not None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict:
        return {"status": "diverged" if self.diverged else "finished",
                "epochs_completed": len(self.history), "final": self.final,
                "diverged_at_step": self.diverged_at_step, "seconds": self.seconds,
                "resumed_from_step": self.resumed_from_step, "history": self.history}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device='cpu'")
    return device


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size]).float()
        target = y[start:start + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return total_loss / len(x), correct / len(x)


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's shuffled batches, a function of (seed, epoch) only, so a resumed run
    sees the same order. A trailing batch of one sample is dropped (batch norm needs 2)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [order[s:s + batch_size] for s in range(0, n, batch_size)
            if min(batch_size, n - s) >= 2 or n == 1]


class RunFiles:
    """The files of a run directory: ``config.json``, ``metrics.jsonl``, ``metrics.csv``,
    ``checkpoint.pt`` (+ ``checkpoint.prev.pt``), ``result.json``, ``monitor.jsonl``."""

    def __init__(self, root) -> None:
        self.root = Path(root)
        self.checkpoints = CheckpointDir(self.root)

    def write_json(self, name: str, payload: dict) -> None:
        with atomic_open(self.root / name, "w") as f:
            json.dump(payload, f, indent=2, allow_nan=False, default=str)
            f.write("\n")

    def write_metrics(self, history: list[dict]) -> None:
        """Rewrite both metrics files from the history (so a resumed run never repeats or
        loses a row)."""
        with atomic_open(self.root / "metrics.jsonl", "w") as f:
            for row in history:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_KEYS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        with atomic_open(self.root / "metrics.csv", "w") as f:
            f.write(buffer.getvalue())


def fit(model: nn.Module, data: DataSplit, config: TrainConfig = TrainConfig(), *,
        out=None, resume: bool = True, monitor=None, progress: bool | None = None,
        description: str = "train", meta: dict | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train ``model`` on ``data`` with cross-entropy and evaluate on the test split after
    every epoch.

    With ``out`` (a directory) the run writes ``config.json``, per-epoch ``metrics.jsonl``
    and ``metrics.csv``, a checkpoint every epoch (and every ``config.checkpoint_every``
    steps) and ``result.json``; with ``resume=True`` (default) a run whose directory holds
    a checkpoint continues from it and, on the CPU, ends with exactly the weights and
    metrics of an uninterrupted run. A finished run is not trained again. A loss that
    becomes NaN or infinite stops the run cleanly (``FitResult.diverged_at_step``).

    ``monitor``: a :class:`~resnorm.diagnostics.Monitor` (or anything with ``step(loss)``),
    called after every optimizer step. ``meta``: extra facts for ``config.json`` (model
    and data set names). ``progress=None`` shows a progress bar only on a terminal.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(data, DataSplit):
        raise TypeError(f"data must be a DataSplit, got {type(data).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    device = resolve_device(config.device)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _fit(model, data, config, device, out, resume, monitor, progress, description,
                    meta or {}, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _fit(model, data, config, device, out, resume, monitor, progress, description, meta,
         on_epoch) -> FitResult:
    start_time = time.perf_counter()
    model.to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    n = len(x_train)
    steps_per_epoch = len(_batches(n, config.batch_size, config.seed, 0))
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    use_amp = config.amp and device.type in ("cpu", "cuda")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if use_amp and device.type == "cuda" else None

    run = RunFiles(out) if out is not None else None
    result = FitResult(out=run.root if run else None)
    epoch, step_in_epoch, global_step = 0, 0, 0
    sums = {"loss": 0.0, "correct": 0, "seen": 0}
    state = run.checkpoints.load() if run and resume else None
    if state is not None:
        if state["config"] != config.to_dict():
            raise ValueError(f"{run.root} holds a run with a different configuration; use "
                             f"another output directory, or restart it (resume=False / --restart)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        global_step, sums = state["global_step"], dict(state["sums"])
        result.history = list(state["history"])
        result.diverged_at_step = state.get("diverged_at_step")
        result.resumed_from_step = global_step
    else:
        if run is not None:
            run.checkpoints.clear()
            run.root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
    if run is not None:
        run.write_json("config.json", {"config": config.to_dict(), **meta,
                                       "data": data.summary(), "device": str(device)})

    def save(epoch_done: int, next_step: int) -> None:
        if run is None:
            return
        run.checkpoints.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None},
            "epoch": epoch_done, "step_in_epoch": next_step, "global_step": global_step,
            "sums": dict(sums), "history": result.history, "config": config.to_dict(),
            "diverged_at_step": result.diverged_at_step})

    train_model = torch.compile(model) if config.compile else model
    total_steps = config.epochs * steps_per_epoch
    show = sys.stderr.isatty() if progress is None else progress
    model.train()
    with _Progress(show, description, total_steps, global_step) as bar:
        while epoch < config.epochs and not result.diverged:
            epoch_start = time.perf_counter()
            batches = _batches(n, config.batch_size, config.seed, epoch)
            for k in range(step_in_epoch, len(batches)):
                index = batches[k].to(device)
                xb, yb = x_train[index], y_train[index]
                if config.augment:
                    generator = torch.Generator().manual_seed(config.seed * 7919 + global_step)
                    xb = augment_images(xb, config.crop_padding, generator)
                with (torch.autocast(device.type, dtype=amp_dtype) if use_amp
                      else contextlib.nullcontext()):
                    logits = train_model(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=config.label_smoothing)
                if not torch.isfinite(loss):
                    result.diverged_at_step = global_step + 1
                    break
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                global_step += 1
                loss_value = loss.item()
                sums["loss"] += loss_value * len(index)
                sums["correct"] += (logits.argmax(1) == yb).sum().item()
                sums["seen"] += len(index)
                if monitor is not None:
                    monitor.step(loss)
                bar.advance(loss_value, sums["correct"] / sums["seen"], len(index))
                if (config.checkpoint_every and global_step % config.checkpoint_every == 0
                        and k + 1 < len(batches)):
                    save(epoch, k + 1)
            if result.diverged:
                break
            test_loss, test_acc = evaluate(model, x_test, y_test, config.eval_batch_size)
            seen = max(1, sums["seen"])
            row = {"epoch": epoch + 1, "train_loss": sums["loss"] / seen,
                   "train_acc": sums["correct"] / seen, "test_loss": test_loss,
                   "test_acc": test_acc, "lr": optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - epoch_start}
            result.history.append(row)
            epoch, step_in_epoch = epoch + 1, 0
            sums = {"loss": 0.0, "correct": 0, "seen": 0}
            save(epoch, 0)
            if run is not None:
                run.write_metrics(result.history)
            if on_epoch is not None:
                on_epoch(row)
    result.seconds = time.perf_counter() - start_time
    if run is not None:
        if result.diverged:
            save(epoch, step_in_epoch)  # records the divergence; weights are the last finite
        run.write_json("result.json", json_safe(result.to_dict()))
    return result


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
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

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
