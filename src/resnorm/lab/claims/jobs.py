"""One training run of the claims study (a *job*: a variant at one learning rate and one
seed) and the measurements taken during it.

A job trains with :func:`resnorm.train.fit` (or, with the other learning rates and seeds
of its variant, :func:`resnorm.train.fit_stacked`: :func:`run_jobs`) on the training
split less a validation split (stratified, the same for every job), with one thread
(:data:`JOB_THREADS`), is evaluated on the validation split after every epoch (that is
what picks each variant's learning rate) and on the test split once at the end. What it
records (all plain JSON):

- ``history``: per epoch ``train_loss``, ``train_acc`` (running, in training mode) and
  ``val_acc``; ``steps_per_epoch``; ``diverged``;
- ``val_acc``, ``test_acc`` at the end (fractions); ``seconds`` of training (when the
  job trained stacked, :func:`run_jobs`, the stack's time shared out) and
  ``stacked_with``, the number of jobs trained together (1: alone);
- ``grad_first_over_last``: log10 of the gradient norm of the first weight layer over the
  last hidden one (the one before the classifier), at initialization, on one batch;
- ``change_first_over_last``: log10 of the same layers' relative weight change
  ``||W_end - W_init|| / ||W_init||`` over training;
- ``grad_variability``: the standard deviation over training steps of
  ``log10(||g_t|| / ||g_t-1||)``, the global gradient norm's step-to-step change;
- with residual blocks: ``branch_ratio``, per epoch (0 = at init) the mean over blocks of
  ``log10(||branch|| / ||skip||)`` at each residual add, on one fixed batch;
- with ``probes=("santurkar",)``: at three points of training (after the first epoch, the
  middle one and the last) the internal covariate shift (mean over layers of
  ``l2 / grad_norm``) and the loss landscape (loss variation, beta-smoothness, and the
  gradient's predictiveness as the largest change of the gradient along the step) of
  :mod:`resnorm.diagnostics.landscape`, measured with an SGD step of :data:`PROBE_LR`.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import torch
from torch import nn

#: The SGD step size of the Santurkar measurements (the same for every variant).
PROBE_LR = 0.1
#: Samples of the fixed batch the probes use.
PROBE_BATCH = 256
#: The intra-op threads of a job, for all of it (building, probes, training, evaluation):
#: the lab runs one worker process per core.
JOB_THREADS = 1
#: Part of every run's key: raise it when what a run records changes, so that records
#: written by an earlier version are trained again instead of read.
RECORD_VERSION = 2


@dataclass(frozen=True)
class Job:
    """A variant of an experiment at one learning rate and seed. Two jobs with the same
    configuration (whatever experiment or variant names them) are the same run."""

    model: str
    options: tuple
    lr: float
    seed: int
    epochs: int
    batch_size: int
    num_samples: int
    val_fraction: float
    optimizer: str = "adamw"
    probes: tuple = ()
    dataset: str = "mnist1d"
    device: str = "cpu"

    def describe(self) -> dict:
        """The run in a few fields, for error messages and the report."""
        return {
            "model": self.model,
            "options": dict(self.options),
            "lr": self.lr,
            "seed": self.seed,
        }

    @property
    def key(self) -> str:
        text = json.dumps([RECORD_VERSION, asdict(self)], sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def cost(self) -> float:
        """A rough relative cost, to start the longest jobs first."""
        options = dict(self.options)
        depth = options.get("depth", 8)
        per_step = depth * (8 if self.model == "resnet1d" else 1) + (
            40 if self.model == "gru" else 0
        )
        return self.epochs * self.num_samples / self.batch_size * (per_step + 10)


@lru_cache(maxsize=4)
def job_data(dataset: str, num_samples: int, val_fraction: float):
    """(train split less validation, test set): the first ``DataSplit`` trains and
    validates, the second holds the test set. Loaded once per process."""
    from ...data import load_dataset
    from ...data.base import DataSplit, stratified_split

    data = load_dataset(dataset, num_samples=num_samples)
    keep, val = stratified_split(data.y_train.numpy(), 1 - val_fraction, seed=0)
    keep, val = torch.from_numpy(keep), torch.from_numpy(val)
    split = DataSplit(
        data.name,
        data.x_train[keep],
        data.y_train[keep],
        data.x_train[val],
        data.y_train[val],
        data.num_classes,
        f"{data.name}: {len(keep)} train / {len(val)} validation samples",
    )
    return split, data


def _weights(model: nn.Module) -> list[nn.Parameter]:
    """The weight matrices and kernels (2 or more dimensions) in registration order."""
    return [p for name, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]


def _log_ratio(a: float, b: float) -> float | None:
    return math.log10(a / b) if a > 0 and b > 0 and math.isfinite(a / b) else None


def _grad_first_over_last(model: nn.Module, x, y) -> float | None:
    weights = _weights(model)
    if len(weights) < 3:
        return None
    with probing(model):
        nn.functional.cross_entropy(model(x), y).backward()
        first, last = weights[0].grad, weights[-2].grad
        return _log_ratio(float(first.norm()), float(last.norm())) if first is not None else None


def probing(model: nn.Module):
    """Run a probe in training mode and leave the run as found: gradients, buffers (batch
    norm's running statistics), modes and the random generators' states
    (:func:`resnorm.diagnostics.restore.state_restored`)."""
    from ...diagnostics.restore import state_restored

    return state_restored(model, model, True)


def _branch_ratio(model: nn.Module, x) -> float | None:
    """Mean over residual adds of log10(||branch|| / ||skip||) on ``x``."""
    from ...blocks.residual import ResidualAdd

    ratios = []

    def hook(module, args, output):
        branch, skip = args[0], args[1]
        ratios.append(_log_ratio(float(branch.norm()), float(skip.norm())))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, ResidualAdd) and m.residual
    ]
    if not handles:
        return None
    try:
        with torch.no_grad(), probing(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    finite = [r for r in ratios if r is not None]
    return sum(finite) / len(finite) if finite else None


def _santurkar(model: nn.Module, x, y) -> dict:
    from ...diagnostics.landscape import internal_covariate_shift, loss_landscape

    shifts = internal_covariate_shift(model, x, y, lr=PROBE_LR)
    relative = [s.l2 / s.grad_norm for s in shifts[1:] if s.grad_norm > 0 and math.isfinite(s.l2)]
    land = loss_landscape(model, x, y, lr=PROBE_LR)
    return {
        "ics": math.log10(sum(relative) / len(relative))
        if relative and sum(relative) > 0
        else None,
        "loss_variation": _log10(land.loss_variation),
        "beta_smoothness": _log10(land.beta_smoothness),
        "grad_predictiveness": _log10(land.grad_change_range[1]),
    }


def _log10(value: float) -> float | None:
    return math.log10(value) if value > 0 and math.isfinite(value) else None


class _GradNorms:
    """The fit loop's monitor: the global gradient norm after every step."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.norms: list[float] = []

    def step(self, loss) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))

    def variability(self) -> float | None:
        logs = [math.log10(n) for n in self.norms if n > 0 and math.isfinite(n)]
        steps = [b - a for a, b in zip(logs, logs[1:], strict=False)]
        if len(steps) < 2:
            return None
        mean = sum(steps) / len(steps)
        return math.sqrt(sum((s - mean) ** 2 for s in steps) / (len(steps) - 1))


