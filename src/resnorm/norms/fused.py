"""Residual add + normalization in one fused pass: ``FusedAddLayerNorm``, ``FusedAddRMSNorm``.

Drop-in subclasses of :class:`~resnorm.norms.LayerNorm` and :class:`~resnorm.norms.RMSNorm`
(same parameters, state-dict keys and ``forward(x)``) whose ``forward`` also takes the
residual stream and can return the new one, as flash-attention's ``layer_norm_fn`` does::

    y = norm(x)                                   # as the parent class
    y = norm(x, residual)                         # norm(x + residual)
    y, h = norm(x, residual, prenorm=True)        # h = x + residual, the next skip input

``activation="relu"`` also applies the ReLU that follows the norm in pre-activation blocks
(Norm -> ReLU -> Linear): ``y = relu(norm(x + residual))``, in the same pass, forward and
backward. The add, the normalization and the ReLU run as one pass of
:func:`resnorm.kernels.add_norm` when the normalized dimension is the last one (tokens
(N, T, C), features (N, C)); otherwise they run separately, with the same results. The
kernels compute ``torch.nn``'s formula only: a layer norm with ``convention="eps_outside"``
or ``"annotated_transformer"`` always runs separately (its own formula, unfused).
"""

from __future__ import annotations

import torch

from .._checks import check_choice
from ..errors import UsageError
from ..kernels import ACTIVATIONS, add_norm, reference
from .conventions import CONVENTION_TABLE
from .layer import LayerNorm, RMSNorm

# What `activation=` accepts: None (the norm alone) or what resnorm.kernels.add_norm fuses.
FUSED_ACTIVATIONS = (None, *ACTIVATIONS)


class _FusedAdd:
    kind = "layer"
    activation = None

    def _set_activation(self, activation) -> None:
        check_choice("activation", activation, FUSED_ACTIVATIONS)
        self.activation = None if activation == "identity" else activation

    def _fusable(self, x: torch.Tensor) -> bool:
        # add_norm computes torch.nn's formula only; the other conventions' formulas
        # (epsilon outside the square root) run the add, then the parent class's forward.
        if not CONVENTION_TABLE[self.convention].is_stock_formula:
            return False
        last = self.channel_dim == -1 or x.dim() == 2
        return len(self.normalized_shape) == 1 and last

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False):
        self._check(x)
        if residual is not None and (
            not isinstance(residual, torch.Tensor) or residual.shape != x.shape
        ):
            shape = (
                tuple(residual.shape)
                if isinstance(residual, torch.Tensor)
                else type(residual).__name__
            )
            raise UsageError(
                f"{type(self).__name__}: residual must have x's shape {tuple(x.shape)}, got {shape}"
            )
        if self._fusable(x):
            return add_norm(
                x,
                residual,
                self.weight,
                getattr(self, "bias", None),
                kind=self.kind,
                eps=self._eps_for(x),
                prenorm=prenorm,
                residual_in_fp32=self.residual_in_fp32,
                activation=self.activation,
            )
        # The stream as add_norm makes it: summed in float32, stored in its own dtype.
        stream = reference.residual_dtype(x, residual, self.residual_in_fp32)
        compute = reference.stats_dtype(x.dtype)
        h = x if residual is None else (x.to(compute) + residual.to(compute))
        h = h.to(stream)
        y = super().forward(h)
        if self.activation == "relu":
            y = torch.relu(y)
        y = y.to(x.dtype)
        return (y, h) if prenorm else y

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (f", activation={self.activation!r}" if self.activation else "")


class FusedAddLayerNorm(_FusedAdd, LayerNorm):
    r"""Layer norm of ``x + residual`` in one fused pass (see the module docstring).

    .. math::
        h = x + r, \qquad y = \frac{h - \mathrm{E}[h]}{\sqrt{\mathrm{Var}[h] + \epsilon}} \gamma + \beta

    ``residual_in_fp32=True`` keeps the returned residual stream in float32 for bfloat16
    or float16 inputs; ``activation="relu"`` returns ``relu(y)`` (fused). Other arguments
    are :class:`~resnorm.norms.LayerNorm`'s; with ``convention="eps_outside"`` or
    ``"annotated_transformer"`` the normalization is that convention's (not fused).
    """

    kind = "layer"

    def __init__(
        self,
        normalized_shape,
        eps: float | None = None,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        residual_in_fp32: bool = False,
        activation: str | None = None,
        convention: str = "torch",
        channel_dim: int = -1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            normalized_shape,
            eps,
            elementwise_affine,
            bias,
            convention=convention,
            channel_dim=channel_dim,
            device=device,
            dtype=dtype,
        )
        self.residual_in_fp32 = bool(residual_in_fp32)
        self._set_activation(activation)

    def _eps_for(self, x: torch.Tensor) -> float:
        return self.eps


class FusedAddRMSNorm(_FusedAdd, RMSNorm):
    r"""RMS norm of ``x + residual`` in one fused pass (see the module docstring).

    .. math::
        h = x + r, \qquad y = \frac{h}{\sqrt{\mathrm{E}[h^2] + \epsilon}} \gamma

    ``eps=None`` is the machine epsilon of float32 (float64 for float64 inputs), as in
    ``torch.nn.RMSNorm``; ``activation="relu"`` returns ``relu(y)`` (fused). Other
    arguments are :class:`~resnorm.norms.RMSNorm`'s.
    """

    kind = "rms"

    def __init__(
        self,
        normalized_shape,
        eps: float | None = None,
        elementwise_affine: bool = True,
        *,
        residual_in_fp32: bool = False,
        activation: str | None = None,
        convention: str = "torch",
        channel_dim: int = -1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            normalized_shape,
            eps,
            elementwise_affine,
            convention=convention,
            channel_dim=channel_dim,
            device=device,
            dtype=dtype,
        )
        self.residual_in_fp32 = bool(residual_in_fp32)
        self._set_activation(activation)

    def _eps_for(self, x: torch.Tensor) -> float:
        if self.eps is not None:
            return self.eps
        return torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
