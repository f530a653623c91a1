"""``fit``: the training loop, with progress, metrics files, checkpoints and exact resume."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import sys
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

from ..errors import UsageError, UsageTypeError
from .._io import atomic_open, json_safe
from ..data import DataSplit
from ..norms import convert_sync_batchnorm, has_batch_norm, revert_sync_batchnorm
from .checkpoint import CheckpointDir
from .config import TrainConfig
from .distributed import rank_device, world
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
        raise UsageError(f"device={name!r} but CUDA is not available here; use device='cpu'")
    return device


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) upcast to float32; float64 ones kept."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


@torch.no_grad()
def _eval_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               batch_size: int) -> tuple[float, int]:
    """Summed cross-entropy and number of correct predictions, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = _full_precision(model(x[start:start + batch_size]))
        target = y[start:start + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return total_loss, correct


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode."""
    total_loss, correct = _eval_sums(model, x, y, batch_size)
    return total_loss / len(x), correct / len(x)


def _evaluate_shared(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                     rank: int, world_size: int) -> tuple[float, float]:
    """:func:`evaluate` of rank 0's model, each process taking a slice of ``(x, y)``.
    The buffers (running statistics) are rank 0's first, as DistributedDataParallel makes
    them before every training step: without synchronized batch norm each process's own
    last update would differ."""
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    lo, hi = len(x) * rank // world_size, len(x) * (rank + 1) // world_size
    total_loss, correct = _eval_sums(model, x[lo:hi], y[lo:hi], batch_size)
    totals = torch.tensor([total_loss, correct], dtype=torch.float64, device=x.device)
    dist.all_reduce(totals)
    total_loss, correct = totals.tolist()
    return total_loss / len(x), correct / len(x)


def _batches(n: int, batch_size: int, seed: int, epoch: int,
             world_size: int = 1) -> list[torch.Tensor]:
    """The epoch's shuffled global batches of ``world_size * batch_size`` samples, a function
    of (seed, epoch) only, so a resumed run sees the same order, and a run of N processes
    with batch B sees the batches of one process with batch N x B. A trailing smaller
    batch is kept only if it gives every process at least 2 samples (batch norm needs 2):
    in one process, a trailing batch of one sample is dropped."""
    size = batch_size * world_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [order[s:s + size] for s in range(0, n, size)
            if n - s >= size or n - s >= 2 * world_size or n == 1]


def _shard(batch: torch.Tensor, world_size: int, rank: int) -> tuple[torch.Tensor, int]:
    """This process's contiguous slice of a global batch and where it starts: equal
    slices for a full batch, sizes differing by at most one for a trailing one."""
    pieces = batch.tensor_split(world_size)
    return pieces[rank], sum(len(p) for p in pieces[:rank])


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
    called after every optimizer step (with this process's loss). ``meta``: extra facts
    for ``config.json`` (model and data set names). ``progress=None`` shows a progress
    bar only on a terminal. ``on_epoch`` is called in every process.
    """
    if isinstance(model, DistributedDataParallel):
        raise UsageTypeError("pass the model itself, not DistributedDataParallel(model): fit "
                        "wraps it when it runs in a process group")
    if not isinstance(model, nn.Module):
        raise UsageTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(data, DataSplit):
        raise UsageTypeError(f"data must be a DataSplit, got {type(data).__name__}")
    if not isinstance(config, TrainConfig):
        raise UsageTypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    device = resolve_device(config.device)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    net = model
    if config.sync_bn:
        net = convert_sync_batchnorm(model)
        if not has_batch_norm(net):
            warnings.warn("sync_bn=True changes nothing: the model has no batch norm layer",
                          stacklevel=2)
    try:
        return _fit(net, data, config, device, out, resume, monitor, progress, description,
                    meta or {}, on_epoch)
    finally:
        torch.set_num_threads(threads)
        if config.sync_bn:
            revert_sync_batchnorm(net)


def _shared_checkpoint(run: RunFiles, rank: int, world_size: int) -> dict | None:
    """The checkpoint rank 0 reads, in every process (a multi-node run need not share a
    file system); an error reading it is raised in every process, so none waits."""
    if world_size == 1:
        return run.checkpoints.load()
    payload = [None]
    if rank == 0:
        try:
            payload[0] = ("state", run.checkpoints.load())
        except Exception as exc:  # noqa: BLE001 - handed to every process, raised there
            payload[0] = ("error", exc)
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


def _check_resumable(state: dict, config: TrainConfig, world_size: int,
                     steps_per_epoch: int, root: Path) -> None:
    # Fields added to TrainConfig since the checkpoint was written take their defaults.
    saved = TrainConfig.from_dict(state["config"])
    saved_world = state.get("world_size", 1)
    if saved_world == world_size or \
            dataclasses.replace(saved, batch_size=config.batch_size) != config:
        if saved != config:
            raise UsageError(f"{root} holds a run with a different configuration; use "
                             f"another output directory, or restart it (resume=False / "
                             f"--restart)")
        return
    saved_steps = state.get("steps_per_epoch", steps_per_epoch)
    if (saved_world * saved.batch_size != world_size * config.batch_size
            or saved_steps != steps_per_epoch):
        raise UsageError(
            f"{root} holds a run of {saved_world} process(es) x batch {saved.batch_size} "
            f"({saved_steps} steps per epoch); {world_size} process(es) x batch "
            f"{config.batch_size} gives {steps_per_epoch}: resume it with a batch size that "
            f"keeps the global batch {saved_world * saved.batch_size}, or restart it")


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run's seed (one process is rank 0 of one); the others get their
    own streams (dropout masks), deterministic in (seed, rank)."""
    return seed if rank == 0 else seed * 1_000_003 + 7919 * rank


def _fit(model, data, config, device, out, resume, monitor, progress, description, meta,
         on_epoch) -> FitResult:
    start_time = time.perf_counter()
    rank, world_size = world()
    device = rank_device(device)
    model.to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    n = len(x_train)
    steps_per_epoch = len(_batches(n, config.batch_size, config.seed, 0, world_size))
    if world_size > 1 and steps_per_epoch == 0:
        raise UsageError(f"{n} training samples cannot give each of {world_size} processes "
                         f"2 samples of a batch; use fewer processes")
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    use_amp = config.amp and device.type in ("cpu", "cuda")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if use_amp and device.type == "cuda" else None

    run = RunFiles(out) if out is not None else None
    writes = run is not None and rank == 0
    result = FitResult(out=run.root if run else None)
    epoch, step_in_epoch, global_step = 0, 0, 0
    sums = {"loss": 0.0, "correct": 0, "seen": 0}
    state = _shared_checkpoint(run, rank, world_size) if run and resume else None
    if state is not None:
        _check_resumable(state, config, world_size, steps_per_epoch, run.root)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _restore_rng(state, config.seed, rank, world_size, device)
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        global_step, sums = state["global_step"], dict(state["sums"])
        result.history = list(state["history"])
        result.diverged_at_step = state.get("diverged_at_step")
        result.resumed_from_step = global_step
    else:
        if writes:
            run.checkpoints.clear()
            run.root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(_rank_seed(config.seed, rank))
    if writes:
        facts = {"config": config.to_dict(), **meta, "data": data.summary(),
                 "device": str(device)}
        if world_size > 1:
            facts["distributed"] = {"world_size": world_size, "backend": dist.get_backend(),
                                    "global_batch_size": world_size * config.batch_size}
        run.write_json("config.json", facts)

    def save(epoch_done: int, next_step: int) -> None:
        if run is None:
            return
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
        if world_size > 1:  # every process's stream, for an exact resume
            mine = {"torch": rng["torch"], "cuda": torch.cuda.get_rng_state(device)
                    if device.type == "cuda" else None}
            rng["ranks"] = [None] * world_size
            dist.all_gather_object(rng["ranks"], mine)
        if not writes:
            return
        run.checkpoints.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng, "epoch": epoch_done, "step_in_epoch": next_step,
            "global_step": global_step, "sums": dict(sums), "history": result.history,
            "config": config.to_dict(), "diverged_at_step": result.diverged_at_step,
            "world_size": world_size, "steps_per_epoch": steps_per_epoch})

    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    total_steps = config.epochs * steps_per_epoch
    show = (sys.stderr.isatty() if progress is None else progress) and rank == 0
    model.train()
    with _Progress(show, description, total_steps, global_step) as bar:
        while epoch < config.epochs and not result.diverged:
            epoch_start = time.perf_counter()
            batches = _batches(n, config.batch_size, config.seed, epoch, world_size)
            for k in range(step_in_epoch, len(batches)):
                index, offset = _shard(batches[k], world_size, rank)
                index = index.to(device)
                xb, yb = x_train[index], y_train[index]
                if config.augment:
                    generator = torch.Generator().manual_seed(config.seed * 7919 + global_step)
                    xb = augment_images(xb, config.crop_padding, generator, offset=offset,
                                        total=len(batches[k]))
                with (torch.autocast(device.type, dtype=amp_dtype) if use_amp
                      else contextlib.nullcontext()):
                    logits = train_model(xb)
                loss = F.cross_entropy(_full_precision(logits), yb,
                                       label_smoothing=config.label_smoothing)
                if world_size > 1:
                    # One small all-reduce: the step's totals for the metrics, and a verdict
                    # on divergence that every process shares (none may stop alone).
                    totals = torch.stack([loss.detach().double() * len(index),
                                          (logits.argmax(1) == yb).sum().double(),
                                          torch.tensor(float(len(index)), device=device,
                                                       dtype=torch.float64),
                                          (~torch.isfinite(loss.detach())).double()])
                    dist.all_reduce(totals)
                    step_loss, step_correct, step_seen, nonfinite = totals.tolist()
                    finite = nonfinite == 0
                    if len(index) * world_size != len(batches[k]):
                        # DDP averages the processes' gradients: weight each slice's mean
                        # so that the result is the mean over the whole batch.
                        loss = loss * (len(index) * world_size / len(batches[k]))
                else:
                    finite = bool(torch.isfinite(loss))
                if not finite:
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
                if world_size == 1:
                    step_seen = len(index)
                    step_loss = loss.item() * step_seen
                    step_correct = (logits.argmax(1) == yb).sum().item()
                sums["loss"] += step_loss
                sums["correct"] += int(step_correct)
                sums["seen"] += int(step_seen)
                if monitor is not None:
                    monitor.step(loss)
                bar.advance(step_loss / step_seen, sums["correct"] / sums["seen"], int(step_seen))
                if (config.checkpoint_every and global_step % config.checkpoint_every == 0
                        and k + 1 < len(batches)):
                    save(epoch, k + 1)
            if result.diverged:
                break
            if world_size > 1:
                test_loss, test_acc = _evaluate_shared(model, x_test, y_test,
                                                       config.eval_batch_size, rank, world_size)
            else:
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
            if writes:
                run.write_metrics(result.history)
            if on_epoch is not None:
                on_epoch(row)
    result.seconds = time.perf_counter() - start_time
    if run is not None:
        if result.diverged:
            save(epoch, step_in_epoch)  # records the divergence; weights are the last finite
        if writes:
            run.write_json("result.json", json_safe(result.to_dict()))
    return result


def _restore_rng(state: dict, seed: int, rank: int, world_size: int,
                 device: torch.device) -> None:
    rng = state["rng"]
    ranks = rng.get("ranks")
    if world_size > 1 and ranks is not None and len(ranks) == world_size:
        torch.set_rng_state(ranks[rank]["torch"])
        if device.type == "cuda" and ranks[rank].get("cuda") is not None:
            torch.cuda.set_rng_state(ranks[rank]["cuda"], device)
    elif rank == 0:
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            if world_size > 1:
                torch.cuda.set_rng_state(rng["cuda"][device.index or 0], device)
            else:
                torch.cuda.set_rng_state_all(rng["cuda"])
    else:  # a different number of processes: a fresh, deterministic stream
        torch.manual_seed(_rank_seed(seed, rank) + state["global_step"])


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
