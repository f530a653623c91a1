"""``make_norm``: one entry point that builds any normalization layer from a kind name."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .._checks import check_choice, check_int, check_options
from ..errors import UsageError, UsageTypeError
from .base import CHANNEL_DIMS
from .batch import BatchNorm
from .conventions import CONVENTIONS
from .dyt import DyT
from .fused import FusedAddLayerNorm, FusedAddRMSNorm
from .group import GroupNorm, InstanceNorm
from .layer import LayerNorm, RMSNorm


@dataclass(frozen=True)
class NormKind:
    """One row of :data:`NORM_TABLE`: how ``make_norm(name, C, ...)`` builds the kind.

    ``cls`` is built as ``cls(*leading(C, options), C, channel_dim=..., convention=...,
    **defaults, **options)``; ``fused_cls`` is its residual-add twin (``fused=True``), if it
    has one; ``convention=False`` for a kind without eps/momentum conventions."""

    name: str
    cls: type[nn.Module]
    fused_cls: type[nn.Module] | None = None
    defaults: dict = field(default_factory=dict)
    leading: Callable[[int, dict], tuple] | None = None
    convention: bool = True


def _group_count(num_features: int, options: dict) -> tuple:
    return (options.pop("num_groups", default_num_groups(num_features)),)


# The one table of normalization kinds: make_norm, NORM_KINDS, FUSED_KINDS, the fusability
# rule of the blocks and the norm classes diagnose recognizes all derive from it. Adding a
# kind is one row here plus its class.
NORM_TABLE: dict[str, NormKind] = {
    k.name: k
    for k in (
        NormKind("batch", BatchNorm),
        NormKind("layer", LayerNorm, fused_cls=FusedAddLayerNorm),
        NormKind("rms", RMSNorm, fused_cls=FusedAddRMSNorm),
        NormKind("group", GroupNorm, leading=_group_count),
        # affine by default (unlike torch.nn): inside a block the norm's scale and shift are wanted
        NormKind("instance", InstanceNorm, defaults={"affine": True}),
        NormKind("dyt", DyT, convention=False),  # no eps, no convention
    )
}
NORM_KINDS = (*NORM_TABLE, "none")
# The kinds with a fused residual-add twin (make_norm(..., fused=True)).
FUSED_KINDS = tuple(name for name, kind in NORM_TABLE.items() if kind.fused_cls is not None)
# Every class make_norm can return for a kind (fused twins included).
NORM_CLASSES = tuple(
    cls for kind in NORM_TABLE.values() for cls in (kind.cls, kind.fused_cls) if cls is not None
)

NormSpec = str | None | Callable[..., nn.Module]


def default_num_groups(num_channels: int) -> int:
    """32 groups (Wu & He's default) when they divide the channels, else gcd(32, C); halved
    when that would leave one channel per group (C = 16 or 32, ...), since a group of one
    feature normalizes (N, C) inputs to a constant. Wu & He report 2 channels per group
    within 0.7 points of their best."""
    groups = math.gcd(32, num_channels)
    return groups // 2 if groups == num_channels and num_channels > 1 else groups


def _build(cls, options: dict, *args) -> nn.Module:
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self",)]
    check_options(cls.__name__, sorted(options), accepted[len(args) :])
    return cls(*args, **options)


def make_norm(
    kind: NormSpec,
    num_features: int,
    *,
    channel_dim: int = 1,
    convention: str = "torch",
    fused: bool = False,
    **options,
) -> nn.Module:
    """Build a normalization layer for inputs with ``num_features`` channels.

    Args:
        kind: ``"batch"``, ``"layer"``, ``"rms"``, ``"group"``, ``"instance"``, ``"dyt"``,
            ``"none"`` (or ``None``: an ``nn.Identity``), or a callable called as
            ``kind(num_features, **options)`` for a norm of your own.
        num_features: the number of channels C.
        channel_dim: where the channels are: 1 for (N, C), (N, C, L), (N, C, H, W) (the
            PyTorch layout), -1 for channels-last inputs such as tokens (N, T, C). Every
            kind normalizes the same thing whatever the layout: ``"layer"`` and ``"rms"``
            normalize over the C channels of each sample at each position (as in
            Transformers and ConvNeXt), ``"batch"`` over the batch and positions, per channel.
        convention: ``"torch"`` (default) or ``"keras"``: the epsilon (and for batch norm
            the momentum meaning and running variance) of that library's layers. For
            ``"layer"`` only, ``"eps_outside"`` or ``"annotated_transformer"`` (eps outside
            the square root; see ``docs/conventions.md``); other kinds reject them
            (``ValueError``), ``"dyt"`` (no eps) ignores the convention.
        **options: passed to the layer (``eps``, ``momentum``, ``affine``, ``num_groups``,
            ``alpha_init``, ...). ``"group"`` defaults to ``default_num_groups(C)`` groups;
            ``"instance"`` defaults to ``affine=True`` (unlike ``torch.nn``), since inside
            a block the norm's scale and shift are wanted.
        fused: for ``"layer"`` and ``"rms"``, the :class:`~resnorm.norms.FusedAddLayerNorm`
            / :class:`~resnorm.norms.FusedAddRMSNorm` twin, whose ``forward`` also takes the
            residual stream (same parameters and results).
    """
    check_int("num_features", num_features, minimum=1)
    check_choice("channel_dim", channel_dim, CHANNEL_DIMS)
    check_choice("convention", convention, CONVENTIONS)
    if callable(kind) and not isinstance(kind, str):
        return kind(num_features, **options)
    if kind is None:
        kind = "none"
    check_choice("norm", kind, NORM_KINDS)
    if fused and kind not in FUSED_KINDS:
        raise UsageError(
            f"fused=True supports norm kinds {', '.join(map(repr, FUSED_KINDS))}, got {kind!r}"
        )
    if kind == "none":
        if options:
            raise UsageTypeError(f"norm='none' takes no options, got {', '.join(sorted(options))}")
        return nn.Identity()
    row = NORM_TABLE[kind]
    options = dict(options)
    leading = row.leading(num_features, options) if row.leading else ()
    layout = {"channel_dim": channel_dim, **({"convention": convention} if row.convention else {})}
    return _build(
        row.fused_cls if fused else row.cls,
        {**row.defaults, **layout, **options},
        *leading,
        num_features,
    )
