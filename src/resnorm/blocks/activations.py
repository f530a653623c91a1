"""Activation functions by name, for the blocks' ``activation=`` argument."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .._checks import check_choice

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_activation(name: str | Callable[[], nn.Module]) -> nn.Module:
    """An activation module from a name in ``ACTIVATIONS`` or from a zero-argument factory."""
    if callable(name) and not isinstance(name, str):
        return name()
    check_choice("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]()
