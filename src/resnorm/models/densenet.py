"""DenseNet for CIFAR (Huang et al., 2017, "Densely Connected Convolutional Networks")."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_float, check_int
from ..blocks import DenseBlock, Transition, make_activation
from ..blocks.conv import conv
from ..errors import UsageError
from ..norms import make_norm
from .common import CifarSizedNet
from .registry import register_model


def _layers_per_block(depth: int, growth_rate: int, compression: float, bottleneck: bool) -> int:
    """The layers of each of the three dense blocks of a DenseNet of ``depth``, after
    checking the arguments (a depth not of the form 6n+4, or 3n+4 without bottleneck, is
    refused)."""
    check_int("depth", depth, minimum=1)
    check_int("growth_rate", growth_rate, minimum=1)
    check_float("compression", compression, low=0.0, high=1.0, low_inclusive=False)
    convs_per_layer = 2 if bottleneck else 1
    per_block, rest = divmod(depth - 4, 3 * convs_per_layer)
    if rest or per_block < 1:
        form = "6n+4 (40, 100, 190, 250)" if bottleneck else "3n+4 (40, 100)"
        raise UsageError(
            f"depth={depth} is not of the form {form} needed with bottleneck={bottleneck}"
        )
    return per_block


class CifarDenseNet(CifarSizedNet):
    """``conv3x3 -> 3 x (DenseBlock -> Transition) -> Norm -> Act -> pool -> fc``, with no
    transition after the last block.

    DenseNet-BC (``bottleneck=True``, ``compression=0.5``): each block has (depth - 4) / 6
    bottleneck layers and the stem makes 2k channels; plain DenseNet: (depth - 4) / 3
    layers and 16 stem channels. ``residual=False`` cuts the dense connections (see
    :class:`~resnorm.blocks.DenseBlock`), keeping every parameter.
    """

    # What depth= counts (models.registry.depth_unit): convolutions and the classifier.
    depth_unit = "weight layers"

    def __init__(
        self,
        depth: int = 100,
        growth_rate: int = 12,
        num_classes: int = 10,
        in_channels: int = 3,
        *,
        bottleneck: bool = True,
        compression: float = 0.5,
        norm="batch",
        residual: bool = True,
        dims: int = 2,
        activation: str = "relu",
        dropout: float = 0.0,
        norm_options: dict | None = None,
    ) -> None:
        super().__init__()
        per_block = _layers_per_block(depth, growth_rate, compression, bottleneck)
        self.in_channels, self.dims = in_channels, dims
        options = dict(norm_options or {})
        channels = 2 * growth_rate if bottleneck else 16
        self.conv1 = conv(dims, in_channels, channels, 3)
        stages = []
        for i in range(3):
            block = DenseBlock(
                per_block,
                channels,
                growth_rate,
                4 if bottleneck else 0,
                norm=norm,
                residual=residual,
                dims=dims,
                activation=activation,
                dropout=dropout,
                norm_options=options,
            )
            stages.append(block)
            channels = block.out_channels
            if i < 2:
                out = int(channels * compression)
                stages.append(
                    Transition(
                        channels,
                        out,
                        norm=norm,
                        dims=dims,
                        activation=activation,
                        norm_options=options,
                    )
                )
                channels = out
        self.features = nn.Sequential(*stages)
        self.final_norm = make_norm(norm, channels, **options)
        self.act = make_activation(activation)
        self._add_head(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(self._checked(x)))
        return self._classify(self.act(self.final_norm(x)))


@register_model
def densenet_cifar(**kwargs) -> CifarDenseNet:
    """CIFAR DenseNet of any depth (BC by default)

    "Densely Connected Convolutional Networks" (Huang et al. 2017), section 3. At the default
    DenseNet-BC, L=100, k=12: 769,162 parameters.
    """
    return CifarDenseNet(**kwargs)


@register_model(fixed={"depth": 100, "growth_rate": 12, "bottleneck": True})
def densenet_bc100(**kwargs) -> CifarDenseNet:
    """DenseNet-BC, L=100, k=12 (Huang et al. 2017)

    769,162 parameters. "Densely Connected Convolutional Networks" (Huang et al. 2017), Table 2
    (0.8M).
    """
    return CifarDenseNet(depth=100, growth_rate=12, bottleneck=True, **kwargs)
