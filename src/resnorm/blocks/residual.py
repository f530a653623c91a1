"""The residual connection: ``y = skip_weight * shortcut(x) + drop_path(scale * branch(x))``.

:class:`ResidualAdd` is the one place where a branch meets its skip path; every block of
the package merges through it, and :class:`ResidualConfig` is the one object that says
how: the plain twin (``residual=False``), residual scaling (a fixed factor as in
Inception-ResNet, a learnable scalar at zero as in ReZero and SkipInit, per-channel
LayerScale as in CaiT), DeepNorm's skip weight and stochastic depth. Models pass one
config to their blocks, and blocks to their merges, as nanoGPT passes one config.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_choice, check_float, check_int, check_options
from ..errors import UsageError, UsageTypeError
from ..norms.base import CHANNEL_DIMS, channel_view

SCALES = ("none", "rezero", "skipinit", "layerscale")
LAYERSCALE_INIT = 1e-5  # CaiT's initial LayerScale for deep models


class DropPath(nn.Module):
    r"""Stochastic depth (Huang et al., 2016): in training, each sample's branch output is
    dropped with probability ``p`` and, with ``scale_by_keep``, the kept ones are divided by
    ``1 - p`` so the expectation is unchanged:

    .. math:: y_n = x_n \cdot m_n / (1 - p), \quad m_n \sim \mathrm{Bernoulli}(1 - p)

    Identity in eval mode and when ``p == 0``.
    """

    def __init__(self, p: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.p = check_float("p", p, low=0.0, high=1.0, high_inclusive=False)
        self.scale_by_keep = bool(scale_by_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if self.scale_by_keep:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    r"""Per-channel learnable scale (Touvron et al., 2021, CaiT): :math:`y = \mathrm{diag}(\lambda) x`,
    with :math:`\lambda` initialized at ``init`` (small, e.g. 1e-5)."""

    def __init__(self, channels: int, init: float = LAYERSCALE_INIT, channel_dim: int = 1) -> None:
        super().__init__()
        check_int("channels", channels, minimum=1)
        self.channel_dim = check_choice("channel_dim", channel_dim, CHANNEL_DIMS)
        self.init = check_float("init", init)
        self.gamma = nn.Parameter(torch.full((channels,), self.init))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * channel_view(self.gamma, x.dim(), self.channel_dim)


class ScalarGain(nn.Module):
    r"""A learnable scalar :math:`y = g x`, initialized at ``init`` (0 for ReZero / SkipInit,
    so every residual block starts as the identity)."""

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.init = check_float("init", init)
        self.gain = nn.Parameter(torch.tensor(self.init))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gain, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def make_branch_scale(
    scale: str | float | None,
    channels: int | None = None,
    *,
    channel_dim: int = 1,
    layerscale_init: float = LAYERSCALE_INIT,
) -> nn.Module | None:
    """The module that multiplies a residual branch, or ``None`` for no scaling.

    ``scale`` is ``None``/``"none"``; ``"rezero"`` or ``"skipinit"`` (a learnable scalar
    initialized at 0); ``"layerscale"`` (per-channel, initialized at ``layerscale_init``,
    needs ``channels``); or a number, a fixed factor (e.g. 0.1 to 0.3 in Inception-ResNet).
    """
    scale = _check_scale(scale)
    if scale is None or scale == "none":
        return None
    if isinstance(scale, float):
        return _FixedScale(scale)
    if scale in ("rezero", "skipinit"):
        return ScalarGain(0.0)
    if channels is None:
        raise UsageError("scale='layerscale' needs the branch's channel count")
    return LayerScale(channels, layerscale_init, channel_dim)


def _check_scale(scale) -> str | float | None:
    """Return ``scale`` (a number as a float) if :func:`make_branch_scale` takes it."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return check_float("scale", scale, finite=True)
    if scale is None or (isinstance(scale, str) and scale in SCALES):
        return scale
    accepted = ", ".join(repr(kind) for kind in SCALES)
    raise UsageError(
        f"scale={scale!r} is not supported; accepted values: None, {accepted} "
        f"or a number (a fixed factor)"
    )


class _FixedScale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"{self.factor}"


