"""Building what ``diagnose`` needs from names: a registered model or a user's factory,
and a batch of N(0, 1) inputs with random labels (Brock et al.'s protocol)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_choice, check_fits_in_memory, check_float, check_int, format_bytes
from ..errors import UsageError
from ..models import create_model
from .diagnose import Diagnosis, diagnose
from .outputs import read_output

# diagnose() keeps every layer's activations and gradients: a floor on its memory, in
# multiples of the input batch (a deep model needs many times more).
_ACTIVATION_FACTOR = 4


def load_factory(spec: str):
    """The callable named by ``"package.module:function"`` (imported: it runs that code)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"factory={spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"factory={spec!r}: cannot import {module_name!r} ({exc})") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise UsageError(f"factory={spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise UsageError(f"factory={spec!r} is not callable")
    return factory


def random_batch(
    model: nn.Module, batch_size: int, input_shape: Sequence[int] | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """N(0, 1) inputs of ``(batch_size, *input_shape)`` (the model's
    ``example_input_shape`` by default) and random labels over its outputs."""
    check_int("batch_size", batch_size, minimum=2)
    if input_shape is None:
        input_shape = getattr(model, "example_input_shape", None)
        if input_shape is None:
            raise UsageError(
                "the model has no example_input_shape; give input_shape "
                "(--input-shape on the command line), e.g. 3,32,32"
            )
    shape = tuple(input_shape)
    for size in shape:
        check_int("input_shape", size, minimum=1)
    input_bytes = batch_size * math.prod(shape) * 4
    check_fits_in_memory(
        f"a batch of batch_size={batch_size} inputs of shape {shape}",
        _ACTIVATION_FACTOR * input_bytes,
        note=f"{format_bytes(input_bytes)} of float32 inputs, times "
        f"{_ACTIVATION_FACTOR} for the activations and gradients that "
        f"diagnose keeps, at the least",
    )
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *shape), generator=generator)
    with torch.no_grad():
        was_training = model.training
        out = model.eval()(x[:2])
        model.train(was_training)
    out = read_output(out).logits
    if out is None:
        raise UsageError(
            "the model returned no logits to draw labels for; call diagnose() with your own targets"
        )
    num_classes = out.shape[-1] if out.dim() >= 2 else 2
    y = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return x, y


def diagnose_named(
    name: str | None = None,
    *,
    factory: str | None = None,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    steps: int = 0,
    optimizer: str = "adam",
    lr: float = 1e-3,
    **overrides,
) -> Diagnosis:
    """Diagnose a registered model (``create_model(name, **overrides)``) or the model a
    user's factory returns (``factory="pkg.mod:fn"``, called with ``overrides``), at
    initialization (seeded), on a random batch; with ``steps``, also ``steps`` steps of
    ``optimizer`` (one of :data:`OPTIMIZERS`) at learning rate ``lr`` on that batch."""
    if (name is None) == (factory is None):
        raise UsageError("give either a registered model name or factory='pkg.mod:fn'")
    torch.manual_seed(seed)
    if factory is not None:
        model = load_factory(factory)(**overrides)
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"factory={factory!r} returned {type(model).__name__}, not an nn.Module"
            )
        label = factory
    else:
        model = create_model(name, **overrides)
        label = name + "".join(f" {k}={v}" for k, v in overrides.items())
    x, y = random_batch(model, batch_size, input_shape, seed)
    check_int("steps", steps, minimum=0)
    opt = make_optimizer(optimizer, model.parameters(), lr) if steps else None
    return diagnose(model, x, y, name=label, optimizer=opt, steps=steps or None)


# The optimizers the command line can train with, as a user would set them up.
OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """``OPTIMIZERS[name]`` over ``params`` at learning rate ``lr`` (SGD with momentum 0.9)."""
    check_choice("optimizer", name, tuple(OPTIMIZERS))
    check_float("lr", lr, low=0.0, low_inclusive=False)
    return OPTIMIZERS[name](params, lr)
