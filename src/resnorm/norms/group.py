"""Group normalization (Wu & He, 2018) and instance normalization (Ulyanov et al., 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_float, check_input, check_int
from ..errors import UsageError
from .base import CHANNEL_DIMS, RunningStatsNorm, apply_channels_at
from .conventions import resolve_eps


class GroupNorm(nn.Module):
    r"""Group normalization: the channels are split into ``num_groups`` groups and each
    sample is normalized over the channels of a group and all spatial positions:

    .. math::
        y = \frac{x - \mathrm{E}_{g}[x]}{\sqrt{\mathrm{Var}_{g}[x] + \epsilon}} \gamma + \beta

    with per-channel ``gamma`` and ``beta``. One group is layer norm over (C, H, W); one
    group per channel is instance norm. Independent of the batch size. Same parameters and
    outputs as ``torch.nn.GroupNorm``; ``channel_dim=-1`` takes channels-last inputs.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float | None = None,
        affine: bool = True,
        *,
        convention: str = "torch",
        channel_dim: int = 1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_groups = check_int("num_groups", num_groups, minimum=1)
        self.num_channels = check_int("num_channels", num_channels, minimum=1)
        if num_channels % num_groups:
            raise UsageError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        self.eps = resolve_eps("group", eps, convention)
        self.affine = bool(affine)
        self.channel_dim = check_choice("channel_dim", channel_dim, CHANNEL_DIMS)
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(
            "input",
            x,
            ndims=range(2, 6),
            channels=self.num_channels,
            channel_dim=self.channel_dim,
            what="GroupNorm",
        )
        # torch.group_norm, not F.group_norm: the latter first runs batch norm's "more than 1
        # value per channel" check, which rejects a batch of one sample whose groups hold one
        # value each (e.g. (1, C) with C groups), although the result (beta) does not depend
        # on the batch. The arithmetic is the same.
        return apply_channels_at(
            x,
            self.channel_dim,
            1,
            lambda t: torch.group_norm(
                t, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled
            ),
        )

    def extra_repr(self) -> str:
        text = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
        return text + (f", channel_dim={self.channel_dim}" if self.channel_dim != 1 else "")


class InstanceNorm(RunningStatsNorm):
    r"""Instance normalization: each channel of each sample is normalized over its spatial
    positions:

    .. math::
        y_{n,c} = \frac{x_{n,c} - \mathrm{E}_{hw}[x_{n,c}]}
                       {\sqrt{\mathrm{Var}_{hw}[x_{n,c}] + \epsilon}} \gamma_c + \beta_c

    Needs at least one spatial dim: (N, C, L), (N, C, H, W) or (N, C, D, H, W). The
    defaults (``affine=False``, ``track_running_stats=False``) and the parameter and buffer
    names are those of ``torch.nn.InstanceNorm{1,2,3}d``.
    """

    _min_dims = 3

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        *,
        convention: str = "torch",
        channel_dim: int = 1,
        device=None,
        dtype=None,
    ):
        if momentum is not None:
            momentum = check_float("momentum", momentum, low=0.0, high=1.0)
        super().__init__(
            num_features,
            resolve_eps("instance", eps, convention),
            momentum,
            affine,
            track_running_stats,
            channel_dim,
            device,
            dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        use_input_stats = self.training or not self.track_running_stats
        return apply_channels_at(
            x,
            self.channel_dim,
            1,
            lambda t: F.instance_norm(
                t,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                use_input_stats,
                self.momentum if self.momentum is not None else 0.0,
                self.eps,
            ),
        )
