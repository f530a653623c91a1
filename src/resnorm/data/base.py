"""What every data set loader returns, and the on-disk cache they share."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .._checks import check_float, check_int
from .._io import atomic_open
from ..errors import UsageError, UsageTypeError


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

    def to(self, device) -> DataSplit:
        """The same data set with its tensors on ``device`` (itself where they are)."""
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return replace(self, **moved)

    def summary(self) -> str:
        """One line: name, sizes, sample shape and classes."""
        return (
            f"{self.name}: {len(self.x_train):,} train / {len(self.x_test):,} test samples "
            f"of shape {self.sample_shape}, {self.num_classes} classes"
        )


def cache_dir() -> Path:
    """Where generated data sets are cached: ``$RESNORM_CACHE``, else
    ``$XDG_CACHE_HOME/resnorm``, else ``~/.cache/resnorm``."""
    if os.environ.get("RESNORM_CACHE"):
        return Path(os.environ["RESNORM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resnorm"


def data_dir() -> Path:
    """Where the loaders of downloadable data sets (CIFAR, MNIST, Fashion-MNIST) look for
    their files when no ``root`` is given: ``$RESNORM_DATA``, else ``data`` under
    :func:`cache_dir` (``~/.cache/resnorm/data``)."""
    if os.environ.get("RESNORM_DATA"):
        return Path(os.environ["RESNORM_DATA"]).expanduser()
    return cache_dir() / "data"


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The folder a loader's ``root`` argument names, or :func:`data_dir` for ``None``."""
    if root is None:
        return data_dir()
    if not isinstance(root, (str, os.PathLike)):
        raise UsageTypeError(
            f"root must be a path (str or os.PathLike) or None, got {root!r} "
            f"({type(root).__name__})"
        )
    return Path(root).expanduser()


def check_limit(limit: int | None) -> int | None:
    """``limit`` (the most samples to keep of each split) if it is ``None`` or an int >= 1."""
    return None if limit is None else check_int("limit", limit, minimum=1)


def check_split(train_split: float, seed: int) -> None:
    """Check the arguments of :func:`stratified_split` before any data is loaded."""
    check_float(
        "train_split", train_split, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    check_int("seed", seed, minimum=0)


def stratified_split(
    labels: np.ndarray, train_split: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded split that keeps every class's share: of each class's ``n``
    samples, ``train_split * n`` (rounded half up) go to training, the rest to test. Both
    index arrays come back shuffled, so neither split is ordered by class. Check the
    arguments first with :func:`check_split`."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(train_split * len(members) + 0.5)
        train.append(members[:cut])
        test.append(members[cut:])
    train_index, test_index = np.concatenate(train), np.concatenate(test)
    if len(train_index) == 0 or len(test_index) == 0:
        raise UsageError(
            f"train_split={train_split:g} leaves the "
            f"{'training' if len(train_index) == 0 else 'test'} split empty "
            f"for {len(labels)} samples; choose a value further from 0 and 1"
        )
    return rng.permutation(train_index), rng.permutation(test_index)


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardize both splits in place, per channel (axis 1), with the mean and standard
    deviation of the training split; return them, each of shape (channels,).

    The statistics are accumulated in float64 over chunks of samples, two passes (mean,
    then squared deviations), so a float32 copy of CIFAR's training set is all the memory
    it takes. A channel that is constant in the training split is only centred.
    """
    axes = (0, *range(2, x_train.ndim))
    count = x_train.size // x_train.shape[1]
    chunks = range(0, len(x_train), 4096)
    mean = sum(x_train[i : i + 4096].sum(axes, dtype=np.float64) for i in chunks) / count
    shape = (1, -1) + (1,) * (x_train.ndim - 2)
    centred = mean.reshape(shape)
    var = sum(np.square(x_train[i : i + 4096] - centred).sum(axes) for i in chunks) / count
    std = np.sqrt(var)
    scale = np.where(std > 0, std, 1.0).reshape(shape).astype(x_train.dtype)
    for x in (x_train, x_test):
        x -= centred.astype(x.dtype)
        x /= scale
    return mean, std


def describe_stats(mean: np.ndarray, std: np.ndarray) -> str:
    """``mean 0.491/0.482/0.447, std 0.247/0.243/0.262``: the statistics of :func:`standardize`."""
    return f"mean {'/'.join(f'{m:.3f}' for m in mean)}, std {'/'.join(f'{s:.3f}' for s in std)}"


def from_arrays(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    description: str,
) -> DataSplit:
    """A :class:`DataSplit` from NumPy arrays: float32 inputs, int64 labels."""
    return DataSplit(
        name,
        torch.from_numpy(np.ascontiguousarray(x_train, np.float32)),
        torch.from_numpy(np.ascontiguousarray(y_train, np.int64)),
        torch.from_numpy(np.ascontiguousarray(x_test, np.float32)),
        torch.from_numpy(np.ascontiguousarray(y_test, np.int64)),
        num_classes,
        description,
    )


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
