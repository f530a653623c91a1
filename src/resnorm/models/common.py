"""Pieces the model families share: stages of blocks, the CIFAR-sized conv nets' input and
head, initialization, input checks."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .._checks import check_input
from ..blocks import ResidualConfig


def per_block_merges(num_blocks: int, merge: ResidualConfig) -> list[ResidualConfig]:
    """One merge config per block of a stack of ``num_blocks``: ``merge`` with stochastic
    depth's linear rule (Huang et al., 2016), block ``i`` of ``L`` dropping its branch with
    probability ``merge.drop_path * (i + 1) / L``."""
    return [
        dataclasses.replace(merge, drop_path=merge.drop_path * (i + 1) / num_blocks)
        for i in range(num_blocks)
    ]


def build_stages(
    block_cls,
    in_channels: int,
    planes: tuple[int, ...],
    counts: tuple[int, ...],
    strides: tuple[int, ...],
    merge: ResidualConfig,
    **block_options,
) -> tuple[list[nn.Sequential], int]:
    """One ``nn.Sequential`` of blocks per stage, the first block of each with the stage's
    stride, every block with its own stochastic-depth rate; returns them and the output
    channels."""
    merges = iter(per_block_merges(sum(counts), merge))
    stages = []
    for width, count, stride in zip(planes, counts, strides):
        blocks = []
        for i in range(count):
            # Basic blocks take their output width, bottlenecks their "planes" (x4 out).
            blocks.append(
                block_cls(
                    in_channels, width, stride if i == 0 else 1, merge=next(merges), **block_options
                )
            )
            in_channels = blocks[-1].out_channels
        stages.append(nn.Sequential(*blocks))
    return stages, in_channels


def kaiming_init_convs(model: nn.Module) -> None:
    """He-normal (fan-out, ReLU) initialization of every convolution, as torchvision does."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def check_image_input(model: str, x: torch.Tensor, in_channels: int, dims: int) -> torch.Tensor:
    """Check a conv model's input; a 1-D model with one input channel also takes (N, L)."""
    if dims == 1 and in_channels == 1 and isinstance(x, torch.Tensor) and x.dim() == 2:
        x = x.unsqueeze(1)
    layout = "(N, C, L)" if dims == 1 else "(N, C, H, W)"
    check_input(f"input {layout}", x, ndims=(dims + 2,), channels=in_channels, what=model)
    return x


class CifarSizedNet(nn.Module):
    """What the CIFAR-sized conv nets (CIFAR ResNets, DenseNet) share: ``in_channels`` and
    ``dims`` (2: (C, 32, 32) images; 1: (C, 40) sequences such as MNIST-1D), the input
    check, and the classifier head ``global average pool -> fc``."""

    in_channels: int
    dims: int

    def _add_head(self, channels: int, num_classes: int) -> None:
        """The pool and the classifier, then He-normal convolutions (the last step of
        ``__init__``)."""
        self.pool = (nn.AdaptiveAvgPool1d if self.dims == 1 else nn.AdaptiveAvgPool2d)(1)
        self.fc = nn.Linear(channels, num_classes)
        kaiming_init_convs(self)

    @property
    def example_input_shape(self) -> tuple[int, ...]:
        """One sample: a CIFAR image (C, 32, 32), or an MNIST-1D sequence (C, 40) when 1-D."""
        return (self.in_channels, 40) if self.dims == 1 else (self.in_channels, 32, 32)

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        return check_image_input(type(self).__name__, x, self.in_channels, self.dims)

    def _classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(features).flatten(1))
