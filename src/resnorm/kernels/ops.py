"""``add_norm``: residual add + layer/RMS norm as one PyTorch custom operator.

Two operators are registered with :mod:`torch.library`, ``resnorm::add_norm_fwd`` and
``resnorm::add_norm_bwd``, with fake (meta) implementations, so ``torch.compile`` traces
them as single nodes without a graph break, and with an autograd formula, so
``torch.autograd.gradcheck`` applies. Each picks its kernel by device and dtype from
:data:`FORWARD_KERNELS` / :data:`BACKWARD_KERNELS`: the compiled CPU kernel for float32 and
bfloat16 CPU tensors, the pure-PyTorch reference for everything else (float64, float16,
other devices). A GPU kernel slots in by adding a ``"cuda"`` entry to both tables.

Outside ``torch.compile``, :func:`add_norm` runs the same kernels and autograd formula
through a plain ``torch.autograd.Function``: the operators' Python dispatch costs about
25 us per call.

Words, as used here, in the tests and in ``resnorm bench``: *stock* ops are PyTorch's own,
unfused (``x + residual`` then ``F.layer_norm`` / ``F.rms_norm``); *eager* is PyTorch's
eager mode, op by op outside ``torch.compile`` (where the fused kernel runs too, through
``_EagerAddNorm``); the *compiled kernel* is the C++ one of :mod:`resnorm.kernels.cpu`,
built on first use, not to be confused with ``torch.compile``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import check_choice, check_float
from ..errors import UsageError, UsageTypeError
from . import cpu, reference

KINDS = ("layer", "rms")
# Activations fused into the output y (applied after the norm's scale and shift).
ACTIVATIONS = ("identity", "relu")
# Below this many elements the tensors stay in cache, the work is not memory-bound and the
# fused kernel measured no faster than stock PyTorch ops (docs/kernels.md): add_norm then
# runs the same computation as stock ops. Under torch.compile the operator is always used.
STOCK_BELOW = 1 << 20
# With nothing to add (no residual) a float32 layer norm runs as stock F.layer_norm: the
# kernel would fuse nothing, and ATen's single-pass layer norm measured faster than it
# (4096 x 512: 0.90 vs 1.11 ms forward, 2.38 vs 2.53 ms forward+backward). RMS norm keeps
# the kernel (stock RMS norm is several passes), and so does bfloat16 (no casts).
STOCK_PLAIN_LAYER_NORM = True
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _cpu_forward_usable(x, residual, weight, bias, h_dtype) -> bool:
    return (
        cpu.supports(x, residual, weight, bias)
        and (h_dtype is None or h_dtype in cpu.DTYPES)
        and cpu.load() is not None
    )


# Per device type: (usable(*args) -> bool, kernel); the reference runs when none applies.
FORWARD_KERNELS = {"cpu": (_cpu_forward_usable, cpu.forward)}
BACKWARD_KERNELS = {
    "cpu": (
        lambda dy, dh, h, weight, bias: (
            cpu.supports(dy, dh, h, weight, bias) and cpu.load() is not None
        ),
        cpu.backward,
    )
}


def _stock(x: Tensor, residual: Tensor | None, kind: str, activation: str) -> bool:
    """Whether :func:`add_norm` runs stock PyTorch ops for these arguments."""
    return (x.numel() < STOCK_BELOW and not torch.compiler.is_compiling()) or (
        STOCK_PLAIN_LAYER_NORM
        and residual is None
        and kind == "layer"
        and activation == "identity"
        and x.dtype == torch.float32
    )


def kernel_name(
    x: Tensor, *, with_residual: bool = True, kind: str = "layer", activation: str | None = None
) -> str:
    """Which implementation :func:`add_norm` runs for tensors like ``x`` (with a residual
    of x's shape unless ``with_residual=False``, and this ``kind`` and ``activation``):
    ``"stock"`` (stock PyTorch ops), ``"compiled cpu"`` (the compiled kernel of that device
    type) or ``"reference"`` (the pure-PyTorch reference, through the operator)."""
    if _stock(x, x if with_residual else None, kind, activation or "identity"):
        return "stock"
    entry = FORWARD_KERNELS.get(x.device.type)
    if entry is not None and entry[0](x, None, None, None, None):
        return f"compiled {x.device.type}"
    return "reference"


@torch.library.custom_op("resnorm::add_norm_fwd", mutates_args=())
def add_norm_fwd(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    rms: bool,
    eps: float,
    h_dtype: Optional[torch.dtype],
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h, mean, rstd) of 2-D (rows, n) inputs; see :func:`reference.forward`."""
    return _forward_impl(x, residual, weight, bias, rms, eps, h_dtype, activation)


def _forward_impl(x, residual, weight, bias, rms, eps, h_dtype, activation):
    entry = FORWARD_KERNELS.get(x.device.type)
    if entry is not None and entry[0](x, residual, weight, bias, h_dtype):
        return entry[1](x, residual, weight, bias, rms, eps, h_dtype, activation)
    return reference.forward(x, residual, weight, bias, rms, eps, h_dtype, activation)


@add_norm_fwd.register_fake
def _(x, residual, weight, bias, rms, eps, h_dtype, activation):
    rows = x.shape[0]
    stats = reference.stats_dtype(x.dtype)
    h = x.new_empty(x.shape, dtype=h_dtype) if h_dtype is not None else x.new_empty((0,))
    return (
        x.new_empty(x.shape),
        h,
        x.new_empty((0 if rms else rows,), dtype=stats),
        x.new_empty((rows,), dtype=stats),
    )


@torch.library.custom_op("resnorm::add_norm_bwd", mutates_args=())
def add_norm_bwd(
    dy: Tensor,
    dh: Optional[Tensor],
    h: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    rms: bool,
    need_dw: bool,
    need_db: bool,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); see :func:`reference.backward`."""
    return _backward_impl(dy, dh, h, weight, bias, mean, rstd, rms, need_dw, need_db, activation)


def _backward_impl(dy, dh, h, weight, bias, mean, rstd, rms, need_dw, need_db, activation):
    entry = BACKWARD_KERNELS.get(dy.device.type)
    if entry is not None and entry[0](dy, dh, h, weight, bias):
        return entry[1](dy, dh, h, weight, bias, mean, rstd, rms, need_dw, need_db, activation)
    return reference.backward(
        dy, dh, h, weight, bias, mean, rstd, rms, need_dw, need_db, activation
    )


@add_norm_bwd.register_fake
def _(dy, dh, h, weight, bias, mean, rstd, rms, need_dw, need_db, activation):
    n = h.shape[1]
    stats = rstd.dtype  # autograd casts dweight and dbias to each parameter's own dtype
    return (
        dy.new_empty(dy.shape),
        dy.new_empty((n if need_dw else 0,), dtype=stats),
        dy.new_empty((n if need_db else 0,), dtype=stats),
    )


def _rows(t: Tensor | None) -> Tensor | None:
    """A tensor whose rows the kernels can walk: contiguous elements, any row stride."""
    if t is None:
        return None
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, rms, eps, h_dtype, activation = inputs
    _, h, mean, rstd = output
    # Outputs nobody differentiated (h when the stream's gradient is not used; the
    # statistics) arrive as None, not as tensors of zeros to allocate, fill and read.
    ctx.set_materialize_grads(False)
    # A stream stored in 16 bits is h rounded; its statistics are those of h before the
    # rounding. The backward then recomputes h exactly from x and the residual (the same
    # memory as one float32 copy of h): rows whose spread is below the 16-bit resolution
    # would otherwise get gradients wrong by O(1).
    ctx.recompute = residual is not None and h_dtype is not None and torch.finfo(h_dtype).bits < 32
    # The ReLU's mask is recomputed from h and the statistics (z > 0): only the bias is kept.
    ctx.activation = activation
    mask_bias = bias if activation == "relu" else None
    if ctx.recompute:
        ctx.save_for_backward(x, residual, weight, mask_bias, mean, rstd)
    else:
        ctx.save_for_backward(h if h_dtype is not None else x, weight, mask_bias, mean, rstd)
    ctx.rms = rms
    ctx.has_h = h_dtype is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.x_dtype = x.dtype


def _backward(ctx, dy, dh, _dmean, _drstd, backward_op=None):
    if ctx.recompute:
        x, residual, weight, bias, mean, rstd = ctx.saved_tensors
        h = x.float() + residual.float()
    else:
        h, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(h.shape, dtype=ctx.x_dtype, device=h.device)
    need = ctx.needs_input_grad
    if (
        ctx.residual_dtype is not None
        and need[1]
        and ctx.residual_dtype.itemsize > dy.dtype.itemsize
    ):
        # A wider residual stream (float32 beside a bfloat16 branch) gets its gradient in
        # its own precision: rounding it to the branch's dtype at every block would lose it.
        dy = dy.to(ctx.residual_dtype)
    backward_op = backward_op or add_norm_bwd
    dx, dw, db = backward_op(
        _rows(dy),
        _rows(dh) if ctx.has_h else None,
        h,
        weight,
        bias,
        mean,
        rstd,
        ctx.rms,
        bool(need[2]),
        bool(need[3]),
        ctx.activation,
    )
    dres = None
    if ctx.residual_dtype is not None and need[1]:
        dres = dx if dx.dtype == ctx.residual_dtype else dx.to(ctx.residual_dtype)
    dx_x = None if not need[0] else dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)
    return (dx_x, dres, dw if need[2] else None, db if need[3] else None, None, None, None, None)


add_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAddNorm(torch.autograd.Function):
    """The same kernels and autograd formula as the operators, without the custom-operator
    dispatch (tens of microseconds of Python per call): what :func:`add_norm` runs outside
    ``torch.compile``. Under ``torch.compile`` the operators run, as single graph nodes."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, rms, eps, h_dtype, activation):
        output = _forward_impl(x, residual, weight, bias, rms, eps, h_dtype, activation)
        _setup_context(ctx, (x, residual, weight, bias, rms, eps, h_dtype, activation), output)
        ctx.mark_non_differentiable(output[2], output[3])
        return output

    @staticmethod
    def backward(ctx, dy, dh, dmean, drstd):
        return _backward(ctx, dy, dh, dmean, drstd, backward_op=_backward_impl)


def _check_tensor(name: str, t, x: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise UsageTypeError(
            f"add_norm: {name} must be a torch.Tensor or None, got {type(t).__name__}"
        )
    if t.shape != shape:
        raise UsageError(f"add_norm: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise UsageTypeError(
            f"add_norm: {name} has dtype {t.dtype}; accepted: float32, bfloat16, float16, float64"
        )
    if t.device != x.device:
        raise UsageError(f"add_norm: {name} is on {t.device} but x is on {x.device}")


def _checked_arguments(x, residual, weight, bias, kind: str, eps, activation):
    """:func:`add_norm`'s arguments checked (a clear error for a bad one, in the order of the
    signature); returns ``(eps, activation)`` as the kernels take them."""
    if not isinstance(x, Tensor):
        raise UsageTypeError(f"add_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if kind not in KINDS:
        check_choice("kind", kind, KINDS)
    if activation is None:
        activation = "identity"
    elif activation not in ACTIVATIONS:
        check_choice("activation", activation, ACTIVATIONS)
    if not (type(eps) is float and eps >= 0.0):  # the common case, without a call
        eps = check_float("eps", eps, low=0.0)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise UsageError(
            f"add_norm: x must have a non-empty last dimension, got shape {tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise UsageTypeError(
            f"add_norm: x has dtype {x.dtype}; accepted: float32, bfloat16, float16, float64"
        )
    n = x.shape[-1]
    if residual is not None:
        _check_tensor("residual", residual, x, x.shape)
    if weight is not None:
        _check_tensor("weight", weight, x, (n,))
    if bias is not None:
        if kind == "rms":
            raise UsageError(
                "add_norm: bias is not used by kind='rms' (RMS norm has no bias); pass bias=None"
            )
        _check_tensor("bias", bias, x, (n,))
    return eps, activation


def add_norm(
    x: Tensor,
    residual: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    kind: str = "layer",
    eps: float = 1e-5,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    activation: str | None = None,
):
    r"""Residual add, normalization over the last dimension and, optionally, the activation
    that follows, in one fused pass.

    .. math::
        h = x + \mathrm{residual}, \qquad
        y = \frac{h - \mathrm{E}[h]}{\sqrt{\mathrm{Var}[h] + \epsilon}}\, w + b
        \quad\text{(layer)}, \qquad
        y = \frac{h}{\sqrt{\mathrm{E}[h^2] + \epsilon}}\, w \quad\text{(rms)}

    Args:
        x: the branch output, shape ``(..., n)``; float32, bfloat16, float16 or float64.
        residual: the residual stream, same shape (any float dtype); None means h = x.
        weight, bias: shape ``(n,)``; ``bias`` only with ``kind="layer"``.
        kind: ``"layer"`` or ``"rms"``.
        eps: added to the variance (mean square).
        prenorm: also return ``h``, the new residual stream, for the next block.
        residual_in_fp32: keep the residual stream ``h`` in float32 whatever x's dtype.
        activation: None (or ``"identity"``), or ``"relu"``: ``y = max(norm(h), 0)``, the
            pre-activation blocks' Norm -> ReLU. Its backward recomputes the ReLU's mask
            from h and the statistics, so it reads and stores nothing more.

    Returns:
        ``y`` (x's dtype and shape), or ``(y, h)`` with ``prenorm=True``. ``h`` has the
        residual's dtype (x's without a residual; float32 with ``residual_in_fp32``); it is
        x itself when there is no residual and no dtype change. ``h`` is summed and
        normalized in float32 (float64 for float64 inputs) before any rounding.

    Gradients flow to x, residual, weight and bias, and the gradient reaching ``h`` (through
    the next block's skip path) is added in the same backward pass. Float32 and bfloat16
    CPU tensors run the compiled kernel (:mod:`resnorm.kernels.cpu`); other dtypes and
    devices the pure-PyTorch reference. Inputs with fewer than :data:`STOCK_BELOW` elements
    run as stock PyTorch ops (outside ``torch.compile``): they fit in cache, and there the
    fused kernel measured no faster; so does a float32 layer norm without a residual
    (:data:`STOCK_PLAIN_LAYER_NORM`: nothing to fuse). Inputs may be non-contiguous.
    """
    eps, activation = _checked_arguments(x, residual, weight, bias, kind, eps, activation)
    args = (x, residual, weight, bias, kind, eps, prenorm, residual_in_fp32, activation)
    if _stock(x, residual, kind, activation):
        return reference.add_norm_reference(*args)
    return _fused_add_norm(*args)


def _fused_add_norm(x, residual, weight, bias, kind, eps, prenorm, residual_in_fp32, activation):
    """:func:`add_norm` through the operators (their kernels and autograd formula), on 2-D
    views of x and the residual: under ``torch.compile`` the custom operator, outside it
    the same kernels without the operator's dispatch."""
    n = x.shape[-1]
    h_dtype = reference.residual_dtype(x, residual, residual_in_fp32)
    materialize = residual is not None or h_dtype != x.dtype
    shape = x.shape
    op = add_norm_fwd if torch.compiler.is_compiling() else _EagerAddNorm.apply
    y, h, _, _ = op(
        _rows(x.reshape(-1, n)),
        _rows(residual.reshape(-1, n)) if residual is not None else None,
        weight,
        bias,
        kind == "rms",
        eps,
        h_dtype if materialize else None,
        activation,
    )
    y = y.view(shape)
    if not prenorm:
        return y
    return y, (h.view(shape) if materialize else x)
