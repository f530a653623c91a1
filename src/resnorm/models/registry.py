"""The model registry: ``create_model(name, **overrides)`` and ``list_models()``, as in timm."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import itertools
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._checks import check_fits_in_memory, check_options
from ..errors import UsageError, UsageTypeError


@dataclass(frozen=True)
class ModelEntry:
    """A registered name. ``builder`` is the class whose signature lists the options;
    ``fixed`` are the keyword arguments that define the variant (``depth=56`` for
    ``resnet56``) and cannot be overridden; ``defaults`` are used unless overridden.
    ``factory`` is the function registered with ``@register_model``, which builds the model
    (``None`` for a name registered with a builder: ``create_model`` then calls it)."""

    name: str
    builder: Callable[..., nn.Module]
    defaults: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    description: str = ""
    factory: Callable[..., nn.Module] | None = None

    def build(self, **overrides) -> nn.Module:
        """The model with ``overrides`` on top of the defaults (checked by ``create_model``)."""
        if self.factory is not None:
            return self.factory(**overrides)
        return self.builder(**{**self.defaults, **overrides, **self.fixed})


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name=None,
    builder: Callable[..., nn.Module] | None = None,
    description: str | None = None,
    *,
    fixed: dict | None = None,
    **defaults,
):
    """Register a model, as timm and torchvision do, by decorating the function that builds it::

        @register_model(fixed={"depth": 56})
        def resnet56(**kwargs) -> CifarResNet:
            return CifarResNet(depth=56, **kwargs)

    The function's name is the model's name; its return annotation is the builder, whose
    signature lists the options ``create_model`` accepts; its keyword parameters with
    defaults (``in_channels: int = 1``) are the model's defaults; ``fixed`` are the keyword
    arguments the function passes to define the variant, which cannot be overridden; the
    description is the docstring's first line unless ``description=`` gives it.

    ``register_model(name, builder, description, fixed=..., **defaults)`` registers a
    builder (a class or function taking the options) under ``name`` without a function.
    """
    if callable(name):
        return _register_function(name, description, {})
    if name is None:
        if builder is not None or defaults:
            raise UsageTypeError(
                "@register_model(...) takes description= and fixed= only; "
                "the function's keyword parameters give its defaults"
            )
        return lambda function: _register_function(function, description, dict(fixed or {}))
    _add(ModelEntry(name, builder, dict(defaults), dict(fixed or {}), description or ""))
    return None


def _register_function(
    function: Callable[..., nn.Module], description: str | None, fixed: dict
) -> Callable[..., nn.Module]:
    name = function.__name__
    builder = typing.get_type_hints(function).get("return")
    if not callable(builder):
        raise UsageTypeError(
            f"@register_model: {name}() needs its return annotation, the "
            f"class whose options it takes (-> CifarResNet)"
        )
    options = inspect.signature(builder).parameters
    defaults = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if (
            parameter.name not in options
            or parameter.name in fixed
            or parameter.default is inspect.Parameter.empty
        ):
            raise UsageTypeError(
                f"@register_model: {name}() parameter {parameter.name!r} must "
                f"be an option of {builder.__name__} with a default, not fixed"
            )
        defaults[parameter.name] = parameter.default
    if description is None:
        description = (inspect.getdoc(function) or "").partition("\n")[0]
    _add(ModelEntry(name, builder, defaults, fixed, description, factory=function))
    return function


def _add(entry: ModelEntry) -> None:
    if entry.name in _REGISTRY:
        raise UsageError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_models(pattern: str = "*") -> list[str]:
    """The registered model names matching the shell-style ``pattern``, in natural order
    (``resnet20`` before ``resnet110``)."""
    return sorted((n for n in _REGISTRY if fnmatch.fnmatch(n, pattern)), key=_natural_key)


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; ``ValueError`` with the closest names if unknown."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(
            f"unknown model {name!r}{hint} (list_models() gives all {len(_REGISTRY)} names)"
        )
    return _REGISTRY[name]


def depth_unit(name: str) -> str | None:
    """What ``depth=`` counts in model ``name``: its builder's ``depth_unit`` (``"weight
    layers"`` for the ResNets and DenseNets, as in their papers' names; ``"blocks"`` for
    the residual MLP and the Transformer), or ``None`` for a name that is not registered
    or whose builder does not say (plots then label the axis plain "depth")."""
    entry = _REGISTRY.get(name)
    return None if entry is None else getattr(entry.builder, "depth_unit", None)


def accepted_options(name: str) -> list[str]:
    """The keyword arguments ``create_model(name, ...)`` accepts."""
    entry = get_model_entry(name)
    return [p for p in inspect.signature(entry.builder).parameters if p not in entry.fixed]


def create_model(name: str, **overrides) -> nn.Module:
    """Build the registered model ``name``, e.g. ``create_model("resnet56", norm="layer")``.

    Every model accepts ``norm=`` (any kind of :func:`resnorm.norms.make_norm`) and
    ``residual=`` (``False`` builds the plain twin); ``accepted_options(name)`` lists the rest.
    """
    entry = get_model_entry(name)
    accepted = accepted_options(name)
    # Fixed arguments first: they are left out of ``accepted``, so the unknown-option check
    # would otherwise report them as unknown instead of naming the value they are fixed at.
    clash = sorted(set(overrides) & set(entry.fixed))
    if clash:
        fixed = ", ".join(f"{k}={entry.fixed[k]!r}" for k in clash)
        raise UsageTypeError(
            f"create_model({name!r}) fixes {fixed}; build another variant by its "
            f"own name or through its family's generic entry"
        )
    check_options(f"create_model({name!r})", sorted(overrides), accepted)
    _check_model_fits(name, overrides, entry)
    return entry.build(**overrides)


class _NoMetaFills(TorchFunctionMode):
    """Initializations of meta tensors (``torch.nn.init``'s functions and in-place fills)
    return the tensor at once: a meta tensor holds no values, and PyTorch computes their
    (unchanged) shapes in Python, which otherwise makes up half the time of a meta build."""

    _FILLS = frozenset(
        {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _check_model_fits(name: str, overrides: dict, entry: ModelEntry) -> None:
    """Build the model on the meta device (shapes only, no memory, the RNG untouched) and
    raise UsageError if its parameters and buffers exceed this machine's memory: a width
    with extra digits is one line rather than an allocation that fails late or is killed."""
    options = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    what = f"model {name!r}" + (f" with {options}" if options else "")
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), _NoMetaFills():
            model = entry.build(**overrides)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, RuntimeError) and "overflow" in str(exc):
            raise UsageError(
                f"{what} would need more than 2**63 bytes (8 EiB) for one of "
                f"its tensors; no machine has that much memory"
            ) from None
        return  # a builder that needs real values, not shapes: the real build is the check
    tensors = itertools.chain(model.parameters(), model.buffers())
    check_fits_in_memory(
        what,
        sum(t.numel() * t.element_size() for t in tensors),
        note="its parameters and buffers; training needs about 4x that: "
        "gradients and AdamW's two moments",
    )
