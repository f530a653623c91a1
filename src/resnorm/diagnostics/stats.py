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
import weakref
from dataclasses import dataclass, replace

import torch

# Up to this many values, statistics are summed on a float64 copy (a conversion, then
# plain float64 reductions and a BLAS dot product: 2-4x fewer microseconds than reducing
# float32 with dtype=float64, on CPU); above it, without a copy (no transient memory).
COPY_LIMIT = 1 << 22
# A variance under this fraction of its tensor's mean square is rounding, not a measurement:
# float32 values that differ by a few units in the last place (relative 6e-8) have a
# variance of ~1e-14 of their mean square, and the float64 difference E[x^2] - E[x]^2
# cancels to about 1e-15 of it.
VARIANCE_RESOLUTION = 1e-13


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
        x = x if x.is_floating_point() else x.to(torch.float64)  # integers: rare, copied
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


def channel_stats(x: torch.Tensor, channel_dim: int = 1) -> tuple[float, float]:
    """``(average channel squared mean, average channel variance)`` of ``x`` (NaN when
    ``x`` holds a NaN or Inf: they reach the per-channel statistics)."""
    total, squares, n = channel_moments(x, channel_dim)
    mean = total / n
    var = (squares / n - mean.square()).clamp_min(0.0)
    sq_mean, variance = torch.stack([mean.square().mean(), var.mean()]).tolist()
    if math.isfinite(sq_mean) and math.isfinite(variance):
        return sq_mean, variance
    return math.nan, math.nan


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
    """The :class:`ActivationSummary` of ``x`` (one tensor at a time; the recorder takes
    many together with :class:`MomentBatch`)."""
    x = x.detach()
    nonfinite = 0
    if x.numel():
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


def _channel_view(shape: tuple, channel_dim: int) -> tuple[int, int, int]:
    """(values before, channels, values after) of ``shape`` around ``channel_dim``."""
    dim = channel_dim % len(shape)
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])


class Measured:
    """What a :class:`MomentBatch` measures of one tensor: its summary and its channel
    statistics at each of ``channel_dims``, there (``summary``, ``channel[dim]``) once the
    batch has settled."""

    __slots__ = ("ref", "version", "shape", "sums", "squares", "summary")
    __slots__ += ("wants_summary", "rectified", "channel_dims", "channel")

    def __init__(self, x: torch.Tensor, version: int | None) -> None:
        self.ref, self.version, self.shape = weakref.ref(x), version, tuple(x.shape)
        self.sums = None  # the float64 sum of every unit over the batch
        self.squares = math.nan  # the float64 sum of squares of all values
        self.summary: ActivationSummary | None = None
        self.wants_summary = self.rectified = False
        self.channel_dims: set[int] = set()
        self.channel: dict[int, tuple[float, float]] = {}

    def summary_as(self, rectified: bool) -> ActivationSummary:
        """The summary as a module that is (not) a rectifier reports it: the same tensor
        may be a rectifier's output and another module's."""
        if rectified or self.summary.dead_fraction is None:
            return self.summary
        return replace(self.summary, dead_fraction=None)


class MomentBatch:
    """The statistics of many module outputs, as :func:`summarize_activation` and
    :func:`channel_stats` give them one by one, for a few operations per output and one
    read back per output shape.

    :meth:`add` takes, at once (before any later in-place operation can change the
    tensor), in float64: the sum over the batch axis for every unit (one feature at one
    position) and the sum of squares of all values (with ``kernel``, a
    :class:`~resnorm.diagnostics.norm_stats.CompiledNorms`: in one pass of the compiled
    kernel for contiguous float32 CPU tensors; else from a float64 copy). Everything
    asked follows from these: the mean and variance; the fraction of dead units of a
    rectifier's output (never negative, so a unit is zero for every sample exactly when its
    sum is zero); and the channel statistics at any axis but the batch axis (a channel's
    sum is the sum of its units'; the average channel variance is the mean square less the
    average squared channel mean). A tensor added again unchanged (the same object, not
    modified since) is measured once. :meth:`settle` finishes the
    statistics of all outputs of one shape together, with one read back. An output with a
    NaN or Inf (a sum of squares that is not finite) is measured at once as
    :func:`summarize_activation` does (counted, left out)."""

    def __init__(self, kernel=None) -> None:
        # A CompiledNorms (resnorm.diagnostics.norm_stats): its unit_moments takes the
        # moments of contiguous float32 CPU outputs in one call; else PyTorch ops.
        self._kernel = kernel
        self._pending: list[Measured] = []
        self._seen: dict[int, Measured] = {}

    def add(
        self,
        x: torch.Tensor,
        *,
        summary: bool = False,
        rectified: bool = False,
        channel_dims: tuple[int, ...] = (),
    ) -> Measured:
        """Measure ``x`` for its summary (``rectified``: the output of a rectifier, with
        its fraction of dead units) and its channel statistics at ``channel_dims``."""
        # Inference tensors (made under torch.inference_mode) keep no version: never reused.
        version = None if x.is_inference() else x._version
        entry = self._seen.get(id(x))
        if entry is None or entry.ref() is not x or version is None or entry.version != version:
            entry = self._seen[id(x)] = Measured(x, version)
            self._moments(entry, x.detach())
        if summary and entry.summary is None or rectified and not entry.rectified:
            entry.wants_summary = True
            entry.rectified |= rectified
            if entry.sums is None:  # measured at once (see _moments)
                entry.summary = summarize_activation(x, rectified=entry.rectified)
        for dim in channel_dims:
            if entry.sums is None or dim % max(x.dim(), 2) == 0:
                entry.channel[dim] = channel_stats(x, dim)  # the batch axis: by itself
            else:
                entry.channel_dims.add(dim)
        return entry

    def _moments(self, entry: Measured, x: torch.Tensor) -> None:
        """The unit sums and the sum of squares; left unset (the statistics are then taken
        from ``x`` at once) for an empty tensor, one not of floats, and one with a NaN or
        Inf (its sum of squares is not finite: squares of floats never overflow float64).
        The float64 copy is dropped at once, so the next output's reuses its memory."""
        if not x.numel() or not x.is_floating_point():
            return
        rows = x.reshape(-1, 1) if x.dim() <= 1 else x
        if self._kernel is not None and self._kernel.accepts(x):
            sums, squares = self._kernel.unit_moments(x)  # one pass, no copy
        elif x.numel() <= COPY_LIMIT:
            values = rows.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
            flat = values.view(-1)
            squares, sums = torch.dot(flat, flat).item(), values.sum(0)
        else:  # no float64 copy of a large tensor
            squares = torch.linalg.vector_norm(rows, dtype=torch.float64).item() ** 2
            sums = rows.sum(0, dtype=torch.float64)
        if math.isfinite(squares):
            entry.sums, entry.squares = sums, squares
            self._pending.append(entry)

    def settle(self) -> None:
        """Finish every statistic asked so far: one group of operations and one read back
        per output shape."""
        pending, self._pending = self._pending, []
        self._seen.clear()
        groups: dict[tuple, list[Measured]] = {}
        for entry in pending:
            groups.setdefault((entry.shape, entry.sums.device), []).append(entry)
        for (shape, _), entries in groups.items():
            _settle_group(shape, entries)
            for entry in entries:
                entry.sums = None


