"""Pure-PyTorch residual add + normalization: the test oracle and the fallback kernel.

Two forms of the same computation:

- :func:`add_norm_reference` composes stock PyTorch ops, so autograd differentiates it: it
  is the oracle the fused kernels are tested against (in float64 for exactness);
- :func:`forward` and :func:`backward` spell the forward and the hand-derived backward out
  with the same inputs and outputs as the compiled kernels, so that the custom operator
  can run them on any device and dtype the kernels do not cover (and
  ``torch.autograd.gradcheck`` checks the hand-derived backward in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics and of the arithmetic: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def residual_dtype(
    x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool
) -> torch.dtype:
    """The dtype of the new residual stream ``x + residual``."""
    if residual_in_fp32 and x.dtype != torch.float64:
        return torch.float32
    return residual.dtype if residual is not None else x.dtype


def add_norm_reference(
    x,
    residual=None,
    weight=None,
    bias=None,
    kind="layer",
    eps=1e-5,
    prenorm=False,
    residual_in_fp32=False,
    activation=None,
):
    """``h = x + residual``; ``y = act(norm(h) * weight + bias)``, with stock PyTorch ops.

    ``h`` is summed in the arithmetic dtype (float32, or float64 for float64 inputs) and
    normalized before any rounding; it is returned (``prenorm=True``) in the residual
    stream's dtype: float32 with ``residual_in_fp32``, else the residual's (or x's) dtype.
    ``y`` has x's dtype.
    """
    compute = stats_dtype(x.dtype)

    def cast(t):  # skips the dispatch of a no-op .to(): this path serves small inputs
        return t if t is None or t.dtype == compute else t.to(compute)

    h = cast(x) if residual is None else cast(x) + cast(residual)
    if kind == "layer":
        y = F.layer_norm(h, (h.shape[-1],), cast(weight), cast(bias), eps)
    else:
        y = F.rms_norm(h, (h.shape[-1],), cast(weight), eps)
    if activation == "relu":
        y = F.relu(y)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    if not prenorm:
        return y
    stream = residual_dtype(x, residual, residual_in_fp32)
    return y, (h if h.dtype == stream else h.to(stream))


def forward(
    x, residual, weight, bias, rms: bool, eps: float, h_dtype, activation: str = "identity"
):
    """The kernel contract, forward: ``(y, h, mean, rstd)`` for 2-D ``(rows, n)`` inputs.

    ``y`` is rectified (``max(z, 0)``) with ``activation="relu"``.
    ``h`` is empty when ``h_dtype`` is None (the residual stream is x itself); ``mean`` is
    empty for RMS norm. Statistics are in :func:`stats_dtype`."""
    compute = stats_dtype(x.dtype)
    h = x.to(compute) if residual is None else x.to(compute) + residual.to(compute)
    if rms:
        mean = h.new_empty((0,))
        centred = h
    else:
        mean = h.mean(dim=1)
        centred = h - mean[:, None]
    rstd = torch.rsqrt(centred.square().mean(dim=1) + eps)
    y = centred * rstd[:, None]
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    if activation == "relu":
        y = torch.relu(y)
    h_out = h.to(h_dtype).contiguous() if h_dtype is not None else x.new_empty((0,))
    return y.to(x.dtype).contiguous(), h_out, mean, rstd


def backward(
    dy,
    dh,
    h,
    weight,
    bias,
    mean,
    rstd,
    rms: bool,
    need_dw: bool,
    need_db: bool,
    activation: str = "identity",
):
    """The kernel contract, backward: ``(dx, dweight, dbias)``.

    With ``xhat = (h - mean) * rstd`` and ``g = dy * weight`` (``dy`` first masked by
    ``z > 0``, ``z = xhat * weight + bias``, with ``activation="relu"``; ``bias`` is read
    for that only)::

        dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh   (RMS norm: no mean(g))
        dweight = sum over rows of dy * xhat;  dbias = sum over rows of dy

    ``dx`` (the gradient of x and of the residual alike) has dy's dtype; the parameter
    gradients are in the arithmetic dtype (``rstd``'s: float32, or float64), empty when not
    asked for; autograd casts each to its parameter's own dtype, so that a float32 bias of
    bfloat16 activations gets a float32 gradient, not one rounded to bfloat16.
    """
    compute = rstd.dtype
    hc, g0 = h.to(compute), dy.to(compute)
    xhat = (hc if rms else hc - mean[:, None]) * rstd[:, None]
    if activation == "relu":
        z = xhat if weight is None else xhat * weight.to(compute)
        z = z if bias is None else z + bias.to(compute)
        g0 = torch.where(z > 0, g0, 0.0)
    g = g0 if weight is None else g0 * weight.to(compute)
    inner = (g * xhat).mean(dim=1, keepdim=True)
    dx = g - xhat * inner
    if not rms:
        dx = dx - g.mean(dim=1, keepdim=True)
    dx = dx * rstd[:, None]
    if dh is not None:
        dx = dx + dh.to(compute)
    dw = (g0 * xhat).sum(dim=0) if need_dw else dy.new_empty((0,), dtype=compute)
    db = g0.sum(dim=0) if need_db else dy.new_empty((0,), dtype=compute)
    return dx.to(dy.dtype).contiguous(), dw, db