class _Measured:
    """One job's model, training configuration and measurements, taken the same way
    whether the job trains alone (:func:`run_job`) or stacked (:func:`run_jobs`): built
    from the job's seed, probed at initialization, after every epoch (:meth:`on_epoch`)
    and at the end (:meth:`record`)."""

    def __init__(self, job: Job) -> None:
        from ...train import TrainConfig
        from .models import build_model

        self.job = job
        self.split, self.data = job_data(job.dataset, job.num_samples, job.val_fraction)
        torch.manual_seed(job.seed)
        model = build_model(
            job.model, self.data.x_train[0].numel(), self.data.num_classes, dict(job.options)
        )
        self.model = model
        self.x = self.split.x_train[:PROBE_BATCH]
        self.y = self.split.y_train[:PROBE_BATCH]
        self.start = [w.detach().clone() for w in _weights(model)]
        self.first = {"grad_first_over_last": _grad_first_over_last(model, self.x, self.y)}
        self.branch = [_branch_ratio(model, self.x)]
        self.probe_epochs = sorted({1, (job.epochs + 1) // 2, job.epochs})
        self.santurkar: list[dict] = []
        self.grads = _GradNorms(model)
        self.config = TrainConfig(
            epochs=job.epochs,
            batch_size=job.batch_size,
            lr=job.lr,
            optimizer=job.optimizer,
            seed=job.seed,
            device=job.device,
            warmup_epochs=min(1.0, job.epochs / 2),
            threads=JOB_THREADS,
        )

    def on_epoch(self, row: dict) -> None:
        device = model_device(self.model)
        xd, yd = self.x.to(device), self.y.to(device)
        self.branch.append(_branch_ratio(self.model, xd))
        if "santurkar" in self.job.probes and row["epoch"] in self.probe_epochs:
            self.santurkar.append(_santurkar(self.model, xd, yd))

    def record(self, result) -> dict:
        """The job's record, from the trained model and ``fit``'s result."""
        change = [
            float((w.detach().cpu() - s).norm() / s.norm())
            for w, s in zip(_weights(self.model), self.start, strict=True)
        ]
        record = dict(self.first)
        record.update(_outcome(self.model, result, self.data, self.job))
        record.update(
            change_first_over_last=_log_ratio(change[0], change[-2]) if len(change) >= 3 else None,
            grad_variability=self.grads.variability(),
            branch_ratio=self.branch if self.branch[0] is not None else None,
            santurkar=self.santurkar or None,
            stacked_with=result.stacked_with,
        )
        return record


def run_job(job: Job) -> dict:
    """Train ``job`` alone and return its record (see the module's docstring)."""
    from ...train.threads import intra_op_threads

    with intra_op_threads(JOB_THREADS):
        return _fit_alone(_Measured(job))


def _fit_alone(run: _Measured) -> dict:
    """Train one built job with :func:`resnorm.train.fit`; its record."""
    from ...train import fit

    result = fit(
        run.model, run.split, run.config, progress=False, monitor=run.grads, on_epoch=run.on_epoch
    )
    return run.record(result)


def stack_refusal(jobs: list[Job]) -> str | None:
    """Why ``jobs`` cannot be given to :func:`run_jobs`, in words, or ``None`` when they
    can: they must differ only in learning rate and seed (:func:`stack_key`). (Models
    that :func:`resnorm.train.fit_stacked` does not stack, such as ones that draw noise
    in training, then train one after the other.)"""
    if len(jobs) < 2:
        return "a single job"
    if len({stack_key(j) for j in jobs}) > 1:
        return "the jobs differ in more than their learning rate and seed"
    return None


def stack_key(job: Job) -> Job:
    """The jobs that may train together (one stacked computation) share this key: the
    job with its learning rate and seed blanked out."""
    return replace(job, lr=0.0, seed=0)


def run_jobs(jobs: list[Job]) -> list[dict]:
    """Train ``jobs`` (which differ only in learning rate and seed) and return their
    records in order: together as one stacked computation
    (:func:`resnorm.train.fit_stacked`) when their models can be stacked, else one after
    the other. Each record is what :func:`run_job` records for the job alone, to float32
    rounding (the order of operations inside the batched kernels differs); its
    ``stacked_with`` says how many runs trained together."""
    from ...train.threads import intra_op_threads

    refusal = stack_refusal(jobs)
    if refusal is not None:
        raise ValueError(f"these {len(jobs)} jobs cannot train stacked: {refusal}")
    with intra_op_threads(JOB_THREADS):
        return _run_stacked(jobs)


def _run_stacked(jobs: list[Job]) -> list[dict]:
    from ...train import fit_stacked
    from ...train import stack_refusal as model_refusal

    runs = [_Measured(job) for job in jobs]
    models, configs = [r.model for r in runs], [r.config for r in runs]
    if model_refusal(models, configs) is not None:
        return [_fit_alone(run) for run in runs]
    with warnings.catch_warnings():
        # vmap runs attention's fused CPU kernel one run at a time (a PyTorch fallback);
        # the stacked runs are still right, and the lab's timing says what it costs.
        warnings.filterwarnings("ignore", message="There is a performance drop because")
        results = fit_stacked(
            models,
            runs[0].split,
            configs,
            monitors=[r.grads for r in runs],
            on_epoch=lambda i, row: runs[i].on_epoch(row),
        )
    return [run.record(result) for run, result in zip(runs, results, strict=True)]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _outcome(model, result, data, job: Job) -> dict:
    from ...train import evaluate

    history = [
        {
            "epoch": r["epoch"],
            "train_loss": r["train_loss"],
            "train_acc": r["train_acc"],
            "val_acc": r["test_acc"],
        }
        for r in result.history
    ]
    device = model_device(model)
    _, test_acc = evaluate(model, data.x_test.to(device), data.y_test.to(device))
    steps = math.ceil(
        len(job_data(job.dataset, job.num_samples, job.val_fraction)[0].x_train) / job.batch_size
    )
    return {
        "history": history,
        "steps_per_epoch": steps,
        "diverged": result.diverged,
        "val_acc": history[-1]["val_acc"] if history else None,
        "test_acc": test_acc if math.isfinite(test_acc) else None,
        # trained stacked: the stack's time shared out, as the grid lab shares a unit's
        "seconds": result.seconds / max(1, result.stacked_with),
    }