def _settle_group(shape: tuple, entries: list[Measured]) -> None:
    """The statistics of ``entries``, outputs of one ``shape``, from their moments: a few
    operations on all of their unit sums at once (what an entry did not ask for is
    computed too, and not read: cheaper than picking rows out)."""
    k = len(entries)
    rows = shape if len(shape) >= 2 else (math.prod(shape), 1)  # a 1-D output: one column
    sums = torch.stack([e.sums for e in entries]).reshape(k, -1)  # (k, units)
    parts = [sums.sum(1)]
    # A rectifier's unit is dead when its sum (of values >= 0) is 0; of two samples or more.
    counted = len(shape) >= 2 and shape[0] > 1 and any(e.rectified for e in entries)
    if counted:
        parts.append(sums.count_nonzero(dim=1).to(sums.dtype))
    axes = sorted({d % len(rows) for e in entries for d in e.channel_dims})
    for axis in axes:  # the sum of squared channel sums, per entry
        before, channels, after = _channel_view(rows[1:], axis - 1)
        if before == after == 1:  # (N, C): a unit is a channel
            per_channel = sums
        else:
            per_channel = sums.reshape(k, before, channels, after).sum(dim=(1, 3))
        parts.append(per_channel.square().sum(1))
    values = torch.cat(parts).tolist()  # one read back for the group
    totals, rest = values[:k], values[k:]
    alive, rest = (rest[:k], rest[k:]) if counted else (None, rest)
    numel = math.prod(rows)
    for j, axis in enumerate(axes):
        channels = rows[axis]
        n = numel // channels  # values per channel
        for entry, squared in zip(entries, rest[j * k : (j + 1) * k]):
            sq_mean = squared / (n * n * channels)
            var = max(entry.squares / numel - sq_mean, 0.0)
            entry.channel.update(
                {d: (sq_mean, var) for d in entry.channel_dims if d % len(rows) == axis}
            )
    units = numel // rows[0]
    for i, entry in enumerate(entries):
        if entry.wants_summary:
            mean = totals[i] / numel
            var = max(entry.squares / numel - mean * mean, 0.0)
            dead = (units - alive[i]) / units if counted and entry.rectified else None
            entry.summary = ActivationSummary(mean, math.sqrt(var), dead, 0, numel)


def squared_norms(tensors: list[torch.Tensor], kernel=None) -> list[float]:
    """The float64 sum of squares of every tensor, read back once, with no copy and no
    Python per tensor: with ``kernel`` (a
    :class:`~resnorm.diagnostics.norm_stats.CompiledNorms`), its norms of the contiguous
    float32 CPU tensors in one call; the others with one fused norm call per device
    (``torch._foreach_norm`` in float64, what ``clip_grad_norm_`` uses, about ten times
    slower on small tensors); squared."""
    squares = [0.0] * len(tensors)
    by_device: dict[torch.device | None, list[int]] = {}
    for i, t in enumerate(tensors):
        taken = kernel is not None and kernel.accepts(t)
        by_device.setdefault(None if taken else t.device, []).append(i)
    for device, index in by_device.items():
        chosen = [tensors[i] for i in index]
        if device is None:
            norms = kernel.norms(chosen)
        else:
            norms = torch.stack(torch._foreach_norm(chosen, 2, dtype=torch.float64)).tolist()
        for i, value in zip(index, norms):
            squares[i] = value * value
    return squares
