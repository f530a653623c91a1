"""The model zoo: ``create_model(name, **overrides)`` and ``list_models()``.

Every model takes ``norm=`` (any :func:`resnorm.norms.make_norm` kind) and ``residual=``.
"""
from . import densenet, mlp, resnet, transformer  # noqa: F401  (they register the models)
from .densenet import CifarDenseNet
from .mlp import ResidualMLP
from .registry import (
                       ModelEntry,
                       accepted_options,
                       create_model,
                       get_model_entry,
                       list_models,
                       register_model,
)
from .resnet import CifarResNet, ImageNetResNet
from .transformer import TransformerClassifier

__all__ = [
    "CifarDenseNet", "CifarResNet", "ImageNetResNet", "ModelEntry", "ResidualMLP",
    "TransformerClassifier", "accepted_options", "create_model", "get_model_entry",
    "list_models", "register_model",
]
