"""Training: a deterministic loop with checkpoints and exact resume, its configuration, and
data-parallel training on torch.distributed (torchrun, DistributedDataParallel)."""

from .build import model_for_data
from .checkpoint import CheckpointDir, CheckpointError, load_checkpoint
from .compose import PreparedRun, prepare_run, train_named
from .config import OPTIMIZERS, SCHEDULES, TrainConfig
from .distributed import LaunchError, init_distributed, launch, shutdown_distributed
from .loop import FitResult, RunFiles, evaluate, fit
from .optim import augment_images, make_optimizer, make_scheduler
from .run import RunMismatchError, identity_hash, provenance, run_identity
from .stacked import fit_stacked, stack_refusal, stacking_speedup

__all__ = [
    "CheckpointDir",
    "CheckpointError",
    "FitResult",
    "LaunchError",
    "OPTIMIZERS",
    "PreparedRun",
    "RunFiles",
    "RunMismatchError",
    "SCHEDULES",
    "TrainConfig",
    "augment_images",
    "evaluate",
    "fit",
    "fit_stacked",
    "identity_hash",
    "init_distributed",
    "launch",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
    "model_for_data",
    "prepare_run",
    "provenance",
    "run_identity",
    "shutdown_distributed",
    "stack_refusal",
    "stacking_speedup",
    "train_named",
]
