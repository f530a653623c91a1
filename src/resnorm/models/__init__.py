"""The model zoo: ``create_model(name, **overrides)`` and ``list_models()``.

Every model takes ``norm=`` (any :func:`resnorm.norms.make_norm` kind) and ``residual=``.
One file per family, each with its class and its registered variants: ``mlp``,
``cifar_resnet`` (CIFAR and 1-D ResNets), ``imagenet_resnet``, ``densenet``,
``transformer``.
"""

from . import (  # noqa: F401  (they register the models)
    cifar_resnet,
    densenet,
    imagenet_resnet,
    mlp,
    transformer,
)
from .cifar_resnet import CifarResNet
from .densenet import CifarDenseNet
from .imagenet_resnet import ImageNetResNet
from .mlp import ResidualMLP
from .registry import (
    ModelEntry,
    accepted_options,
    create_model,
    get_model_entry,
    list_models,
    register_model,
)
from .transformer import TransformerClassifier

__all__ = [
    "CifarDenseNet",
    "CifarResNet",
    "ImageNetResNet",
    "ModelEntry",
    "ResidualMLP",
    "TransformerClassifier",
    "accepted_options",
    "create_model",
    "get_model_entry",
    "list_models",
    "register_model",
]
