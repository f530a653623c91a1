"""The model registry: ``create_model(name, **overrides)`` and ``list_models()``, as in timm."""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import UsageError, UsageTypeError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    defaults: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable[..., nn.Module], description: str = "", *,
                   fixed: dict | None = None, **defaults) -> None:
    """Register ``builder`` under ``name``. ``fixed`` are the keyword arguments that define
    the variant (``depth=56`` for ``resnet56``) and cannot be overridden; ``defaults`` are
    used unless ``create_model`` overrides them."""
    if name in _REGISTRY:
        raise UsageError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelEntry(name, builder, dict(defaults), dict(fixed or {}), description)


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
        raise UsageError(f"unknown model {name!r}{hint} (list_models() gives all "
                         f"{len(_REGISTRY)} names)")
    return _REGISTRY[name]


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
        raise UsageTypeError(f"create_model({name!r}) fixes {fixed}; build another variant by its "
                        f"own name or through its family's generic entry")
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise UsageTypeError(f"create_model({name!r}) got unexpected option(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(accepted)}")
    return entry.builder(**{**entry.defaults, **overrides, **entry.fixed})
