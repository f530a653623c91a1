"""DenseNet blocks (Huang et al., 2017): concatenation instead of addition."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_float, check_input, check_int
from ..norms import make_norm
from ..norms.factory import NormSpec
from .activations import make_activation
from .conv import CONV_DIMS, conv


class DenseLayer(nn.Module):
    """A DenseNet-BC layer: ``Conv3x3(Act(Norm(Conv1x1(Act(Norm(x))))))`` producing
    ``growth_rate`` new channels (the 1x1 "bottleneck" makes ``bn_size * growth_rate``;
    ``bn_size=0`` drops it, giving the original DenseNet layer). Module names follow
    torchvision (``norm1``, ``conv1``, ``norm2``, ``conv2``)."""

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int = 4,
        *,
        norm: NormSpec = "batch",
        dims: int = 2,
        activation: str = "relu",
        dropout: float = 0.0,
        norm_options: dict | None = None,
    ) -> None:
        super().__init__()
        check_int("growth_rate", growth_rate, minimum=1)
        check_int("bn_size", bn_size, minimum=0)
        options = dict(norm_options or {})
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.act = make_activation(activation)
        if bn_size:
            self.norm1 = make_norm(norm, in_channels, **options)
            self.conv1 = conv(dims, in_channels, bn_size * growth_rate, 1)
            mid = bn_size * growth_rate
        else:
            self.norm1 = self.conv1 = None
            mid = in_channels
        self.norm2 = make_norm(norm, mid, **options)
        self.conv2 = conv(dims, mid, growth_rate, 3)
        self.dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1 is not None:
            x = self.conv1(self.act(self.norm1(x)))
        x = self.conv2(self.act(self.norm2(x)))
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


class DenseBlock(nn.Module):
    r"""``num_layers`` dense layers, each fed the concatenation of the block input and of
    every earlier layer's output:

    .. math:: x_\ell = H_\ell([x_0, x_1, \ldots, x_{\ell-1}]), \qquad y = [x_0, \ldots, x_L]

    so the output has ``in_channels + num_layers * growth_rate`` channels.

    ``residual=False`` is the plain twin with the same parameters and shapes: each layer
    sees only its predecessor's output, and the concatenated slots of earlier features
    are zeros (the dense skip connections are cut, nothing else changes).
    """

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_size: int = 4,
        *,
        norm: NormSpec = "batch",
        residual: bool = True,
        dims: int = 2,
        activation: str = "relu",
        dropout: float = 0.0,
        norm_options: dict | None = None,
    ) -> None:
        super().__init__()
        check_int("num_layers", num_layers, minimum=1)
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.growth_rate = growth_rate
        self.dims = check_choice("dims", dims, CONV_DIMS)
        self.residual = bool(residual)
        self.layers = nn.ModuleDict(
            {
                f"denselayer{i + 1}": DenseLayer(
                    in_channels + i * growth_rate,
                    growth_rate,
                    bn_size,
                    norm=norm,
                    dims=dims,
                    activation=activation,
                    dropout=dropout,
                    norm_options=norm_options,
                )
                for i in range(num_layers)
            }
        )
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(
            "input", x, ndims=(self.dims + 2,), channels=self.in_channels, what="DenseBlock"
        )
        if self.residual:
            features = [x]
            for layer in self.layers.values():
                features.append(layer(torch.cat(features, 1)))
            return torch.cat(features, 1)
        latest = x
        for layer in self.layers.values():
            latest = layer(_zeros_before(latest, layer.in_channels))
        return _zeros_before(latest, self.out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, residual={self.residual}"


def _zeros_before(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Put ``x`` in the last channels of a tensor of ``channels`` channels, zeros before it."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (channels - x.shape[1], 0))


class Transition(nn.Module):
    """DenseNet transition: ``AvgPool2(Conv1x1(Act(Norm(x))))``, compressing the channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: NormSpec = "batch",
        dims: int = 2,
        activation: str = "relu",
        norm_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.norm = make_norm(norm, in_channels, **(norm_options or {}))
        self.act = make_activation(activation)
        self.conv = conv(dims, in_channels, out_channels, 1)
        self.pool = (nn.AvgPool1d if dims == 1 else nn.AvgPool2d)(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.act(self.norm(x))))
