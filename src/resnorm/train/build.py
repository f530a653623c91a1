"""Building a registered model that fits a data set."""

from __future__ import annotations

import inspect
import math

from torch import nn

from ..data import DataSplit
from ..errors import UsageError
from ..models import accepted_options, create_model, get_model_entry


def model_for_data(name: str, data: DataSplit, **overrides) -> nn.Module:
    """``create_model(name, **model_options_for_data(name, data, **overrides))``."""
    return create_model(name, **model_options_for_data(name, data, **overrides))


def model_options_for_data(name: str, data: DataSplit, **overrides) -> dict:
    """The options of ``create_model(name, ...)`` with the sizes that ``data`` dictates
    filled in:
    ``num_classes``; ``in_features`` (MLPs: the flattened sample size); ``seq_len`` and
    ``in_channels`` (Transformers: (L,) or (L, C) samples); ``in_channels`` (conv nets:
    the first dim of (C, H, W) or (C, L) samples, 1 for (L,) sequences). Explicit
    ``overrides`` win."""
    accepted = set(accepted_options(name)) | set(get_model_entry(name).fixed)
    shape = data.sample_shape
    auto = {}
    if "num_classes" in accepted:
        auto["num_classes"] = data.num_classes
    if "in_features" in accepted:
        auto["in_features"] = math.prod(shape)
    if "seq_len" in accepted:
        if len(shape) not in (1, 2):
            raise UsageError(
                f"model {name!r} takes sequences (L,) or (L, C); data set "
                f"{data.name!r} has samples of shape {shape}"
            )
        auto["seq_len"] = shape[0]
        auto["in_channels"] = shape[1] if len(shape) == 2 else 1
    elif "in_channels" in accepted:
        auto["in_channels"] = shape[0] if len(shape) >= 2 else 1
    return {**auto, **overrides}


def resolved_model_options(name: str, options: dict) -> dict:
    """Every keyword argument the builder of ``name`` receives for ``create_model(name,
    **options)``: its signature's defaults, the registry's defaults, ``options`` and the
    variant's fixed ones (what a run folder records as its model)."""
    entry = get_model_entry(name)
    defaults = {
        p.name: p.default
        for p in inspect.signature(entry.builder).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **entry.defaults, **options, **entry.fixed}
