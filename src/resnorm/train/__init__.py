"""Training: a deterministic loop with checkpoints and exact resume, its configuration, and
data-parallel training on torch.distributed (torchrun, DistributedDataParallel)."""
from .build import model_for_data
from .checkpoint import CheckpointDir, CheckpointError, load_checkpoint
from .config import OPTIMIZERS, SCHEDULES, TrainConfig
from .distributed import LaunchError, init_distributed, launch, shutdown_distributed
from .loop import FitResult, RunFiles, evaluate, fit
from .optim import augment_images, make_optimizer, make_scheduler

__all__ = [
    "CheckpointDir", "CheckpointError", "FitResult", "LaunchError", "OPTIMIZERS", "RunFiles",
    "SCHEDULES", "TrainConfig", "augment_images", "evaluate", "fit", "init_distributed",
    "launch", "load_checkpoint", "make_optimizer", "make_scheduler", "model_for_data",
    "shutdown_distributed",
]
