"""Random inputs of any shape with labels that depend on them: a stand-in for a real data
set in smoke tests and timings (a CIFAR-shaped set in milliseconds)."""

from __future__ import annotations

import math

import numpy as np

from .._checks import check_fits_in_memory, check_int
from ..errors import UsageTypeError
from .base import DataSplit, from_arrays


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not shape:
        raise UsageTypeError(f"shape must be an int or a non-empty tuple of ints, got {shape!r}")
    for i, size in enumerate(shape):
        check_int(f"shape[{i}]", size, minimum=1)
    return tuple(shape)


def _peak_bytes(features: int, num_classes: int, train_samples: int, test_samples: int) -> int:
    """What :func:`load_synthetic` holds at its peak: the float64 map (three copies while
    it is orthonormalized), both float32 splits, and one split's float64 copy and scores
    while it is labelled."""
    weights = 8 * features * num_classes * (3 if num_classes <= features else 1)
    inputs = 4 * features * (train_samples + test_samples)
    labelling = 8 * (features + num_classes) * max(train_samples, test_samples)
    return weights + inputs + labelling


def load_synthetic(
    shape: int | tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    *,
    train_samples: int = 1024,
    test_samples: int = 256,
    seed: int = 42,
) -> DataSplit:
    """Inputs drawn from N(0, 1) of shape ``(N, *shape)``; label = argmax of a fixed random
    linear map of the flattened input, so a linear classifier can reach 100%.

    The map's columns are orthonormal where ``num_classes`` <= the input size, which makes
    every class equally likely. Deterministic per ``seed``; the test set does not depend on
    ``train_samples`` (the map, the training and the test inputs have separate generators).
    Sizes whose arrays would need more memory than this machine has raise ``ValueError``
    before anything is drawn.
    """
    shape = _check_shape(shape)
    check_int("num_classes", num_classes, minimum=2)
    check_int("train_samples", train_samples, minimum=1)
    check_int("test_samples", test_samples, minimum=1)
    check_int("seed", seed, minimum=0)
    features = math.prod(shape)
    check_fits_in_memory(
        f"synthetic data with shape={shape}, num_classes={num_classes}, "
        f"train_samples={train_samples}, test_samples={test_samples}",
        _peak_bytes(features, num_classes, train_samples, test_samples),
        note="float32 inputs, float64 copies while labelling them, and the float64 random map",
    )
    map_rng, train_rng, test_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    weights = map_rng.standard_normal((features, num_classes))
    if num_classes <= features:
        weights = np.linalg.qr(weights)[0]
    else:
        weights /= np.linalg.norm(weights, axis=0)

    def sample(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((count, *shape), dtype=np.float32)
        return x, (x.reshape(count, -1).astype(np.float64) @ weights).argmax(1)

    x_train, y_train = sample(train_rng, train_samples)
    x_test, y_test = sample(test_rng, test_samples)
    return from_arrays(
        "synthetic",
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes,
        f"synthetic (seed {seed}): {train_samples:,} train / {test_samples:,} test samples of "
        f"shape {shape} drawn from N(0, 1), {num_classes} classes; label = argmax of a fixed "
        f"random linear map of the input (linearly separable)",
    )
