"""``TrainConfig``: every hyper-parameter of a training run, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .._checks import check_choice, check_device, check_float, check_int
from ..errors import UsageError, UsageTypeError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`~resnorm.train.fit`.

    Optimizers: ``"adamw"`` (default) or ``"sgd"`` (``momentum``, ``nesterov``), with
    decoupled ``weight_decay``. Learning-rate schedule, stepped every batch: a linear
    warm-up over ``warmup_epochs`` from ``lr / warmup_steps`` to ``lr``, then ``"cosine"``
    (to zero), ``"step"`` (times ``gamma`` at each of ``milestones``, given as fractions of
    the run: the ResNet paper's 32k and 48k of 64k iterations are 0.5 and 0.75), or
    ``"constant"``. ``augment`` (images only): random crops of the zero-padded image
    (``crop_padding`` pixels) and horizontal flips, done on tensors. ``amp``: bfloat16
    autocast on the CPU, float16 with a gradient scaler on CUDA. ``checkpoint_every``:
    also checkpoint every that many steps (every epoch always). ``device="auto"`` picks
    CUDA when available.

    Distributed (``fit`` inside a torch.distributed process group of N processes):
    ``batch_size`` is per process, PyTorch's convention, so a step sees N x
    ``batch_size`` samples; ``sync_bn`` turns every batch norm into
    :class:`~resnorm.norms.SyncBatchNorm` for the run, so its statistics are those of the
    N x ``batch_size`` samples (without it each process normalizes its own slice).
    """

    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 3e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-2
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    augment: bool = False
    crop_padding: int = 4
    grad_clip: float | None = None
    amp: bool = False
    compile: bool = False
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    checkpoint_every: int | None = None
    eval_batch_size: int = 1024
    sync_bn: bool = False

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_float("lr", self.lr, low=0.0, low_inclusive=False, finite=True)
        check_float("momentum", self.momentum, low=0.0, high=1.0, high_inclusive=False)
        check_float("weight_decay", self.weight_decay, low=0.0, finite=True)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_float("warmup_epochs", self.warmup_epochs, low=0.0)
        if self.warmup_epochs > self.epochs:
            raise UsageError(
                f"warmup_epochs={self.warmup_epochs:g} must not exceed epochs={self.epochs}"
            )
        object.__setattr__(self, "milestones", tuple(self.milestones))
        for m in self.milestones:
            check_float(
                "milestones", m, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
            )
        check_float("gamma", self.gamma, low=0.0, high=1.0, low_inclusive=False)
        check_float(
            "label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_inclusive=False
        )
        check_int("crop_padding", self.crop_padding, minimum=0)
        if self.grad_clip is not None:
            check_float("grad_clip", self.grad_clip, low=0.0, low_inclusive=False, finite=True)
        check_device("device", self.device)
        if self.threads is not None:
            check_int("threads", self.threads, minimum=1)
        check_int("seed", self.seed, minimum=0)
        if self.checkpoint_every is not None:
            check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        check_int("eval_batch_size", self.eval_batch_size, minimum=1)
        if not isinstance(self.sync_bn, bool):
            raise UsageTypeError(f"sync_bn must be True or False, got {self.sync_bn!r}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict (e.g. a checkpoint's); unknown keys raise ``TypeError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageTypeError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**values)
