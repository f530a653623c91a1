"""What every data set loader returns, and the on-disk cache they share."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_open


@dataclass(frozen=True)
class DataSplit:
    """A classification data set held in memory: train and test tensors and a description.

    ``x_*`` are float32 tensors of shape (N, *sample_shape); ``y_*`` are int64 labels in
    ``range(num_classes)``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    description: str = ""

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def summary(self) -> str:
        """One line: name, sizes, sample shape and classes."""
        return (f"{self.name}: {len(self.x_train):,} train / {len(self.x_test):,} test samples "
                f"of shape {self.sample_shape}, {self.num_classes} classes")


def cache_dir() -> Path:
    """Where generated data sets are cached: ``$RESNORM_CACHE``, else
    ``$XDG_CACHE_HOME/resnorm``, else ``~/.cache/resnorm``."""
    if os.environ.get("RESNORM_CACHE"):
        return Path(os.environ["RESNORM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resnorm"


def cache_key(name: str, **args) -> str:
    """A file-name-safe key for a data set built from ``args``."""
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    return f"{name}-{digest}"


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write arrays to an ``.npz`` atomically: a temporary file in the same folder, then a
    rename, so a reader never sees half a file and an interrupted write leaves nothing."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """Read an ``.npz`` written by :func:`save_arrays` without unpickling anything; ``None``
    if it is missing or unreadable (the caller rebuilds it)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError):
        return None
