"""Training: a deterministic loop for classifiers on in-memory data."""
from .loop import FitResult, TrainConfig, evaluate, fit

__all__ = ["FitResult", "TrainConfig", "evaluate", "fit"]
