"""The statistics the diagnostics report, as plain functions on tensors.

Signal-propagation statistics follow Brock, De & Smith (2021, "Characterizing signal
propagation to close the performance gap in unnormalized ResNets"): for a feature map with
channels at ``channel_dim``,

- average channel squared mean: mean over channels of (mean over N and positions)^2;
- average channel variance: mean over channels of the population variance over N and
  positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _channels_first_2d(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(C, everything else) view of ``x`` in float64 (the sums stay exact enough)."""
    if x.dim() == 1:
        x = x.unsqueeze(1)
    x = x.detach().movedim(channel_dim, 0)
    return x.reshape(x.shape[0], -1).double()


def channel_stats(x: torch.Tensor, channel_dim: int = 1) -> tuple[float, float]:
    """``(average channel squared mean, average channel variance)`` of ``x``."""
    flat = _channels_first_2d(x, channel_dim)
    finite = torch.isfinite(flat).all()
    if not finite:
        return float("nan"), float("nan")
    var, mean = torch.var_mean(flat, dim=1, correction=0)
    return mean.square().mean().item(), var.mean().item()


@dataclass(frozen=True)
class ActivationSummary:
    """Mean, standard deviation, fraction of dead units and count of non-finite values of
    one module output. A unit (one feature at one position) is dead when it is zero for
    every sample of the batch; ``dead_fraction`` is ``None`` for outputs that are not
    rectified (only ReLU-like modules report it)."""

    mean: float
    std: float
    dead_fraction: float | None
    nonfinite: int
    numel: int


def summarize_activation(x: torch.Tensor, *, rectified: bool) -> ActivationSummary:
    x = x.detach()
    finite_mask = torch.isfinite(x)
    nonfinite = int(x.numel() - finite_mask.sum().item())
    values = x[finite_mask].double() if nonfinite else x.double()
    mean = values.mean().item() if values.numel() else float("nan")
    std = values.std(correction=0).item() if values.numel() else float("nan")
    dead = None
    if rectified and x.dim() >= 2 and x.shape[0] > 1:
        dead = (x == 0).all(dim=0).double().mean().item()
    return ActivationSummary(mean, std, dead, nonfinite, x.numel())
