"""The statistics the diagnostics report, as plain functions on tensors.

Signal-propagation statistics follow Brock, De & Smith (2021, "Characterizing signal
propagation to close the performance gap in unnormalized ResNets"): for a feature map with
channels at ``channel_dim``,

- average channel squared mean: mean over channels of (mean over N and positions)^2;
- average channel variance: mean over channels of the population variance over N and
  positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Up to this many values, statistics are summed on a float64 copy (a conversion, then
# plain float64 reductions and a BLAS dot product: 2-4x fewer microseconds than reducing
# float32 with dtype=float64, on CPU); above it, without a copy (no transient memory).
COPY_LIMIT = 1 << 22


def _as_float64(x: torch.Tensor) -> torch.Tensor:
    """A contiguous float64 copy of ``x`` (never ``x`` itself: callers square it in place)."""
    return x.detach().to(torch.float64, memory_format=torch.contiguous_format, copy=True)


def _scalar_moments(x: torch.Tensor) -> tuple[float, float]:
    """(mean, population variance) over all of ``x`` as Python floats, from its float64
    sum and sum of squares (one read of both). A NaN or Inf in ``x`` makes both
    non-finite."""
    n = x.numel()
    if n <= COPY_LIMIT:
        flat = _as_float64(x).view(-1)
        sums = torch.stack([flat.sum(), torch.dot(flat, flat)])
    else:
        norm = torch.linalg.vector_norm(x, dtype=torch.float64)
        sums = torch.stack([x.sum(dtype=torch.float64), norm.square()])
    return _finish_moments(sums, n)


def _finish_moments(sums: torch.Tensor, n: int) -> tuple[float, float]:
    """(mean, population variance) from ``[sum, sum of squares]`` of ``n`` values."""
    total, squares = sums.tolist()
    mean = total / n
    return mean, max(squares / n - mean * mean, 0.0)


def channel_moments(
    x: torch.Tensor, channel_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per channel of ``x`` (at ``channel_dim``; a 1-D ``x`` is one column): the float64
    sum and sum of squares, and how many values each has (what :func:`channel_stats` is
    finished from; their totals are those of all of ``x``)."""
    if x.dim() == 1:
        x = x.unsqueeze(1)
    dim = channel_dim % x.dim()
    channels = x.shape[dim]
    before, after = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1 :])
    if x.numel() > COPY_LIMIT:
        x = x.detach().movedim(dim, 0).reshape(channels, -1)
        norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
        return x.sum(dim=1, dtype=torch.float64), norms.square(), x.shape[1]
    values = _as_float64(x).view(before, channels, after)
    if after == 1:  # (N, C): one reduction over the rows
        values = values.view(before, channels)
        return values.sum(0), values.square_().sum(0), before
    # Summing the contiguous last axis first is 1.5x faster than both axes at once.
    sums = values.sum(2).sum(0)
    return sums, values.square_().sum(2).sum(0), before * after


def channel_stats_many(
    totals: list[torch.Tensor], squares: list[torch.Tensor], n: int
) -> list[tuple[float, float]]:
    """:func:`channel_stats` finished from the :func:`channel_moments` of outputs of one
    shape, all at once (a few dispatches for all of them, not a few for each)."""
    mean = torch.stack(totals) / n
    var = (torch.stack(squares) / n - mean.square()).clamp_min(0.0)
    sq_means, variances = torch.stack([mean.square().mean(1), var.mean(1)]).tolist()
    nan = float("nan")
    return [
        (a, b) if math.isfinite(a) and math.isfinite(b) else (nan, nan)
        for a, b in zip(sq_means, variances)
    ]


def channel_stats(x: torch.Tensor, channel_dim: int = 1) -> tuple[float, float]:
    """``(average channel squared mean, average channel variance)`` of ``x`` (NaN when
    ``x`` holds a NaN or Inf: they reach the per-channel statistics)."""
    total, squares, n = channel_moments(x, channel_dim)
    return channel_stats_many([total], [squares], n)[0]


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


def summarize_activation(
    x: torch.Tensor,
    *,
    rectified: bool,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ActivationSummary:
    """The :class:`ActivationSummary` of ``x``; ``moments``: its per-channel float64 sums
    and sums of squares (:func:`channel_moments`) when already taken, whose totals give
    the mean and variance without another pass over ``x``."""
    x = x.detach()
    nonfinite = 0
    if x.numel():
        if moments is not None:
            mean, var = _finish_moments(torch.stack([m.sum() for m in moments]), x.numel())
        else:
            mean, var = _scalar_moments(x)
        if not math.isfinite(mean) or not math.isfinite(var):
            # Only then are NaN and Inf counted and left out.
            finite = torch.isfinite(x)
            nonfinite = int(x.numel() - finite.sum().item())
            values = x[finite]
            mean, var = _scalar_moments(values) if values.numel() else (math.nan, math.nan)
    else:
        mean = var = float("nan")
    dead = None
    if rectified and x.dim() >= 2 and x.shape[0] > 1:
        # A unit is dead when its largest magnitude over the batch is 0 (one float
        # reduction: 3-4x cheaper than (x == 0).all(dim=0) on CPU).
        units = x[0].numel()
        dead = (units - int(x.abs().amax(dim=0).count_nonzero())) / units if units else math.nan
    return ActivationSummary(
        mean, math.sqrt(var) if var == var else var, dead, nonfinite, x.numel()
    )