@dataclass(frozen=True)
class ResidualConfig:
    r"""How a residual branch meets its skip path, one object for a whole block or model:

    .. math:: y = w \cdot \mathrm{skip} + \mathrm{DropPath}(s \cdot \mathrm{branch})

    - ``residual``: ``False`` drops the skip path: the "plain" network of the ResNet paper,
      with the same parameters (its blocks leave out the projection shortcuts, which only
      exist to make the addition possible).
    - ``scale``: the branch's scale ``s``, see :func:`make_branch_scale`: ``None``,
      ``"rezero"``/``"skipinit"``, ``"layerscale"`` or a fixed number.
    - ``layerscale_init``: LayerScale's initial per-channel value.
    - ``skip_weight``: the skip path's weight ``w``: DeepNorm's ``alpha`` (which
      ``TransformerBlock(deepnorm_layers=N)`` sets), 1 otherwise.
    - ``drop_path``: the stochastic-depth probability of the branch. A model takes the
      rate of its last block and gives block ``i`` of ``L`` its own,
      ``dataclasses.replace(config, drop_path=rate * (i + 1) / L)``.

    Blocks and models take ``merge=ResidualConfig(...)`` and also its fields as keyword
    arguments (``resnet20(residual=False)``, ``create_model("mlp", scale="rezero")``);
    :meth:`resolve` combines the two.
    """

    residual: bool = True
    scale: str | float | None = None
    layerscale_init: float = LAYERSCALE_INIT
    skip_weight: float = 1.0
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.residual, bool):
            raise UsageTypeError(
                f"residual must be True or False, got {self.residual!r} "
                f"({type(self.residual).__name__})"
            )
        checked = {
            "scale": _check_scale(self.scale),
            "layerscale_init": check_float("layerscale_init", self.layerscale_init, finite=True),
            "skip_weight": check_float("skip_weight", self.skip_weight, finite=True),
            "drop_path": check_float(
                "drop_path", self.drop_path, low=0.0, high=1.0, high_inclusive=False
            ),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def resolve(
        cls, merge: ResidualConfig | None = None, /, *, owner: type | None = None, **fields
    ) -> ResidualConfig:
        """``merge`` (the defaults when ``None``) with ``fields`` on top: how a block or
        model that takes ``merge=`` and the fields as keyword arguments gets its one config.
        An unknown field raises :class:`~resnorm.errors.UsageTypeError` naming ``owner``
        (the class whose ``**merge_fields`` caught it) and the options it accepts."""
        if merge is None:
            merge = cls()
        elif not isinstance(merge, cls):
            raise UsageTypeError(
                f"merge must be a ResidualConfig, got {merge!r} ({type(merge).__name__})"
            )
        names = [field.name for field in dataclasses.fields(cls)]
        if owner is None:
            check_options("ResidualConfig", fields, names)
        elif any(name not in names for name in fields):
            check_options(f"{owner.__name__}()", fields, inspect.signature(owner).parameters)
        return dataclasses.replace(merge, **fields) if fields else merge


def takes_merge_fields(cls: type) -> type:
    """Class decorator for a block or model whose ``__init__`` takes ``merge:
    ResidualConfig | None = None, **merge_fields``: its public signature (what ``help``,
    ``inspect.signature`` and the model registry's ``accepted_options`` read) lists the
    fields of :class:`ResidualConfig` as keyword-only arguments with the config's defaults,
    which stay written once, in the dataclass."""
    init = cls.__init__
    signature = inspect.signature(init)
    kept = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    if len(kept) == len(signature.parameters):
        raise TypeError(f"@takes_merge_fields: {cls.__name__}.__init__ needs **merge_fields")
    fields = [
        inspect.Parameter(
            field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=field.type
        )
        for field in dataclasses.fields(ResidualConfig)
    ]
    init.__signature__ = signature.replace(parameters=kept + fields)
    return cls


@takes_merge_fields
class ResidualAdd(nn.Module):
    r"""Merges a residual branch into its skip path, as ``merge`` (a
    :class:`ResidualConfig`, or its fields as keyword arguments) says:

    .. math:: y = w \cdot \mathrm{skip} + \mathrm{DropPath}(s \cdot \mathrm{branch})

    With ``residual=False`` it returns the branch alone. ``channels`` (and ``channel_dim``)
    are the branch's, for ``scale="layerscale"``.
    """

    def __init__(
        self,
        merge: ResidualConfig | None = None,
        *,
        channels: int | None = None,
        channel_dim: int = 1,
        **merge_fields,
    ) -> None:
        super().__init__()
        merge = ResidualConfig.resolve(merge, owner=type(self), **merge_fields)
        self.residual = merge.residual
        self.skip_weight = merge.skip_weight
        self.scale = make_branch_scale(
            merge.scale, channels, channel_dim=channel_dim, layerscale_init=merge.layerscale_init
        )
        self.drop_path = DropPath(merge.drop_path) if merge.drop_path else None

    def branch_term(self, branch: torch.Tensor) -> torch.Tensor:
        """What is added to the skip path: the branch after its scale and drop-path. Fused
        blocks hand it to the next ``add_norm`` instead of adding it here."""
        if self.scale is not None:
            branch = self.scale(branch)
        if self.drop_path is not None:
            branch = self.drop_path(branch)
        return branch

    def forward(self, branch: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        branch = self.branch_term(branch)
        if not self.residual:
            return branch
        if self.skip_weight != 1.0:
            skip = skip * self.skip_weight
        if branch.shape != skip.shape:
            raise UsageError(
                f"residual branch output {tuple(branch.shape)} and skip path "
                f"{tuple(skip.shape)} differ; give the block a shortcut that "
                f"maps the input to the branch's shape"
            )
        return skip + branch

    def extra_repr(self) -> str:
        text = f"residual={self.residual}"
        return text + (f", skip_weight={self.skip_weight:g}" if self.skip_weight != 1.0 else "")


@takes_merge_fields
class Residual(nn.Module):
    r"""A residual connection around any module:

    .. math:: y = \mathrm{post}(w \cdot \mathrm{shortcut}(x) + \mathrm{DropPath}(s \cdot \mathrm{branch}(x)))

    ``shortcut`` is the identity when ``None``; ``post`` (e.g. a ReLU, or the norm of a
    post-norm Transformer) is applied after the addition when given. ``merge`` (or its
    fields as keyword arguments), ``channels`` and ``channel_dim`` are those of
    :class:`ResidualAdd`.
    """

    def __init__(
        self,
        branch: nn.Module,
        shortcut: nn.Module | None = None,
        *,
        post: nn.Module | None = None,
        channels: int | None = None,
        channel_dim: int = 1,
        merge: ResidualConfig | None = None,
        **merge_fields,
    ) -> None:
        super().__init__()
        for name, module in (("branch", branch), ("shortcut", shortcut), ("post", post)):
            if module is not None and not isinstance(module, nn.Module):
                raise UsageTypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
        self.branch = branch
        self.shortcut = shortcut
        self.merge = ResidualAdd(
            ResidualConfig.resolve(merge, owner=type(self), **merge_fields),
            channels=channels,
            channel_dim=channel_dim,
        )
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        y = self.merge(self.branch(x), skip)
        return y if self.post is None else self.post(y)
