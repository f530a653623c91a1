"""Dynamic tanh (Zhu, Chen, He, LeCun & Liu, 2025, "Transformers without Normalization")."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice, check_float, check_input, check_int
from .base import CHANNEL_DIMS, channel_view


class DyT(nn.Module):
    r"""Dynamic tanh, an element-wise replacement for a normalization layer:

    .. math::
        y = \gamma \tanh(\alpha x) + \beta

    with a learnable scalar ``alpha`` (initialized at ``alpha_init``, 0.5 in the paper) and
    per-channel ``gamma`` (ones) and ``beta`` (zeros). It computes no statistics, so it is
    independent of the batch and of the other features. ``channel_dim`` says where the
    channels are (-1 for tokens (N, T, C), 1 for feature maps (N, C, H, W)).
    """

    def __init__(
        self,
        num_features: int,
        alpha_init: float = 0.5,
        *,
        channel_dim: int = -1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_features = check_int("num_features", num_features, minimum=1)
        self.alpha_init = check_float("alpha_init", alpha_init)
        self.channel_dim = check_choice("channel_dim", channel_dim, CHANNEL_DIMS)
        self.alpha = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(
            "input",
            x,
            ndims=range(2, 6),
            channels=self.num_features,
            channel_dim=self.channel_dim,
            what="DyT",
        )
        weight = channel_view(self.weight, x.dim(), self.channel_dim)
        bias = channel_view(self.bias, x.dim(), self.channel_dim)
        return torch.tanh(self.alpha * x) * weight + bias

    def extra_repr(self) -> str:
        text = f"{self.num_features}, alpha_init={self.alpha_init}"
        return text + (f", channel_dim={self.channel_dim}" if self.channel_dim != -1 else "")
