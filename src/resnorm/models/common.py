"""Pieces the model families share: stages of blocks, initialization, input checks."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_float, check_input


def drop_path_rates(num_blocks: int, max_rate: float) -> list[float]:
    """Stochastic depth's linear rule (Huang et al., 2016): block ``i`` of ``L`` drops its
    branch with probability ``max_rate * (i + 1) / L``."""
    check_float("drop_path", max_rate, low=0.0, high=1.0, high_inclusive=False)
    return [max_rate * (i + 1) / num_blocks for i in range(num_blocks)]


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
