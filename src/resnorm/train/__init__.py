"""Training: a deterministic loop with checkpoints and exact resume, and its configuration."""
from .build import model_for_data
from .checkpoint import CheckpointDir, CheckpointError, load_checkpoint
from .config import OPTIMIZERS, SCHEDULES, TrainConfig
from .loop import FitResult, RunFiles, evaluate, fit
from .optim import augment_images, make_optimizer, make_scheduler

__all__ = [
    "CheckpointDir", "CheckpointError", "FitResult", "OPTIMIZERS", "RunFiles", "SCHEDULES",
    "TrainConfig", "augment_images", "evaluate", "fit", "load_checkpoint",
    "make_optimizer", "make_scheduler", "model_for_data",
]
