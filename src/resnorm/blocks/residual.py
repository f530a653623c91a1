"""The residual connection itself: ``y = alpha * shortcut(x) + drop_path(scale * branch(x))``.

:class:`ResidualAdd` is the one place where a branch meets its skip path; every block of
the package merges through it, so every block gets the same options: the plain twin
(``residual=False``), residual scaling (a fixed factor as in Inception-ResNet, a learnable
scalar at zero as in ReZero and SkipInit, per-channel LayerScale as in CaiT), DeepNorm's
skip weight ``alpha`` and stochastic depth.
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice, check_float, check_int
from ..errors import UsageError, UsageTypeError
from ..norms.base import CHANNEL_DIMS, channel_view

SCALES = ("none", "rezero", "skipinit", "layerscale")


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

    def __init__(self, channels: int, init: float = 1e-5, channel_dim: int = 1) -> None:
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


def make_branch_scale(scale: str | float | None, channels: int | None = None, *,
                      channel_dim: int = 1, layerscale_init: float = 1e-5) -> nn.Module | None:
    """The module that multiplies a residual branch, or ``None`` for no scaling.

    ``scale`` is ``None``/``"none"``; ``"rezero"`` or ``"skipinit"`` (a learnable scalar
    initialized at 0); ``"layerscale"`` (per-channel, initialized at ``layerscale_init``,
    needs ``channels``); or a number, a fixed factor (e.g. 0.1 to 0.3 in Inception-ResNet).
    """
    if scale is None or scale == "none":
        return None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return _FixedScale(float(scale))
    check_choice("scale", scale, SCALES)
    if scale in ("rezero", "skipinit"):
        return ScalarGain(0.0)
    if channels is None:
        raise UsageError("scale='layerscale' needs the branch's channel count")
    return LayerScale(channels, layerscale_init, channel_dim)


class _FixedScale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"{self.factor}"


class ResidualAdd(nn.Module):
    r"""Merges a residual branch into its skip path:

    .. math:: y = \alpha \cdot \mathrm{skip} + \mathrm{DropPath}(s \cdot \mathrm{branch})

    With ``residual=False`` it returns the branch alone: the "plain" network of the ResNet
    paper, with the same parameters. ``alpha`` is DeepNorm's skip weight (1 otherwise);
    ``scale`` is described in :func:`make_branch_scale`; ``drop_path`` is the stochastic
    depth probability.
    """

    def __init__(self, *, residual: bool = True, scale: str | float | None = None,
                 channels: int | None = None, channel_dim: int = 1, layerscale_init: float = 1e-5,
                 alpha: float = 1.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.residual = bool(residual)
        self.alpha = check_float("alpha", alpha)
        self.scale = make_branch_scale(scale, channels, channel_dim=channel_dim,
                                       layerscale_init=layerscale_init)
        self.drop_path = DropPath(drop_path) if drop_path else None

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
        if self.alpha != 1.0:
            skip = skip * self.alpha
        if branch.shape != skip.shape:
            raise UsageError(f"residual branch output {tuple(branch.shape)} and skip path "
                             f"{tuple(skip.shape)} differ; give the block a shortcut that "
                             f"maps the input to the branch's shape")
        return skip + branch

    def extra_repr(self) -> str:
        text = f"residual={self.residual}"
        return text + (f", alpha={self.alpha:g}" if self.alpha != 1.0 else "")


class Residual(nn.Module):
    r"""A residual connection around any module:

    .. math:: y = \mathrm{post}(\alpha \cdot \mathrm{shortcut}(x) + \mathrm{DropPath}(s \cdot \mathrm{branch}(x)))

    ``shortcut`` is the identity when ``None``; ``post`` (e.g. a ReLU, or the norm of a
    post-norm Transformer) is applied after the addition when given. The other keyword
    arguments are those of :class:`ResidualAdd`.
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None, *,
                 post: nn.Module | None = None, residual: bool = True,
                 scale: str | float | None = None, channels: int | None = None,
                 channel_dim: int = 1, layerscale_init: float = 1e-5, alpha: float = 1.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        for name, module in (("branch", branch), ("shortcut", shortcut), ("post", post)):
            if module is not None and not isinstance(module, nn.Module):
                raise UsageTypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
        self.branch = branch
        self.shortcut = shortcut
        self.merge = ResidualAdd(residual=residual, scale=scale, channels=channels,
                                 channel_dim=channel_dim, layerscale_init=layerscale_init,
                                 alpha=alpha, drop_path=drop_path)
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        y = self.merge(self.branch(x), skip)
        return y if self.post is None else self.post(y)
