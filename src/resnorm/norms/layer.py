"""Per-sample normalization over features: layer norm (Ba et al., 2016) and RMS norm
(Zhang & Sennrich, 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_int
from ..errors import UsageError, UsageTypeError
from .base import CHANNEL_DIMS, apply_channels_at
from .conventions import CONVENTION_TABLE, resolve_eps


def _normalized_shape(value: int | Sequence[int], channel_dim: int) -> tuple[int, ...]:
    shape = (value,) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if not shape:
        raise UsageError("normalized_shape must name at least one dimension, got ()")
    for size in shape:
        check_int("normalized_shape", size, minimum=1)
    if channel_dim == 1 and len(shape) != 1:
        raise UsageError(
            f"with channel_dim=1, normalized_shape must be the channel count, got {shape}"
        )
    return shape


def layer_norm_eps_outside(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    correction: int = 0,
) -> torch.Tensor:
    """``(x - E[x]) / (std(x) + eps) * weight + bias`` over the trailing ``normalized_shape``
    dims, the standard deviation with ``correction`` (0: biased, 1: unbiased, as
    ``torch.std``). Half-precision inputs are computed in float32, as ``F.layer_norm`` does.

    ``torch.std_mean``'s backward gives a constant row (std 0) the finite gradient
    ``weight / eps`` (centred), where a square root of the variance would give NaN."""
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    std, mean = torch.std_mean(xf, dim=dims, correction=correction, keepdim=True)
    y = (xf - mean) / (std + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


class _FeatureNorm(nn.Module):
    """Shared shape handling and ``extra_repr`` of :class:`LayerNorm` and :class:`RMSNorm`."""

    # A class default too, so that a module pickled before conventions were stored loads.
    convention = "torch"

    def __init__(self, normalized_shape, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = check_choice("channel_dim", channel_dim, CHANNEL_DIMS)
        self.normalized_shape = _normalized_shape(normalized_shape, self.channel_dim)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise UsageTypeError(
                f"{type(self).__name__}: input must be a torch.Tensor, got {type(x).__name__}"
            )
        n = len(self.normalized_shape)
        if self.channel_dim == 1:
            ok = x.dim() >= 2 and x.shape[1] == self.normalized_shape[0]
            expected = f"(N, {self.normalized_shape[0]}, ...)"
        else:
            ok = x.dim() >= n and tuple(x.shape[-n:]) == self.normalized_shape
            expected = f"(..., {', '.join(map(str, self.normalized_shape))})"
        if not ok:
            raise UsageError(
                f"{type(self).__name__}: input must have shape {expected}, got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return apply_channels_at(x, self.channel_dim, -1, self._forward_channels_last)

    def extra_repr(self) -> str:
        text = (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )
        if self.convention != "torch":
            text += f", convention={self.convention!r}"
        return text + (f", channel_dim={self.channel_dim}" if self.channel_dim != -1 else "")


class LayerNorm(_FeatureNorm):
    r"""Layer normalization over the trailing ``normalized_shape`` dims of each sample.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with the mean and the biased variance over the normalized dims of one sample, so the
    result does not depend on the batch. Same parameters and outputs as
    ``torch.nn.LayerNorm``. ``channel_dim=1`` normalizes over the channels of a
    channels-first input (N, C, ...) at every position instead (see :class:`LayerNorm2d`).

    ``convention`` picks the epsilon default and, for two published variants, the formula
    (same parameters and state-dict keys in all four):

    - ``"torch"`` (eps 1e-5) and ``"keras"`` (eps 1e-3): the formula above;
    - ``"eps_outside"`` (eps 1e-5), epsilon outside the square root, the formula of the
      seed text, with the biased variance:

      .. math::
          y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x]} + \epsilon} \gamma + \beta

    - ``"annotated_transformer"`` (eps 1e-6), the Annotated Transformer's ``LayerNorm``
      (Rush, 2018), the unbiased standard deviation (``torch.std``) plus epsilon:

      .. math::
          y = \frac{x - \mathrm{E}[x]}{\sqrt{\tfrac{n}{n-1}\mathrm{Var}[x]} + \epsilon}
              \gamma + \beta

      over n >= 2 normalized values.

    Where epsilon goes matters only on nearly constant rows, whose standard deviation is
    near ``sqrt(eps)`` or below; see ``docs/conventions.md`` for measured differences.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        convention: str = "torch",
        channel_dim: int = -1,
        device=None,
        dtype=None,
    ):
        super().__init__(normalized_shape, channel_dim)
        factory = {"device": device, "dtype": dtype}
        self.eps = resolve_eps("layer", eps, convention)
        self.convention = convention
        if CONVENTION_TABLE[convention].correction and math.prod(self.normalized_shape) < 2:
            raise UsageError(
                f"convention={convention!r} divides by n - 1 (the unbiased standard deviation) "
                f"and needs at least 2 normalized values, got normalized_shape "
                f"{self.normalized_shape}"
            )
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = (
                nn.Parameter(torch.empty(self.normalized_shape, **factory)) if bias else None
            )
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        row = CONVENTION_TABLE[self.convention]
        if row.is_stock_formula:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm_eps_outside(
            x, self.normalized_shape, self.weight, self.bias, self.eps, row.correction
        )


class LayerNorm2d(LayerNorm):
    r"""Layer norm over the channels of a channels-first input (N, C, H, W) (or (N, C, L)),
    independently at every spatial position, as in ConvNeXt:

    .. math::
        y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mathrm{E}_c[x_{n,:,h,w}]}
                           {\sqrt{\mathrm{Var}_c[x_{n,:,h,w}] + \epsilon}} \gamma + \beta

    Equal to ``torch.nn.LayerNorm(C)`` applied to the input permuted to channels-last;
    ``convention`` as in :class:`LayerNorm`.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float | None = None,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        convention: str = "torch",
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_channels,
            eps,
            elementwise_affine,
            bias,
            convention=convention,
            channel_dim=1,
            device=device,
            dtype=dtype,
        )


class RMSNorm(_FeatureNorm):
    r"""Root-mean-square normalization over the trailing ``normalized_shape`` dims:

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \gamma

    No centring and no bias. ``eps=None`` means the machine epsilon of the computation's
    dtype, as in ``torch.nn.RMSNorm`` (``finfo(float32).eps`` for float32, bfloat16 and
    float16 inputs, which are computed in float32), whose parameters and outputs it shares; Keras's default is 1e-6
    (``convention="keras"``). ``channel_dim=1`` normalizes the channels of (N, C, ...).
    Layer norm's ``"eps_outside"`` and ``"annotated_transformer"`` conventions are rejected
    here: their sources define layer norm only.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        *,
        convention: str = "torch",
        channel_dim: int = -1,
        device=None,
        dtype=None,
    ):
        super().__init__(normalized_shape, channel_dim)
        self.eps = resolve_eps("rms", eps, convention)
        self.convention = convention
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.weight = nn.Parameter(
                torch.empty(self.normalized_shape, device=device, dtype=dtype)
            )
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
