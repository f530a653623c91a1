"""scikit-learn's 8x8 handwritten digits, shipped inside the package (no download).

``sklearn.datasets.load_digits`` reads a file installed with scikit-learn: the test part of
the UCI "Optical Recognition of Handwritten Digits" set, 1,797 images of 8x8 pixels with
values 0-16, about 180 of each digit.
"""

from __future__ import annotations

import numpy as np

from .base import DataSplit, check_split, describe_stats, from_arrays, standardize, stratified_split


def load_digits(*, train_split: float = 0.8, seed: int = 42) -> DataSplit:
    """The 1,797 digits as (N, 1, 8, 8) images, split ``train_split`` / rest per class.

    Pixels are scaled to [0, 1], then standardized with the training split's mean and
    standard deviation. The split is stratified and depends only on ``seed``: the default
    gives 1,438 training and 359 test images.
    """
    check_split(train_split, seed)
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    labels = bunch.target.astype(np.int64)
    train_index, test_index = stratified_split(labels, train_split, seed)
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test = images[train_index], images[test_index]
    mean, std = standardize(x_train, x_test)
    return from_arrays(
        "digits",
        x_train,
        labels[train_index],
        x_test,
        labels[test_index],
        10,
        f"scikit-learn's 8x8 handwritten digits (UCI optical recognition set, shipped with "
        f"scikit-learn): {len(x_train):,} train / {len(x_test):,} test images of shape "
        f"(1, 8, 8), 10 classes (digits 0-9); stratified split with seed {seed}; pixels "
        f"scaled to [0, 1], then standardized with the training split's "
        f"{describe_stats(mean, std)}",
    )
