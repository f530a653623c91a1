"""``fit``: the training loop, with progress, metrics files, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._io import json_safe
from .._progress import show_progress
from ..data import DataSplit
from ..errors import UsageError, UsageTypeError
from ..norms import convert_sync_batchnorm, has_batch_norm, revert_sync_batchnorm
from .batches import _batches, _rank_seed, _shard
from .checkpoint import CheckpointError, _first_line
from .config import TrainConfig
from .distributed import rank_device, world
from .evaluate import _evaluate_shared, _full_precision, evaluate
from .files import RunFiles
from .optim import augment_images, make_optimizer, make_scheduler
from .progress import _Progress
from .resume import _check_resumable, _restore_rng, _shared_checkpoint
from .run import run_identity, run_record
from .threads import intra_op_threads


@dataclass
class FitResult:
    """What :func:`fit` measured: one row per epoch (``epoch``, ``train_loss``,
    ``train_acc``, ``test_loss``, ``test_acc`` (accuracies as fractions), ``lr`` at the
    epoch's end and ``seconds``), whether and at which step the run diverged and where
    it was seen (``diverged_in``: ``"train"``, a training loss not finite, the step not
    taken; ``"eval"``, a test loss not finite at the end of an epoch), the run
    directory when there is one, and ``stacked_with``: how many runs it took its steps
    with in one stacked computation (:func:`~resnorm.train.fit_stacked`; 1: alone)."""

    history: list[dict] = field(default_factory=list)
    diverged_at_step: int | None = None
    diverged_in: str | None = None
    seconds: float = 0.0
    out: Path | None = None
    resumed_from_step: int | None = None
    stacked_with: int = 1

    @property
    def diverged(self) -> bool:
        return self.diverged_at_step is not None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict:
        return {
            "status": "diverged" if self.diverged else "finished",
            "epochs_completed": len(self.history),
            "final": self.final,
            "diverged_at_step": self.diverged_at_step,
            "diverged_in": self.diverged_in,
            "seconds": self.seconds,
            "resumed_from_step": self.resumed_from_step,
            "stacked_with": self.stacked_with,
            "history": self.history,
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={name!r} but CUDA is not available here; use device='cpu'")
    return device


def fit(
    model: nn.Module,
    data: DataSplit,
    config: TrainConfig = TrainConfig(),
    *,
    out=None,
    resume: bool = True,
    monitor=None,
    progress: bool | None = None,
    description: str = "train",
    meta: dict | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``data`` with cross-entropy and evaluate on the test split after
    every epoch.

    With ``out`` (a directory) the run writes ``config.json``, per-epoch ``metrics.jsonl``
    and ``metrics.csv``, a checkpoint every epoch (and every ``config.checkpoint_every``
    steps) and ``result.json``; with ``resume=True`` (default) a run whose directory holds
    a checkpoint continues from it and, on the CPU, ends with exactly the weights and
    metrics of an uninterrupted run. A finished run is not trained again. A loss that
    becomes NaN or infinite stops the run cleanly (``FitResult.diverged_at_step``).

    Distributed: called in every process of an initialized torch.distributed group of
    more than one process (see :mod:`resnorm.train.distributed`), ``fit`` trains with
    ``DistributedDataParallel``. Each global batch of N x ``config.batch_size`` samples
    is the one a single process with that batch size would take, each process its
    contiguous slice; the loss is weighted so that the gradient is the mean over the
    global batch even when a trailing batch splits unevenly. With ``config.sync_bn``
    every batch norm is synchronized for the run (and reverted when it ends). Rank 0
    writes the files (the same checkpoint format as one process) and shows progress;
    every process loads the checkpoint rank 0 reads; the test set is evaluated in slices.
    A checkpoint resumes exactly with the same number of processes; with another number
    when the global batch (N x ``batch_size``) and the steps per epoch are the same (the
    batches and the schedule then are; dropout masks and summation order are not).

    ``monitor``: a :class:`~resnorm.diagnostics.Monitor` (or anything with ``step(loss)``),
    called after every optimizer step (with this process's loss). ``meta``: what
    identifies the run beyond the model's structure, the data and the configuration
    (model and data set names and options); :func:`~resnorm.train.train_named` fills it.
    ``progress=None`` shows a progress bar only on a terminal. ``on_epoch`` is called in
    every process.
    """
    _check_fit_arguments(model, data, config)
    device = resolve_device(config.device)
    with intra_op_threads(config.threads):
        net = _sync_batch_norm(model) if config.sync_bn else model
        try:
            trainer = _Trainer(net, data, config, device, out, monitor, meta or {})
            trainer.start_or_resume(resume)
            return trainer.train(progress, description, on_epoch)
        finally:
            if config.sync_bn:
                revert_sync_batchnorm(net)


def _check_fit_arguments(model, data, config) -> None:
    """Refuse what :func:`fit` cannot train, naming what was passed."""
    if isinstance(model, DistributedDataParallel):
        raise UsageTypeError(
            "pass the model itself, not DistributedDataParallel(model): fit "
            "wraps it when it runs in a process group"
        )
    if not isinstance(model, nn.Module):
        raise UsageTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(data, DataSplit):
        raise UsageTypeError(f"data must be a DataSplit, got {type(data).__name__}")
    if not isinstance(config, TrainConfig):
        raise UsageTypeError(f"config must be a TrainConfig, got {type(config).__name__}")


def _sync_batch_norm(model: nn.Module) -> nn.Module:
    """``model`` with its batch norms synchronized (``config.sync_bn``), warning the caller
    of :func:`fit` when it has none."""
    net = convert_sync_batchnorm(model)
    if not has_batch_norm(net):
        warnings.warn(  # stacklevel 3: the line that called fit
            "sync_bn=True changes nothing: the model has no batch norm layer", stacklevel=3
        )
    return net


class _Trainer:
    """One call of :func:`fit`, in the parts a reader follows in order: set up
    (:meth:`__init__`), :meth:`start_or_resume`, then per epoch :meth:`train_step` for each
    batch and :meth:`end_epoch`, with :meth:`save` writing checkpoints, and :meth:`finish`."""

    def __init__(self, model, data, config, device, out, monitor, meta) -> None:
        self.start_time = time.perf_counter()
        self.rank, self.world_size = world()
        self.device = rank_device(device)
        self.model, self.config, self.monitor = model.to(self.device), config, monitor
        self.x_train, self.y_train = data.x_train.to(self.device), data.y_train.to(self.device)
        self.x_test, self.y_test = data.x_test.to(self.device), data.y_test.to(self.device)
        self.n = len(self.x_train)
        self.steps_per_epoch = len(
            _batches(self.n, config.batch_size, config.seed, 0, self.world_size)
        )
        if self.world_size > 1 and self.steps_per_epoch == 0:
            raise UsageError(
                f"{self.n} training samples cannot give each of {self.world_size} "
                f"processes 2 samples of a batch; use fewer processes"
            )
        self.optimizer = make_optimizer(model, config)
        self.scheduler = make_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.use_amp = config.amp and self.device.type in ("cpu", "cuda")
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = (
            torch.amp.GradScaler("cuda") if self.use_amp and self.device.type == "cuda" else None
        )
        self.run = RunFiles(out) if out is not None else None
        self.writes = self.run is not None and self.rank == 0
        self.result = FitResult(out=self.run.root if self.run else None)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.sums = {"loss": 0.0, "correct": 0, "seen": 0}
        self.identity = run_identity(config, meta, model, data, self.world_size)
        self.meta = meta
        self.data_summary = data.summary()
        # The random-number state a checkpoint records when it is not this process's
        # (runs trained stacked, which draw no random numbers: see fit_stacked).
        self.rng_state: torch.Tensor | None = None

    # ------------------------------------------------------------------ start or resume
    def start_or_resume(self, resume: bool) -> None:
        run = self.run
        state = _shared_checkpoint(run, self.rank, self.world_size) if run and resume else None
        if state is not None:
            self._resume(state)
        else:
            if self.writes:
                run.checkpoints.recover()  # the stale temporaries of a killed writer
                run.checkpoints.clear()
                run.root.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(_rank_seed(self.config.seed, self.rank))
        if self.writes:
            record = run_record(
                self.identity,
                self.meta,
                self.config,
                self.data_summary,
                self.device,
                self.world_size,
                previous=run.read_json("config.json") if state else None,
            )
            if self.world_size > 1:
                record["distributed"] = {
                    "world_size": self.world_size,
                    "backend": dist.get_backend(),
                    "global_batch_size": self.world_size * self.config.batch_size,
                }
            run.write_json("config.json", record)
            if state is not None:  # a kill after a checkpoint but before its metrics
                run.write_metrics(self.result.history)

    def _resume(self, state: dict) -> None:
        _check_resumable(state, self.identity, self.world_size, self.steps_per_epoch, self.run.root)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{self.run.root / 'checkpoint.pt'} holds the weights of another model "
                f"({_first_line(exc)}); start over with --restart (resume=False) or use "
                f"another output folder"
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _restore_rng(state, self.config.seed, self.rank, self.world_size, self.device)
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.sums = state["global_step"], dict(state["sums"])
        self.result.history = list(state["history"])
        self.result.diverged_at_step = state.get("diverged_at_step")
        self.result.diverged_in = state.get("diverged_in")
        self.result.resumed_from_step = self.global_step

    # ------------------------------------------------------------------ checkpoints
    def save(self, epoch_done: int, next_step: int) -> None:
        if self.run is None:
            return
        device = self.device
        own = self.rng_state is not None
        rng = {"torch": self.rng_state if own else torch.get_rng_state(), "cuda": None}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if self.world_size > 1:  # every process's generator state, for an exact resume
            mine = {
                "torch": rng["torch"],
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }
            rng["ranks"] = [None] * self.world_size
            dist.all_gather_object(rng["ranks"], mine)
        if not self.writes:
            return
        self.run.checkpoints.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng,
                "epoch": epoch_done,
                "step_in_epoch": next_step,
                "global_step": self.global_step,
                "sums": dict(self.sums),
                "history": self.result.history,
                "config": self.config.to_dict(),
                "identity": self.identity,
                "diverged_at_step": self.result.diverged_at_step,
                "diverged_in": self.result.diverged_in,
                "world_size": self.world_size,
                "steps_per_epoch": self.steps_per_epoch,
            }
        )

    # ------------------------------------------------------------------ one step
    def train_step(
        self, train_model, batch: torch.Tensor, total: int
    ) -> tuple[float, int, int] | None:
        """Forward, backward and optimizer step on one global batch (this process's slice);
        ``(summed loss, correct, samples)`` of the whole batch, or ``None`` when the loss
        is not finite (the step is not taken)."""
        config, device, world_size = self.config, self.device, self.world_size
        index, offset = _shard(batch, world_size, self.rank)
        index = index.to(device)
        xb, yb = self.x_train[index], self.y_train[index]
        if config.augment:
            generator = torch.Generator().manual_seed(config.seed * 7919 + self.global_step)
            xb = augment_images(xb, config.crop_padding, generator, offset=offset, total=total)
        with (
            torch.autocast(device.type, dtype=self.amp_dtype)
            if self.use_amp
            else contextlib.nullcontext()
        ):
            logits = train_model(xb)
        loss = F.cross_entropy(_full_precision(logits), yb, label_smoothing=config.label_smoothing)
        if world_size > 1:
            step_loss, step_correct, step_seen, finite = self._shared_totals(loss, logits, yb)
            if len(index) * world_size != total:
                # DDP averages the processes' gradients: weight each slice's mean so that
                # the result is the mean over the whole batch.
                loss = loss * (len(index) * world_size / total)
        else:
            finite = bool(torch.isfinite(loss))
        if not finite:
            return None
        self._optimizer_step(loss)
        if world_size == 1:
            step_seen = len(index)
            step_loss = loss.item() * step_seen
            step_correct = (logits.argmax(1) == yb).sum().item()
        if self.monitor is not None:
            self.monitor.step(loss)
        return step_loss, int(step_correct), int(step_seen)

    def record_step(self, taken: tuple[float, int, int] | None, k: int) -> bool:
        """Add step ``k``'s totals (from :meth:`train_step`) to the epoch's sums, or, when
        its loss was not finite (``None``: the step not taken), record the divergence
        there; whether the step was taken."""
        if taken is None:
            self.result.diverged_at_step = self.global_step + 1
            self.result.diverged_in = "train"
            self.step_in_epoch = k
            return False
        step_loss, step_correct, step_seen = taken
        self.sums["loss"] += step_loss
        self.sums["correct"] += step_correct
        self.sums["seen"] += step_seen
        return True

    def _shared_totals(
        self, loss: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor
    ) -> tuple[float, float, float, bool]:
        """One small all-reduce: the step's totals for the metrics (summed loss, correct,
        samples) over the processes, and a verdict on divergence that every process shares
        (none may stop alone)."""
        totals = torch.stack(
            [
                loss.detach().double() * len(yb),
                (logits.argmax(1) == yb).sum().double(),
                torch.tensor(float(len(yb)), device=self.device, dtype=torch.float64),
                (~torch.isfinite(loss.detach())).double(),
            ]
        )
        dist.all_reduce(totals)
        step_loss, step_correct, step_seen, nonfinite = totals.tolist()
        return step_loss, step_correct, step_seen, nonfinite == 0

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward (scaled under float16 autocast), then :meth:`apply_gradients`."""
        optimizer, scaler = self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        self.apply_gradients()

    def apply_gradients(self) -> None:
        """Gradient clipping, the optimizer's and the scheduler's step, on the gradients
        the parameters hold (runs trained stacked step their optimizers as one)."""
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.advance()

    def advance(self) -> None:
        """After the optimizer's step: the schedule's step and the step count."""
        self.scheduler.step()
        self.global_step += 1

    # ------------------------------------------------------------------ end of epoch
    def end_epoch(self, epoch_start: float, on_epoch, evaluated=None) -> None:
        """Evaluate (or take ``evaluated``, the ``(test loss, test accuracy)`` measured by
        the caller), record the epoch's row, checkpoint, rewrite the metrics files. A test
        loss that is not finite (weights or running statistics gone to NaN/Inf) ends the
        run as diverged, with the row recorded (its non-finite values written as null)."""
        config = self.config
        if evaluated is not None:
            test_loss, test_acc = evaluated
        elif self.world_size > 1:
            test_loss, test_acc = _evaluate_shared(
                self.model,
                self.x_test,
                self.y_test,
                config.eval_batch_size,
                self.rank,
                self.world_size,
            )
        else:
            test_loss, test_acc = evaluate(
                self.model, self.x_test, self.y_test, config.eval_batch_size
            )
        seen = max(1, self.sums["seen"])
        row = {
            "epoch": self.epoch + 1,
            "train_loss": self.sums["loss"] / seen,
            "train_acc": self.sums["correct"] / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - epoch_start,
        }
        self.result.history.append(row)
        if not math.isfinite(test_loss):
            self.result.diverged_at_step, self.result.diverged_in = self.global_step, "eval"
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.sums = {"loss": 0.0, "correct": 0, "seen": 0}
        self.save(self.epoch, 0)
        if self.writes:
            self.run.write_metrics(self.result.history)
        if on_epoch is not None:
            on_epoch(row)

    # ------------------------------------------------------------------ the loop
    def train(self, progress: bool | None, description: str, on_epoch) -> FitResult:
        self.run_epochs(progress, description, on_epoch)
        return self.finish()

    def run_epochs(self, progress: bool | None, description: str, on_epoch) -> None:
        """Train until the last epoch ends or the run diverges."""
        config, result = self.config, self.result
        train_model = self.model
        if self.world_size > 1:
            train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if config.compile:
            train_model = torch.compile(train_model)
        show = show_progress(progress) and self.rank == 0
        self.model.train()
        with _Progress(
            show, description, config.epochs * self.steps_per_epoch, self.global_step
        ) as bar:
            while self.epoch < config.epochs and not result.diverged:
                epoch_start = time.perf_counter()
                batches = _batches(
                    self.n, config.batch_size, config.seed, self.epoch, self.world_size
                )
                for k in range(self.step_in_epoch, len(batches)):
                    taken = self.train_step(train_model, batches[k], len(batches[k]))
                    if not self.record_step(taken, k):
                        break
                    step_loss, step_correct, step_seen = taken
                    bar.advance(
                        step_loss / step_seen, self.sums["correct"] / self.sums["seen"], step_seen
                    )
                    if (
                        config.checkpoint_every
                        and self.global_step % config.checkpoint_every == 0
                        and k + 1 < len(batches)
                    ):
                        self.save(self.epoch, k + 1)
                if result.diverged:
                    break
                self.end_epoch(epoch_start, on_epoch)

    def finish(self) -> FitResult:
        result = self.result
        result.seconds = time.perf_counter() - self.start_time
        if self.run is not None:
            if result.diverged and result.diverged_in == "train":
                # records the divergence; the weights are the last finite ones
                self.save(self.epoch, self.step_in_epoch)
            if self.writes:
                self.run.write_json("result.json", json_safe(result.to_dict()))
                self.run.checkpoints.drop_previous()
        return result
