"""Tests of ``resnorm.kernels.add_norm``, the fused residual add + layer/RMS norm operator.

What is checked, and against what:

1. the compiled CPU kernel (float32) against the float64 oracle ``add_norm_reference`` run
   on float64 copies of the same inputs: y, the new residual stream h, and every gradient
   (x, residual, weight, bias), with random upstream gradients on y *and* h, for both kinds
   and every combination of the optional arguments; and that the compiled kernel, not the
   reference, did the work;
2. parity with the ``torch.nn`` twins (``nn.LayerNorm``/``F.layer_norm``,
   ``nn.RMSNorm``/``F.rms_norm``) applied to ``x + residual``;
3. ``torch.autograd.gradcheck`` in float64 (the reference path and the registered autograd
   formula; gradgradcheck is not supported) and ``torch.library.opcheck`` (fake/meta
   implementations, autograd registration, AOT dispatch);
4. ``torch.compile(fullgraph=True)``: exactly one graph, no break, results equal to eager,
   with the default inductor backend too;
5. large means (1e4 + noise): two-pass statistics hold float32 accuracy where a one-pass
   E[x^2] - E[x]^2 in float32 demonstrably fails the same bound;
6. non-contiguous inputs, weights and upstream gradients: bit-equal to contiguous ones;
7. bfloat16: y within one bf16 ulp of the oracle, ``residual_in_fp32``, gradients, x and
   residual in different dtypes;
8. hypothesis properties over shapes (vector tails), leading dims, layouts, dtypes, eps and
   kind;
9. the non-temporal (streaming) store path (outputs >= ``cpu.NONTEMPORAL_BYTES``) and the
   normal one;
10. the fallbacks: float64 and float16 run the reference; ``RESNORM_KERNELS=reference``;
11. bad arguments, with messages that name the argument and what is accepted;
12. one intra-op thread vs two; rows in blocks (whole, partial, split between threads);
13. zero rows;
14. ``prenorm=True`` without a residual returns x itself as h, and gradients still flow;
15. the output pool: outputs from it match the oracle and the unpooled kernel bit for bit,
    freed blocks are reused, the cap and ``empty_cache`` release them, its tensors resize,
    save and share like any other, and its settings (environment included) are checked.
16. the fused ReLU (``activation="relu"``): y and every gradient against the float64
    oracle, the backward's mask (recomputed from h) against the forward's output, layouts,
    gradcheck, the stock path for small inputs, torch.compile, bad values.
17. portability: the source built for AVX2 machines (``-march=x86-64-v3``, no AVX-512:
    the kernel's AVX-512 paths compiled out) gives the native build's results (slow: one
    more build).

Tolerances (see ``_Scales``). Each result is compared elementwise with the float64 oracle,
``|got - oracle| <= ulp(oracle in the output dtype) + tol * scale``, where ``scale`` is the
magnitude the rounding errors of a float32 computation are proportional to, computed from
the float64 data (h = x + residual, rstd, xhat = normalized h, g = dy * weight):

- y: ``rstd * max|h| * max|w| + max|b|`` per row: a relative rounding eps of h (or of the
  mean, for a large mean) moves y by ``eps * |h| * rstd * |w|``;
- dx: ``rstd * max|g| * (1 + amp * (1 + max|xhat|)) + max|dh|`` per row, with
  ``amp = rstd * max|h|`` (xhat is recomputed from h in the backward pass), plus the
  second-order term ``(tol * amp)^2 * rstd * max|g|``, which matters only for rows of
  huge amp stored in bf16 (``test_bfloat16_stream_gradient_at_rounded_h``);
- dweight: ``sum over rows of |dy| * (|xhat| + amp)``; dbias: ``sum over rows of |dy|``.

``tol`` is 1e-5 (= 84 float32 epsilons) wherever the kernel works in float32 on exact
inputs: its reductions keep 16 partial sums (one AVX-512 register) added pairwise at the
end, so the worst-case rounding bound of a mean over n <= 1024 elements is about
(n / 16 + 4) eps = 68 eps; wider rows (up to 40,000 in ``test_row_blocks``) stay within the
same tol, as the rounding errors of long sums add up like a random walk (about
sqrt(n / 16) eps); observed errors are 10 to 100 times smaller than the bound. For gradients where h is stored in bfloat16 (float16) it is that dtype's eps,
2^-7 (2^-10): the backward recomputes xhat from h as stored in the residual stream's dtype,
a relative error of up to the unit roundoff eps / 2, amplified by ``amp``; observed errors
stay below 0.4 of the bound. The ulp term is the rounding of the float32 result to a bf16 /
fp16 output (half an ulp, plus the float32 error that may cross a rounding boundary: one
ulp in all); observed: at most 0.5 of it.

``RESNORM_HYPOTHESIS_EXAMPLES`` raises the number of hypothesis examples for a longer run.
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from resnorm.kernels import (
    KINDS,
    add_norm,
    add_norm_reference,
    cpu,
    kernel_name,
    ops,
    reference,
)

EXAMPLES = int(os.environ.get("RESNORM_HYPOTHESIS_EXAMPLES", "30"))
HYPOTHESIS = settings(max_examples=EXAMPLES, deadline=None)

EPS32 = torch.finfo(torch.float32).eps
# tol of the gradients by the dtype h is stored in (see the module docstring); y: Y_TOL
TOL = {torch.float32: 1e-5, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
       torch.float16: torch.finfo(torch.float16).eps, torch.float64: 1e-12}
Y_TOL = 1e-5  # y is computed in float32 from the unrounded h, whatever the input dtype
LARGE_MEAN_TOL = 8 * EPS32  # of |h| * rstd: a few roundings of the inputs' magnitude
LAYOUTS = ("contiguous", "transposed", "column-strided", "row-strided")
_STOCK_BELOW = getattr(ops, "STOCK_BELOW", None)  # the default, before any fixture runs


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def compiled():
    """The compiled kernel (built on first use, cached afterwards), or a skip saying why not."""
    status = cpu.status()
    if not status["available"]:
        pytest.skip(f"the compiled CPU kernel is unavailable here: {status['reason']}")
    return status


@pytest.fixture(autouse=True)
def _through_the_operator(monkeypatch):
    """Small inputs through the custom operator, as large ones: if ``add_norm`` sends tiny
    inputs to stock PyTorch ops (``ops.STOCK_BELOW``), lift that threshold, so that these
    small tensors test the operator and its kernels. ``test_default_path_small_input`` runs
    the default path."""
    if hasattr(ops, "STOCK_BELOW"):
        monkeypatch.setattr(ops, "STOCK_BELOW", 0)
    if hasattr(ops, "STOCK_PLAIN_LAYER_NORM"):  # likewise, layer norm without a residual
        monkeypatch.setattr(ops, "STOCK_PLAIN_LAYER_NORM", False)


@pytest.fixture
def only_compiled(monkeypatch, compiled):
    """Fails the test if the pure-PyTorch reference runs instead of the compiled kernel."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference kernel ran where the compiled one should have")

    monkeypatch.setattr(reference, "forward", refuse)
    monkeypatch.setattr(reference, "backward", refuse)


@pytest.fixture
def reference_calls(monkeypatch):
    """Counts the calls of the reference kernel's forward and backward."""
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        original = getattr(reference, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(reference, name, counted)
    return calls


@pytest.fixture
def threads():
    """Restores the intra-op thread count (conftest sets 1) after a test that changes it."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(shape, seed: int, dtype=torch.float32, scale: float = 2.0, shift: float = 0.7):
    """Random data with a non-zero mean and a non-unit variance (so normalization matters)."""
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale
            + shift).to(dtype)


def _params(n: int, seed: int, weight_dtype=torch.float32, bias_dtype=torch.float32):
    """Weight about 1 +- 0.5 and bias about 0 +- 0.5 (neither ones nor zeros)."""
    weight = _data((n,), seed, weight_dtype, scale=0.5, shift=1.0)
    bias = _data((n,), seed + 1, bias_dtype, scale=0.5, shift=0.0)
    return weight, bias


def _ulp(ref: Tensor, dtype: torch.dtype) -> Tensor:
    """One unit in the last place of ``dtype`` at |ref|, elementwise (float64)."""
    info = torch.finfo(dtype)
    magnitude = ref.detach().double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def _within(actual: Tensor, expected: Tensor, bound) -> bool:
    err = (actual.detach().double() - expected.detach().double()).abs()
    return bool((err <= bound).all())  # a NaN is never within


def _assert_close(actual: Tensor, expected: Tensor, bound, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual.detach().double() - expected.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    ok = err <= bound
    if not bool(ok.all()):
        ratio = (err / bound).nan_to_num(nan=float("inf"))
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} elements off; worst "
                             f"error/bound {ratio.max().item():.3g}, max error "
                             f"{err.nan_to_num(nan=float('inf')).max().item():.3g}")


def _same(a: Tensor | None, b: Tensor | None, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, f"{what}: {a is None=} {b is None=}"
        return
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert torch.equal(a, b), f"{what}: max abs diff {(a.double() - b.double()).abs().max()}"


@dataclasses.dataclass
class Run:
    """Outputs and gradients of one call: y, h (prenorm output) and the input gradients."""
    y: Tensor
    h: Tensor
    dx: Tensor | None
    dres: Tensor | None
    dw: Tensor | None
    db: Tensor | None
    h_is_x: bool

    def fields(self):
        return {"y": self.y, "h": self.h, "dx": self.dx, "dres": self.dres, "dw": self.dw,
                "db": self.db}


def _run(fn, x, residual=None, weight=None, bias=None, *, kind="layer", eps=1e-5, dy=None,
         dh=None, residual_in_fp32=False, prenorm=True, activation=None) -> Run:
    """Call ``fn`` (add_norm or the reference) on leaves sharing the inputs' memory and
    layout, then backpropagate ``dy`` into y and ``dh`` into h (either may be None)."""
    leaves = [None if t is None else t.detach().requires_grad_()
              for t in (x, residual, weight, bias)]
    extra = {"activation": activation} if activation is not None else {}
    out = fn(*leaves, kind=kind, eps=eps, prenorm=prenorm, residual_in_fp32=residual_in_fp32,
             **extra)
    y, h = out if prenorm else (out, None)
    outputs, grads = [], []
    for tensor, grad in ((y, dy), (h, dh)):
        if grad is not None:
            outputs.append(tensor)
            grads.append(grad)
    if outputs:
        torch.autograd.backward(outputs, grads)
    grads = [None if t is None else t.grad for t in leaves]
    return Run(y.detach(), None if h is None else h.detach(), *grads,
               h_is_x=h is not None and h is leaves[0])


def _oracle(x, residual=None, weight=None, bias=None, *, kind="layer", eps=1e-5, dy=None,
            dh=None, prenorm=True) -> Run:
    """The float64 oracle on float64 copies of the same values."""
    def f64(t):
        return None if t is None else t.detach().double().clone()

    return _run(add_norm_reference, f64(x), f64(residual), f64(weight), f64(bias), kind=kind,
                eps=eps, dy=f64(dy), dh=f64(dh), prenorm=prenorm)


@dataclasses.dataclass
class _Scales:
    """Magnitudes that the float32 rounding errors of each result are proportional to (see
    the module docstring), from the float64 values of the inputs."""
    y: Tensor
    y_centred: Tensor  # rstd * max|h - mean| * max|w| + max|b|: y's own magnitude
    dx: Tensor
    dx2: Tensor  # rstd * max|g| * amp^2: the second-order term of a rounded h (see _check)
    dw: Tensor
    db: Tensor

    @classmethod
    def of(cls, x, residual=None, weight=None, bias=None, *, kind="layer", eps=1e-5, dy=None,
           dh=None):
        h = x.detach().double()
        if residual is not None:
            h = h + residual.detach().double()
        n = h.shape[-1]
        centred = h - h.mean(-1, keepdim=True) if kind == "layer" else h
        rstd = (centred.square().mean(-1, keepdim=True) + eps).rsqrt()
        xhat = centred * rstd
        w = (weight.detach().double().abs() if weight is not None
             else torch.ones(n, dtype=torch.float64))
        bmax = bias.detach().double().abs().max() if bias is not None else 0.0
        amp = rstd * h.abs().amax(-1, keepdim=True)
        y = amp * w.max() + bmax
        y_centred = rstd * centred.abs().amax(-1, keepdim=True) * w.max() + bmax
        dy = torch.zeros_like(h) if dy is None else dy.detach().double().abs()
        dh = torch.zeros_like(h) if dh is None else dh.detach().double().abs()
        g = dy * w
        dx = (rstd * g.amax(-1, keepdim=True)
              * (1 + amp * (1 + xhat.abs().amax(-1, keepdim=True)))
              + dh.amax(-1, keepdim=True))
        lead = tuple(range(h.dim() - 1))
        dw = (dy * (xhat.abs() + amp)).sum(lead)
        db = dy.sum(lead)
        dx2 = rstd * g.amax(-1, keepdim=True) * amp.square()
        return cls(y, y_centred, dx, dx2, dw, db)


def _h_dtype(x, residual, residual_in_fp32):
    return reference.residual_dtype(x, residual, residual_in_fp32)


def _expected_h(x, residual, residual_in_fp32=False):
    """h as the kernel must produce it: summed in float32 (float64 for float64), rounded once
    to the residual stream's dtype."""
    compute = reference.stats_dtype(x.dtype)
    h = x.to(compute) if residual is None else x.to(compute) + residual.to(compute)
    return h.to(_h_dtype(x, residual, residual_in_fp32))


def _check(got: Run, want: Run, sc: _Scales, *, x, residual=None, weight=None,
           residual_in_fp32=False, what="") -> None:
    """Every output and gradient of ``got`` against the float64 oracle ``want``."""
    # The backward recomputes xhat from h as stored (x itself when h is not materialized,
    # in which case h_dtype is x's dtype); the arithmetic is float32 (float64 for float64).
    h_dtype = _h_dtype(x, residual, residual_in_fp32)
    float64 = x.dtype == torch.float64
    tol = TOL[h_dtype] if float64 else max(TOL[h_dtype], TOL[torch.float32])
    # y: float32 arithmetic on the unrounded h, rounded once to x's dtype.
    assert got.y.dtype == x.dtype, f"{what}: y dtype {got.y.dtype}"
    y_tol = TOL[torch.float64] if float64 else Y_TOL
    _assert_close(got.y, want.y, _ulp(want.y, x.dtype) + y_tol * sc.y, f"{what}: y")
    # h: x + residual in float32, rounded once; bit-exact.
    if got.h is not None:
        _same(got.h, _expected_h(x, residual, residual_in_fp32), f"{what}: h")
    # The backward recomputes xhat from the stored h: an xhat error of delta = tol * amp
    # (amp = rstd * max|h|) moves dx by rstd * max|g| * (delta * (1 + max|xhat|) + delta^2);
    # sc.dx holds the first-order terms, sc.dx2 the second (which only matters for rows of
    # huge amp stored in bf16, e.g. n = 1 with a small eps: see
    # test_bfloat16_stream_gradient_at_rounded_h).
    dx = tol * sc.dx + tol ** 2 * sc.dx2
    for name, scale in (("dx", dx), ("dres", dx), ("dw", tol * sc.dw), ("db", tol * sc.db)):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, f"{what}: {name} should not exist"
            continue
        assert a is not None, f"{what}: no gradient {name}"
        _assert_close(a, b, _ulp(b, a.dtype) + scale, f"{what}: {name}")
    if got.dres is not None and got.dres.dtype == got.dx.dtype:
        _same(got.dx, got.dres, f"{what}: the gradients of x and of the residual")


def _case(shape, seed, *, dtype=torch.float32, residual=True, weight=True, bias=True,
          kind="layer", param_dtype=torch.float32, residual_dtype=None):
    """Inputs and upstream gradients of one test case."""
    n = shape[-1]
    x = _data(shape, seed, dtype)
    res = _data(shape, seed + 1, residual_dtype or dtype, scale=1.5, shift=-0.3) if residual else None
    w, b = _params(n, seed + 2, param_dtype, param_dtype)
    dy = _data(shape, seed + 4, dtype, scale=1.0, shift=0.1)
    return x, res, w if weight else None, b if bias and kind == "layer" else None, dy


def _as_layout(t: Tensor, how: str) -> Tensor:
    """A tensor with ``t``'s values in the named memory layout (last dim = the row)."""
    n = t.shape[-1]
    if how == "contiguous":
        out = t.contiguous()
    elif how == "transposed":  # column-major rows: add_norm hands the kernel a copy
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert n <= 1 or t.shape[-2] <= 1 or out.stride(-1) != 1
    elif how == "column-strided":  # every other element of a wider tensor: wide[..., ::2]
        wide = torch.full((*t.shape[:-1], 2 * n), float("nan"), dtype=t.dtype)
        wide[..., ::2] = t
        out = wide[..., ::2]
    elif how == "row-strided":  # contiguous rows with NaN gaps between them: big[..., :n]
        big = torch.full((*t.shape[:-1], n + 13), float("nan"), dtype=t.dtype)
        big[..., :n] = t
        out = big[..., :n]
        assert out.stride(-1) == 1 and (t.dim() < 2 or out.stride(-2) == n + 13)
    else:
        raise ValueError(how)
    assert torch.equal(out, t)
    return out


# --------------------------------------------------------------------------------------------
# 1. the compiled kernel against the float64 oracle

CONFIGS = [(kind, res, w, b) for kind in KINDS for res in (False, True) for w in (False, True)
           for b in ((False, True) if kind == "layer" else (False,))]


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("kind,with_residual,with_weight,with_bias", CONFIGS)
def test_compiled_kernel_matches_float64_oracle(kind, with_residual, with_weight, with_bias,
                                                 prenorm, only_compiled):
    # n = 200: twelve blocks of 16 partial sums and a tail of 8; 3-D input, 15 rows.
    shape = (3, 5, 200)
    x, res, w, b, dy = _case(shape, 10, residual=with_residual, weight=with_weight,
                             bias=with_bias, kind=kind)
    dh = _data(shape, 20, scale=1.0, shift=-0.2) if prenorm else None
    assert kernel_name(x) == "compiled cpu"
    got = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh, prenorm=prenorm)
    want = _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh, prenorm=prenorm)
    sc = _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh)
    _check(got, want, sc, x=x, residual=res, weight=w, what=f"{kind}")
    if prenorm:
        assert got.h_is_x == (res is None)
    # The check has teeth: it fails for eps = 1e-3 instead of 1e-5 (a change of y by about
    # 1e-4 of its magnitude).
    wrong = _run(add_norm, x, res, w, b, kind=kind, eps=1e-3, dy=dy, dh=dh, prenorm=prenorm)
    with pytest.raises(AssertionError):
        _check(wrong, want, sc, x=x, residual=res, weight=w, what="wrong eps")


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_kernel_gradient_of_h_only(kind, only_compiled):
    """Only h is used downstream (y's gradient is zero): x and the residual get dh."""
    x, res, w, b, _ = _case((4, 70), 30, kind=kind)
    dh = _data((4, 70), 31, scale=1.0, shift=0.0)
    got = _run(add_norm, x, res, w, b, kind=kind, dy=None, dh=dh)
    _same(got.dx, dh, "dx")
    _same(got.dres, dh, "dres")
    assert torch.equal(got.dw, torch.zeros_like(w))


# --------------------------------------------------------------------------------------------
# 2. the torch.nn twins


@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_nn_twin(kind, compiled):
    n, shape, eps = 96, (4, 7, 96), 1e-5
    twin = nn.LayerNorm(n, eps=eps) if kind == "layer" else nn.RMSNorm(n, eps=eps)
    w, b = _params(n, 40)
    with torch.no_grad():
        twin.weight.copy_(w)
        if kind == "layer":
            twin.bias.copy_(b)
    x, res = _data(shape, 41), _data(shape, 42, scale=1.0, shift=-0.4)
    dy = _data(shape, 43, scale=1.0, shift=0.0)
    bias = b if kind == "layer" else None

    got = _run(add_norm, x, res, w, bias, kind=kind, eps=eps, dy=dy, prenorm=False)
    xt, rt = x.clone().requires_grad_(), res.clone().requires_grad_()
    yt = twin(xt + rt)
    yt.backward(dy)
    functional = (F.layer_norm(x + res, (n,), w, b, eps) if kind == "layer"
                  else F.rms_norm(x + res, (n,), w, eps))
    _same(yt.detach(), functional, "module vs functional twin")

    sc = _Scales.of(x, res, w, bias, kind=kind, eps=eps, dy=dy)
    # Both sides are float32 computations within ~1e-6 of the exact result.
    _assert_close(got.y, yt.detach(), Y_TOL * sc.y, "y vs twin")
    _assert_close(got.dx, xt.grad, 1e-5 * sc.dx, "dx vs twin")
    _assert_close(got.dres, rt.grad, 1e-5 * sc.dx, "dres vs twin")
    _assert_close(got.dw, twin.weight.grad, 1e-5 * sc.dw, "dweight vs twin")
    if kind == "layer":
        _assert_close(got.db, twin.bias.grad, 1e-5 * sc.db, "dbias vs twin")


# --------------------------------------------------------------------------------------------
# 3. gradcheck and opcheck


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind, prenorm, with_residual, affine, reference_calls):
    shape = (2, 3, 6)
    x, res, w, b, _ = _case(shape, 50, dtype=torch.float64, residual=with_residual,
                            weight=affine, bias=affine, kind=kind, param_dtype=torch.float64)
    assert kernel_name(x) == "reference"
    names = [name for name, t in (("x", x), ("residual", res), ("weight", w), ("bias", b))
             if t is not None]
    inputs = tuple(t.detach().requires_grad_() for t in (x, res, w, b) if t is not None)

    def fn(*tensors):
        return add_norm(**dict(zip(names, tensors)), kind=kind, eps=1e-3, prenorm=prenorm)

    assert torch.autograd.gradcheck(fn, inputs)
    # It was the operator's registered formula (the reference backward) that was checked.
    assert reference_calls["forward"] > 0 and reference_calls["backward"] > 0


def _opcheck(op, args):
    # test_schema is left out: it adds nothing here and costs tens of seconds on first use.
    torch.library.opcheck(op, args, test_utils=("test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype,param_dtype,h_dtype", [
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, None),
    (torch.float64, torch.float64, torch.float64),
])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_opcheck(rms, activation, dtype, param_dtype, h_dtype, compiled):
    """The fake (meta) implementations agree with the real kernels on every output's shape
    and dtype, including the empty outputs (RMS mean, unrequested parameter gradients)."""
    x = _data((5, 24), 60, dtype)
    res = _data((5, 24), 61, dtype) if h_dtype is not None else None
    w, b = _params(24, 62, param_dtype, param_dtype)
    b = None if rms else b
    args = (x, res, w, b, rms, 1e-5, h_dtype, activation)
    _opcheck(torch.ops.resnorm.add_norm_fwd.default, args)
    _, h, mean, rstd = torch.ops.resnorm.add_norm_fwd(*args)
    h = h if h_dtype is not None else x
    dy = _data((5, 24), 63, dtype)
    dh = _data((5, 24), 64, h.dtype) if h_dtype is not None else None
    for need_dw, need_db in ((True, True), (False, False), (True, False)):
        _opcheck(torch.ops.resnorm.add_norm_bwd.default,
                 (dy, dh, h, w, b, mean, rstd, rms, need_dw, need_db and not rms, activation))


# --------------------------------------------------------------------------------------------
# 4. torch.compile


def _block(x, residual, weight, bias):
    """A pre-norm step: new stream h, normalized y, something downstream of both."""
    y, h = add_norm(x, residual, weight, bias, kind="layer", prenorm=True)
    z, _ = add_norm(y * 2.0, h, weight, None, kind="rms", prenorm=True)
    return z + h


def _compile_inputs(rows=6, n=40, seed=70):
    x, res, w, b, _ = _case((rows, n), seed)
    return [t.clone().requires_grad_() for t in (x, res, w, b)]


def _eager_and_compiled(compiled_fn, rows=6, n=40, eager_fn=None):
    results = []
    for fn in (eager_fn or _block, compiled_fn):
        inputs = _compile_inputs(rows, n)
        out = fn(*inputs)
        out.backward(_data(out.shape, 71, scale=1.0, shift=0.0))
        results.append([out.detach()] + [t.grad for t in inputs])
    return results


def _compile_counting(fn):
    """``torch.compile(fn, fullgraph=True)`` with a backend that records each graph it gets."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(fn, backend=counting_backend, fullgraph=True), graphs


def test_compile_one_graph_no_break(compiled):
    torch._dynamo.reset()
    fn, graphs = _compile_counting(_block)
    eager, comp = _eager_and_compiled(fn)
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.resnorm.add_norm_fwd.default) == 2, targets
    for a, b, name in zip(eager, comp, ("out", "dx", "dres", "dw", "db")):
        _same(b, a, f"compiled vs eager {name}")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_block)(*_compile_inputs())
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation
    torch._dynamo.reset()


def test_compile_aot_eager_dynamic_shapes(compiled):
    """aot_eager traces the forward and the backward operator through their fake
    implementations; with dynamic=True one graph serves several row counts."""
    torch._dynamo.reset()
    fn = torch.compile(_block, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (6, 9):
        eager, comp = _eager_and_compiled(fn, rows=rows)
        for a, b, name in zip(eager, comp, ("out", "dx", "dres", "dw", "db")):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=f"{rows} rows: {name}")
    torch._dynamo.reset()


def _single(x, residual, weight, bias):
    y, h = add_norm(x, residual, weight, bias, kind="layer", prenorm=True)
    return y, h


def test_compile_inductor_matches_eager(compiled):
    """The default backend, on a graph of one add_norm (forward and backward): inductor has
    little of its own to generate, so that this stays fast with a cold inductor cache."""
    torch._dynamo.reset()
    fn = torch.compile(_single, fullgraph=True)
    runs = []
    for f in (_single, fn):
        inputs = _compile_inputs()
        y, h = f(*inputs)
        torch.autograd.backward([y, h], [_data(y.shape, 72, scale=1.0, shift=0.0),
                                         _data(h.shape, 73, scale=1.0, shift=0.0)])
        runs.append([y.detach(), h.detach()] + [t.grad for t in inputs])
    for a, b, name in zip(*runs, ("y", "h", "dx", "dres", "dw", "db")):
        _same(b, a, f"inductor vs eager: {name}")
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# 5. large means


def _one_pass_float32(x, eps):
    """LayerNorm with the naive one-pass variance E[x^2] - E[x]^2, in float32 (clamped at
    0, so that it fails by its error, not by a NaN)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x * x).mean(-1, keepdim=True) - mean * mean).clamp_min(0.0)
    return (x - mean) / torch.sqrt(var + eps)


@pytest.mark.parametrize("where", ["x", "residual"])
@pytest.mark.parametrize("kind", KINDS)
def test_large_mean(kind, where, only_compiled):
    """h = 1e4 + noise of std 1 (in x, or in the residual stream): float32 carries 1e4 with
    an ulp of 2^-10, so any float32 result is off by a few 1e-4 (the rounding of the mean;
    observed: F.layer_norm 1e-4, the kernel 3e-4). The bound is ``8 eps32 * |h| * rstd``
    (1e-2) plus the usual 1e-5 of y's own magnitude (the only term that matters for RMS
    norm, which does not centre). A one-pass variance in float32 misses it by far more than
    10 times."""
    shape = (16, 1024)
    big = 1e4 + _data(shape, 80, torch.float64, scale=1.0, shift=0.0)
    noise = _data(shape, 81, scale=0.5, shift=0.0)
    x, res = (big.float(), None) if where == "x" else (noise, big.float())
    got = add_norm(x, res, kind=kind)
    want = add_norm_reference(x.double(), None if res is None else res.double(), kind=kind)
    sc = _Scales.of(x, res, kind=kind)
    bound = LARGE_MEAN_TOL * sc.y + Y_TOL * sc.y_centred
    assert float(bound.max()) < (1e-2 if kind == "layer" else 1e-4)
    _assert_close(got, want, bound, "y with a large mean")
    if kind == "layer":  # the test has teeth: the one-pass variance fails the same bound
        h = x if res is None else x + res
        naive = _one_pass_float32(h, 1e-5)
        assert not _within(naive, want, 10 * bound)


# --------------------------------------------------------------------------------------------
# 6. non-contiguous inputs


@pytest.mark.parametrize("x_layout,res_layout", [
    ("transposed", "row-strided"), ("column-strided", "transposed"),
    ("row-strided", "column-strided"), ("row-strided", "broadcast"),
])
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_equals_contiguous(kind, x_layout, res_layout, compiled):
    shape = (12, 72)
    x, res, w, b, dy = _case(shape, 90, kind=kind)
    if res_layout == "broadcast":  # one residual row for all rows: row stride 0
        res_view = res[:1].expand(shape)
        res = res_view.contiguous()
        assert res_view.stride(0) == 0
    else:
        res_view = _as_layout(res, res_layout)
    dh = _data(shape, 91, scale=1.0, shift=0.0)
    # weight, bias and both upstream gradients are non-contiguous too
    views = {"x": _as_layout(x, x_layout), "residual": res_view,
             "weight": _as_layout(w, "column-strided"),
             "bias": None if b is None else _as_layout(b, "column-strided"),
             "dy": _as_layout(dy, "transposed"), "dh": _as_layout(dh, "row-strided")}
    assert not any(t.is_contiguous() for t in views.values() if t is not None)
    got = _run(add_norm, views["x"], views["residual"], views["weight"], views["bias"],
               kind=kind, dy=views["dy"], dh=views["dh"])
    want = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh)
    for name, a in got.fields().items():
        _same(a, getattr(want, name), f"{x_layout}/{res_layout}: {name}")


def test_non_contiguous_3d_and_broadcast_upstream_gradient(compiled):
    """A permuted 3-D input (copied), a row-strided 3-D view (walked in place), and an
    upstream gradient broadcast over rows (row stride 0)."""
    shape = (3, 4, 48)
    x, res, w, b, _ = _case(shape, 95)
    x_view = x.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    res_view = _as_layout(res, "row-strided")
    dy = _data((48,), 96, scale=1.0, shift=0.0).expand(shape)
    assert not x_view.is_contiguous() and dy.stride()[:2] == (0, 0)
    got = _run(add_norm, x_view, res_view, w, b, dy=dy)
    want = _run(add_norm, x, res, w, b, dy=dy.contiguous())
    for name, a in got.fields().items():
        _same(a, getattr(want, name), name)
    _check(got, _oracle(x, res, w, b, dy=dy), _Scales.of(x, res, w, b, dy=dy), x=x,
           residual=res, what="broadcast dy")


# --------------------------------------------------------------------------------------------
# 7. bfloat16


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, None])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_matches_oracle(kind, residual_in_fp32, param_dtype, only_compiled):
    shape = (6, 136)  # 2 blocks of 64 and a tail of 8
    x, res, w, b, dy = _case(shape, 100, dtype=torch.bfloat16, kind=kind,
                             weight=param_dtype is not None, bias=param_dtype is not None,
                             param_dtype=param_dtype or torch.float32)
    h_dtype = torch.float32 if residual_in_fp32 else torch.bfloat16
    dh = _data(shape, 101, h_dtype, scale=1.0, shift=0.0)
    assert kernel_name(x) == "compiled cpu"
    got = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh,
               residual_in_fp32=residual_in_fp32)
    assert got.h.dtype == h_dtype and got.y.dtype == torch.bfloat16
    assert got.dx.dtype == torch.bfloat16 and got.dres.dtype == torch.bfloat16
    if w is not None:
        assert got.dw.dtype == w.dtype
    if residual_in_fp32:  # the stream in float32: exactly the float32 sum, no rounding
        _same(got.h, x.float() + res.float(), "fp32 h")
    want = _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh)
    sc = _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh)
    # y within one bf16 ulp of the exact value, elementwise (+ the float32 error, which
    # only matters for |y| < 1e-3, where an ulp is below 1e-5).
    _check(got, want, sc, x=x, residual=res, weight=w, residual_in_fp32=residual_in_fp32,
           what="bf16")


def test_bfloat16_residual_in_fp32_same_y(compiled):
    """residual_in_fp32 changes the dtype h is stored in, not how y is computed."""
    x, res, w, b, _ = _case((5, 50), 105, dtype=torch.bfloat16)
    y16, h16 = add_norm(x, res, w, b, prenorm=True)
    y32, h32 = add_norm(x, res, w, b, prenorm=True, residual_in_fp32=True)
    _same(y16, y32, "y")
    _same(h32, x.float() + res.float(), "h fp32")
    _same(h16, (x.float() + res.float()).bfloat16(), "h bf16")
    # without a residual the float32 stream is x itself, widened
    _, h = add_norm(x, None, w, b, prenorm=True, residual_in_fp32=True)
    _same(h, x.float(), "h = x.float()")


def _stream_case():
    """A residual stream of 100 plus a small branch (std 0.05): h = x + residual is exact in
    float32 but its bf16 rounding (ulp 0.5 at 100) loses the branch entirely."""
    res = torch.full((4, 64), 100.0, dtype=torch.bfloat16)
    x = _data((4, 64), 170, torch.bfloat16, scale=0.05, shift=0.0)
    dy = _data((4, 64), 171, torch.bfloat16, scale=1.0, shift=0.0)
    want = _oracle(x, res, dy=dy)
    sc = _Scales.of(x, res, dy=dy)
    # A bf16 gradient is held to 2^-8 of its row's magnitude (amp = rstd * |h| is 2000 here,
    # which leaves _check's bound for a bf16-stored h no teeth).
    bound = 2.0 ** -8 * want.dx.abs().amax(-1, keepdim=True)
    return x, res, dy, want, bound, sc


def test_bfloat16_float32_stream_gradient_exact(compiled):
    """With residual_in_fp32 the backward sees the exact h: dx within a bf16 rounding of
    the gradient's own magnitude, even where h's bf16 rounding would lose the branch."""
    x, res, dy, want, bound, sc = _stream_case()
    got = _run(add_norm, x, res, dy=dy, residual_in_fp32=True)
    _assert_close(got.dx, want.dx, _ulp(want.dx, torch.bfloat16) + bound, "dx, float32 stream")
    # y is right with a bf16 stream too: it is normalized from the float32 h (a large mean:
    # bounded as in test_large_mean)
    y = add_norm(x, res)
    _assert_close(y, want.y, _ulp(want.y, torch.bfloat16) + LARGE_MEAN_TOL * sc.y
                  + Y_TOL * sc.y_centred, "y, bf16 stream")


def test_bfloat16_stream_gradient_at_rounded_h(compiled):
    # With a bf16 residual stream the backward recomputes h exactly from x and the residual
    # (statistics of the unrounded h); xhat from the rounded h would be wrong by O(1) for
    # rows whose spread is below h's bf16 resolution.
    x, res, dy, want, bound, _ = _stream_case()
    got = _run(add_norm, x, res, dy=dy)
    _assert_close(got.dx, want.dx, _ulp(want.dx, torch.bfloat16) + bound, "dx, bf16 stream")


def _mixed_case(x_dtype, res_dtype):
    x, res, w, b, dy = _case((6, 80), 175, dtype=x_dtype, residual_dtype=res_dtype)
    dh = _data((6, 80), 176, res_dtype, scale=1.0, shift=0.0)
    got = _run(add_norm, x, res, w, b, dy=dy, dh=dh)
    want = _oracle(x, res, w, b, dy=dy, dh=dh)
    return x, res, w, got, want, _Scales.of(x, res, w, b, dy=dy, dh=dh)


@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
def test_mixed_dtypes(x_dtype, res_dtype, only_compiled):
    """x and the residual stream in different dtypes: h takes the residual's dtype, y x's;
    the gradient of h (hence of x and of the residual) is computed in float32 and rounded
    to the wider of the two dtypes; the narrower one's gradient is that, cast."""
    x, res, w, got, want, sc = _mixed_case(x_dtype, res_dtype)
    assert (got.y.dtype, got.h.dtype) == (x_dtype, res_dtype)
    assert (got.dx.dtype, got.dres.dtype) == (x_dtype, res_dtype)
    _check(dataclasses.replace(got, dres=None), dataclasses.replace(want, dres=None), sc, x=x,
           residual=res, weight=w, what=f"{x_dtype} + {res_dtype}")
    if res_dtype.itemsize > x_dtype.itemsize:
        _same(got.dx, got.dres.to(x_dtype), "dx = dres in x's dtype")
    else:
        _same(got.dres, got.dx.to(res_dtype), "dres = dx in the residual's dtype")
    tol = TOL[torch.bfloat16]
    _assert_close(got.dres, want.dres, _ulp(want.dres, torch.bfloat16) + tol * sc.dx, "dres")


def test_float32_stream_gradient_kept_in_float32(compiled):
    # The gradient of a float32 residual stream (residual_in_fp32 passed on to the next
    # block with a bf16 branch x) is computed in float32, not rounded to bf16 per block.
    _, _, _, got, want, sc = _mixed_case(torch.bfloat16, torch.float32)
    _assert_close(got.dres, want.dres, _ulp(want.dres, torch.float32) + 1e-5 * sc.dx,
                  "float32 residual gradient")


# --------------------------------------------------------------------------------------------
# 8. hypothesis properties


@st.composite
def cases(draw):
    rows = draw(st.integers(1, 17))
    n = draw(st.one_of(st.integers(1, 300),
                       st.sampled_from([1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 257])))
    lead = draw(st.sampled_from([(), (1,), (2,)]))
    return {
        "shape": (*lead, rows, n),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "kind": draw(st.sampled_from(KINDS)),
        "eps": draw(st.sampled_from([1e-6, 1e-5, 1e-3, 0.25])),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "residual": draw(st.booleans()),
        "weight": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "prenorm": draw(st.booleans()),
        "residual_in_fp32": draw(st.booleans()),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


@HYPOTHESIS
@given(cases())
def test_property_matches_float64_oracle(compiled, case):
    shape, dtype, kind, eps = case["shape"], case["dtype"], case["kind"], case["eps"]
    x, res, w, b, dy = _case(shape, case["seed"], dtype=dtype, residual=case["residual"],
                             weight=case["weight"], bias=case["bias"], kind=kind)
    h_dtype = _h_dtype(x, res, case["residual_in_fp32"])
    dh = _data(shape, case["seed"] + 7, h_dtype, scale=1.0, shift=0.0) if case["prenorm"] else None
    layout = case["layout"]
    views = [None if t is None else _as_layout(t, layout) for t in (x, res, dy)]
    got = _run(add_norm, views[0], views[1], w, b, kind=kind, eps=eps, dy=views[2], dh=dh,
               prenorm=case["prenorm"], residual_in_fp32=case["residual_in_fp32"])
    want = _oracle(x, res, w, b, kind=kind, eps=eps, dy=dy, dh=dh, prenorm=case["prenorm"])
    sc = _Scales.of(x, res, w, b, kind=kind, eps=eps, dy=dy, dh=dh)
    assert got.y.shape == x.shape
    _check(got, want, sc, x=x, residual=res, weight=w,
           residual_in_fp32=case["residual_in_fp32"], what=str(case))


# --------------------------------------------------------------------------------------------
# 9. non-temporal (streaming) stores


class _NontemporalSpy:
    """Wraps the compiled module and records the ``nontemporal`` flag of every call (the
    argument before the last, ``relu``)."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def add_norm_fwd(self, *args):
        self.calls.append(("fwd", args[-2]))
        return self.module.add_norm_fwd(*args)

    def add_norm_bwd(self, *args):
        self.calls.append(("bwd", args[-2]))
        return self.module.add_norm_bwd(*args)

    def __getattr__(self, name):  # everything else (the output allocator): the module's
        return getattr(self.module, name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,nontemporal", [(1100, True), (1000, False)])
def test_streaming_threshold_matches_oracle(rows, nontemporal, kind, only_compiled, monkeypatch):
    """1100 x 1024 float32 outputs (4.3 MiB) are written with streaming stores, 1000 x 1024
    (3.9 MiB) with ordinary ones; both match the oracle."""
    shape = (rows, 1024)
    monkeypatch.setattr(cpu, "NONTEMPORAL_BYTES", 4 << 20)  # the mechanism, not the tuned value
    assert (rows * 1024 * 4 >= cpu.NONTEMPORAL_BYTES) == nontemporal
    spy = _NontemporalSpy(cpu.load())
    monkeypatch.setitem(cpu._state, "module", spy)
    x, res, w, b, dy = _case(shape, 110, kind=kind)
    dh = _data(shape, 111, scale=1.0, shift=0.0)
    got = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh)
    assert spy.calls == [("fwd", nontemporal), ("bwd", nontemporal)]
    want = _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh)
    _check(got, want, _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh), x=x, residual=res,
           what=f"{rows} rows")


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("n", [1024, 100, 35])
@pytest.mark.parametrize("kind", KINDS)
def test_streaming_and_normal_stores_identical(kind, n, activation, only_compiled, monkeypatch):
    """Both store paths forced on the same input give the same bits (the streamed rows are
    computed in registers and stored from there, the others through L1). With n = 100 some
    rows start 64-byte aligned (streamed, with a tail) and some do not (ordinary stores)."""
    x, res, w, b, dy = _case((9, n), 120, kind=kind)
    dh = _data((9, n), 121, scale=1.0, shift=0.0)
    runs, plain = [], []
    for threshold in (0, 1 << 62):
        monkeypatch.setattr(cpu, "NONTEMPORAL_BYTES", threshold)
        runs.append(_run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh, activation=activation))
        plain.append(_run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh))
    for name, a in runs[0].fields().items():
        _same(a, getattr(runs[1], name), f"streamed vs ordinary: {name}")
    if activation == "relu":  # the ReLU of the same z: exactly the clamped plain output
        for run, base in zip(runs, plain):
            _same(run.y, base.y.clamp_min(0), "relu(y) vs clamped y")
        assert bool((runs[0].y == 0).any()) and bool((runs[0].y > 0).any())
        return
    _check(runs[0], _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh),
           _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh), x=x, residual=res, what="streamed")


@pytest.mark.parametrize("nontemporal", [False, True])
@pytest.mark.parametrize("n", [1024, 100])
@pytest.mark.parametrize("kind", KINDS)
def test_rows_in_blocks_equal_rows_alone(kind, n, nontemporal, only_compiled, monkeypatch):
    """The forward takes a row's centred sum of squares inside the next row's loop (rows
    of one block) or in a loop of its own (a block's last row): the same operations in the
    same order, so each row of a 70-row input gives the bits it gives alone."""
    monkeypatch.setattr(cpu, "NONTEMPORAL_BYTES", 0 if nontemporal else 1 << 62)
    x, res, w, b, _ = _case((70, n), 130, kind=kind)
    together = add_norm(x, res, w, b, kind=kind, prenorm=True)
    for i in range(x.shape[0]):
        alone = add_norm(x[i:i + 1], res[i:i + 1], w, b, kind=kind, prenorm=True)
        for got, want, name in zip(together, alone, ("y", "h")):
            _same(got[i:i + 1], want, f"row {i}: {name}")


# --------------------------------------------------------------------------------------------
# 10. fallbacks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_fallback_dtypes(kind, dtype, reference_calls):
    x, res, w, b, dy = _case((5, 40), 130, dtype=dtype, kind=kind, param_dtype=dtype)
    dh = _data((5, 40), 131, dtype, scale=1.0, shift=0.0)
    assert kernel_name(x) == "reference"
    got = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh)
    assert reference_calls == {"forward": 1, "backward": 1}
    _check(got, _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh),
           _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh), x=x, residual=res, what=str(dtype))


def test_default_path_small_input():
    """Whatever path ``add_norm`` takes by default for a small input, it matches the oracle."""
    x, res, w, b, dy = _case((3, 24), 135)
    monkeypatch = pytest.MonkeyPatch()
    if _STOCK_BELOW is not None:  # undo the module's autouse fixture, for this test only
        monkeypatch.setattr(ops, "STOCK_BELOW", _STOCK_BELOW)
    try:
        got = _run(add_norm, x, res, w, b, dy=dy, dh=dy)
    finally:
        monkeypatch.undo()
    _check(got, _oracle(x, res, w, b, dy=dy, dh=dy), _Scales.of(x, res, w, b, dy=dy, dh=dy),
           x=x, residual=res, what="default path")


@pytest.mark.parametrize("kind,dtype,stock", [("layer", torch.float32, True),
                                               ("layer", torch.bfloat16, False),
                                               ("rms", torch.float32, False)])
def test_default_path_without_residual(kind, dtype, stock, compiled, monkeypatch):
    """By default a float32 layer norm with nothing to add runs stock F.layer_norm (the
    compiled kernel is not called); bfloat16 and RMS norm keep the kernel. Both match the
    oracle, gradients included."""
    monkeypatch.setattr(ops, "STOCK_PLAIN_LAYER_NORM", True)
    spy = _NontemporalSpy(cpu.load())
    monkeypatch.setitem(cpu._state, "module", spy)
    x, _, w, b, dy = _case((6, 40), 136, dtype=dtype, residual=False, kind=kind)
    dh = _data((6, 40), 137, dtype, scale=1.0, shift=0.0)
    assert kernel_name(x, with_residual=False, kind=kind) == ("stock" if stock else "compiled cpu")
    assert kernel_name(x, kind=kind) == "compiled cpu"   # with a residual: the kernel
    got = _run(add_norm, x, None, w, b, kind=kind, dy=dy, dh=dh)
    assert (spy.calls == []) == stock
    _check(got, _oracle(x, None, w, b, kind=kind, dy=dy, dh=dh),
           _Scales.of(x, None, w, b, kind=kind, dy=dy, dh=dh), x=x, weight=w,
           what=f"{kind} {dtype} without residual")


def test_resnorm_kernels_reference_environment():
    code = ("import torch\n"
            "from resnorm import kernels as k\n"
            "x = torch.randn(4, 8)\n"
            "y, h = k.add_norm(x, x, prenorm=True)\n"
            "assert torch.allclose(y, k.add_norm_reference(x, x), atol=1e-6)\n"
            "print(k.kernel_name(torch.randn(2048, 1024)), k.cpu.status()['reason'])\n")
    env = dict(os.environ, RESNORM_KERNELS="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "reference", out.stdout
    assert "RESNORM_KERNELS=reference" in out.stdout, out.stdout


# --------------------------------------------------------------------------------------------
# 11. bad arguments

X = torch.zeros(2, 3)


@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"x": [[1.0, 2.0]]}, TypeError, r"x must be a torch\.Tensor, got list"),
    ({"x": X, "residual": torch.zeros(2, 4)}, ValueError,
     r"residual must have shape \(2, 3\), got \(2, 4\)"),
    ({"x": X, "residual": [1.0]}, TypeError,
     r"residual must be a torch\.Tensor or None, got list"),
    ({"x": X, "weight": torch.ones(4)}, ValueError, r"weight must have shape \(3,\), got \(4,\)"),
    ({"x": X, "weight": torch.ones(2, 3)}, ValueError,
     r"weight must have shape \(3,\), got \(2, 3\)"),
    ({"x": X, "bias": torch.zeros(5)}, ValueError, r"bias must have shape \(3,\), got \(5,\)"),
    ({"x": X, "bias": torch.zeros(3), "kind": "rms"}, ValueError,
     r"bias.*kind='rms'.*bias=None"),
    ({"x": torch.zeros(2, 3, dtype=torch.int64)}, TypeError,
     r"x has dtype torch\.int64; accepted: float32, bfloat16, float16, float64"),
    ({"x": torch.zeros(2, 3, dtype=torch.complex64)}, TypeError,
     r"x has dtype torch\.complex64; accepted: float32"),
    ({"x": X, "weight": torch.ones(3, dtype=torch.int32)}, TypeError,
     r"weight has dtype torch\.int32; accepted"),
    ({"x": X, "kind": "batch"}, ValueError,
     r"kind='batch' is not supported; accepted values: 'layer', 'rms'"),
    ({"x": X, "activation": "gelu"}, ValueError,
     r"activation='gelu' is not supported; accepted values: 'identity', 'relu'"),
    ({"x": X, "eps": -1e-5}, ValueError, r"eps must be in \[0, inf\], got -1e-05"),
    ({"x": X, "eps": float("nan")}, ValueError, r"eps must be in \[0, inf\], got nan"),
    ({"x": X, "eps": "small"}, TypeError, r"eps must be a number, got 'small'"),
    ({"x": torch.zeros(2, 0)}, ValueError,
     r"x must have a non-empty last dimension, got shape \(2, 0\)"),
    ({"x": torch.tensor(1.0)}, ValueError, r"non-empty last dimension, got shape \(\)"),
])
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        add_norm(**kwargs)


# --------------------------------------------------------------------------------------------
# 12. threads


@pytest.mark.parametrize("kind", KINDS)
def test_one_thread_vs_two(kind, threads, compiled):
    """Rows are split over threads (16384 // 256 = 64 rows per task: 8 tasks here); each row
    is computed the same way, so y, h and dx are bit-equal; the weight and bias gradients
    are summed from per-thread partial sums, so they agree to rounding."""
    shape = (512, 256)
    x, res, w, b, dy = _case(shape, 140, kind=kind)
    dh = _data(shape, 141, scale=1.0, shift=0.0)
    runs = []
    for count in (1, 2):
        torch.set_num_threads(count)
        assert torch.get_num_threads() == count
        runs.append(_run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh))
    torch.set_num_threads(threads)
    one, two = runs
    for name in ("y", "h", "dx", "dres"):
        _same(getattr(two, name), getattr(one, name), f"{name}: 2 threads vs 1")
    sc = _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh)
    _assert_close(two.dw, one.dw, 1e-5 * sc.dw, "dweight: 2 threads vs 1")
    if kind == "layer":
        _assert_close(two.db, one.db, 1e-5 * sc.db, "dbias: 2 threads vs 1")
    _check(two, _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh), sc, x=x, residual=res,
           what="2 threads")


@pytest.mark.parametrize("shape", [(2000, 35), (77, 1024), (70, 4096), (5, 40000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 2])
def test_row_blocks(shape, dtype, count, threads, only_compiled):
    """Each thread walks its rows in blocks of 128 KiB of float32 (936 rows of 35, 32 of
    1024, 8 of 4096, one row of 40000): whole blocks, a partial last one and blocks split
    between threads all match the oracle, in both directions."""
    torch.set_num_threads(count)
    x, res, w, b, dy = _case(shape, 145, dtype=dtype, kind="layer")
    dh = _data(shape, 146, dtype, scale=1.0, shift=0.0)
    got = _run(add_norm, x, res, w, b, kind="layer", dy=dy, dh=dh)
    torch.set_num_threads(threads)
    _check(got, _oracle(x, res, w, b, kind="layer", dy=dy, dh=dh),
           _Scales.of(x, res, w, b, kind="layer", dy=dy, dh=dh), x=x, residual=res,
           weight=w, what=f"{shape} {dtype}, {count} threads")


# --------------------------------------------------------------------------------------------
# 13. zero rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_rows(kind, shape, dtype):
    x, res, w, b, dy = _case(shape, 150, dtype=dtype, kind=kind, param_dtype=dtype)
    got = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=torch.zeros(shape, dtype=dtype))
    assert got.y.shape == shape and got.h.shape == shape
    assert got.dx.shape == shape and got.dres.shape == shape
    assert got.dw.shape == (8,) and torch.equal(got.dw, torch.zeros(8, dtype=dtype))
    if kind == "layer":
        assert got.db.shape == (8,) and torch.equal(got.db, torch.zeros(8, dtype=dtype))


# --------------------------------------------------------------------------------------------
# 14. prenorm without a residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_prenorm_without_residual_returns_x(kind, dtype):
    x, _, w, b, dy = _case((4, 33), 160, dtype=dtype, residual=False, kind=kind,
                           param_dtype=dtype)
    dh = _data((4, 33), 161, dtype, scale=1.0, shift=0.0)
    xl = x.clone().requires_grad_()
    _, h = add_norm(xl, None, w, b, kind=kind, prenorm=True)
    assert h is xl
    # residual_in_fp32 with float32 (or float64) input: still x itself
    assert add_norm(xl, kind=kind, prenorm=True, residual_in_fp32=True)[1] is xl
    # gradients reaching h flow into x, added to those coming through y
    got = _run(add_norm, x, None, w, b, kind=kind, dy=dy, dh=dh)
    assert got.h_is_x
    want = _oracle(x, None, w, b, kind=kind, dy=dy, dh=dh)
    sc = _Scales.of(x, None, w, b, kind=kind, dy=dy, dh=dh)
    _check(got, want, sc, x=x, weight=w, what="no residual")
    only_y = _run(add_norm, x, None, w, b, kind=kind, dy=dy, dh=None)
    _assert_close(got.dx, only_y.dx + dh, 2 * _ulp(got.dx, dtype), "dx = dx through y + dh")


# --------------------------------------------------------------------------------------------
# 15. the output pool

MiB = 1 << 20


@pytest.fixture
def pool(compiled):
    """A pool serving outputs of 1 MiB and more (the default is 4 MiB), empty at the start;
    the process's settings come back afterwards."""
    before = cpu.pool_stats()
    cpu.empty_cache()
    yield cpu.configure_pool(enabled=True, min_bytes=MiB, max_cached=64 * MiB)
    cpu.configure_pool(enabled=before["min_bytes"] >= 0, min_bytes=cpu.POOL_MIN_BYTES,
                       max_cached=before["max_cached"])
    cpu.empty_cache()


def _pooled_case(kind, seed=170):
    x, res, w, b, dy = _case((300, 1024), seed, kind=kind)      # 1.2 MiB per float32 output
    return x, res, w, b, dy, _data((300, 1024), seed + 1, scale=1.0, shift=0.0)


def _counts(stats):
    return stats["hits"], stats["misses"]


@pytest.mark.parametrize("kind", KINDS)
def test_pool_outputs_match_oracle_and_unpooled(kind, only_compiled, pool):
    x, res, w, b, dy, dh = _pooled_case(kind)
    hits, misses = _counts(pool)
    got = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh)
    assert _counts(cpu.pool_stats()) == (hits, misses + 3)     # y, h forward; dx backward
    hits, misses = _counts(cpu.pool_stats())
    _check(got, _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh),
           _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh), x=x, residual=res, what="pooled")
    cpu.configure_pool(enabled=False)
    plain = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh)
    assert _counts(cpu.pool_stats()) == (hits, misses)        # off: the pool was not asked
    for name, a in got.fields().items():
        _same(a, getattr(plain, name), f"pooled vs PyTorch's allocator: {name}")


def test_pool_reuses_freed_blocks_huge_page_aligned(only_compiled, pool):
    x, res, w, b, _, _ = _pooled_case("layer")
    hits, misses = _counts(pool)
    y, h = add_norm(x, res, w, b, prenorm=True)
    first = {y.data_ptr(), h.data_ptr()}
    assert all(p % (2 * MiB) == 0 for p in first)  # mapped on huge-page boundaries
    del y, h
    stats = cpu.pool_stats()
    assert stats["cached_blocks"] == 2 and stats["cached_bytes"] == 4 * MiB  # 2 MiB granules
    y, h = add_norm(x, res, w, b, prenorm=True)
    assert {y.data_ptr(), h.data_ptr()} == first
    assert _counts(cpu.pool_stats()) == (hits + 2, misses + 2)
    assert cpu.pool_stats()["cached_blocks"] == 0
    torch.testing.assert_close(y, F.layer_norm(x + res, (1024,), w, b), rtol=0, atol=1e-5)


def test_pool_hands_out_the_most_recently_freed_block(only_compiled, pool):
    """Last in, first out among blocks of one size: the block freed last is the one most
    likely still in cache (first in, first out handed out the coldest)."""
    module = cpu.load()
    gc.collect()  # no other test's pooled tensor may be freed in between
    gc.disable()
    try:
        blocks = [module.empty_output(300, 1024, torch.float32) for _ in range(3)]
        addresses = [t.data_ptr() for t in blocks]
        del blocks[1]                      # freed first
        del blocks[-1]                     # freed last
        assert cpu.pool_stats()["cached_blocks"] == 2
        again = [module.empty_output(300, 1024, torch.float32) for _ in range(2)]
        assert [t.data_ptr() for t in again] == [addresses[2], addresses[1]]
        assert cpu.pool_stats()["cached_blocks"] == 0
    finally:
        gc.enable()


def test_pool_cap_and_empty_cache(only_compiled, pool):
    x, res, w, b, _, _ = _pooled_case("rms")
    cpu.configure_pool(max_cached=2 * MiB)          # room for one of the two 2 MiB blocks
    y, h = add_norm(x, res, w, None, kind="rms", prenorm=True)
    del y, h
    stats = cpu.pool_stats()
    assert stats["cached_bytes"] == 2 * MiB
    assert stats["released_blocks"] == pool["released_blocks"] + 1
    cpu.configure_pool(max_cached=0)                # lowering the cap releases at once
    assert cpu.pool_stats()["cached_bytes"] == 0
    cpu.configure_pool(max_cached=64 * MiB)
    y, h = add_norm(x, res, w, None, kind="rms", prenorm=True)
    del y, h
    assert cpu.pool_stats()["cached_blocks"] == 2
    cpu.empty_cache()
    assert cpu.pool_stats()["cached_bytes"] == 0 and cpu.pool_stats()["cached_blocks"] == 0


def test_pool_tensors_behave_like_any_other(only_compiled, pool, tmp_path):
    x, res, w, b, _, _ = _pooled_case("layer")
    y = add_norm(x, res, w, b)
    want = y.clone()
    torch.save(y, tmp_path / "y.pt")
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), want,
                               rtol=0, atol=0)
    y.resize_(600, 1024)                            # grows: a new block, the old data kept
    torch.testing.assert_close(y[:300], want, rtol=0, atol=0)
    y.share_memory_()                               # moved to shared memory; block freed
    assert y.is_shared()
    torch.testing.assert_close(y[:300], want, rtol=0, atol=0)
    z = add_norm(x, res, w, b) * 2 + 1              # pooled outputs feed stock ops
    torch.testing.assert_close(z, want * 2 + 1, rtol=0, atol=0)


def test_pool_settings_checked(compiled):
    with pytest.raises(ValueError, match=r"configure_pool: min_bytes must be a non-negative "
                                         r"int, got -1"):
        cpu.configure_pool(min_bytes=-1)
    with pytest.raises(ValueError, match=r"max_cached must be a non-negative int, got 1\.5"):
        cpu.configure_pool(max_cached=1.5)
    with pytest.raises(TypeError, match=r"enabled must be True, False or None, got 'yes'"):
        cpu.configure_pool(enabled="yes")


@pytest.mark.parametrize("text,value", [("0", 0), ("4096", 4096), ("4K", 4096),
                                        ("1.5M", 3 << 19), ("2GiB", 2 << 30), ("1gb", 1 << 30),
                                        ("3 T", 3 << 40)])
def test_parse_bytes(text, value):
    assert cpu.parse_bytes("RESNORM_POOL_MAX_CACHED", text) == value


@pytest.mark.parametrize("text", ["", "G", "12x", "-1", "1.5.2M", "four"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match=rf"RESNORM_POOL_MAX_CACHED='{re.escape(text)}' is not "
                                         r"a byte count; accepted: a non-negative number"):
        cpu.parse_bytes("RESNORM_POOL_MAX_CACHED", text)


@pytest.mark.parametrize("env,expect", [
    ({"RESNORM_POOL": "off", "RESNORM_POOL_MAX_CACHED": "256M"}, "-1 268435456"),
    ({"RESNORM_POOL": "on"}, f"{4 << 20} "),
    ({"RESNORM_POOL": "maybe"}, "ValueError: RESNORM_POOL='maybe' is not accepted; accepted: "
                                "on, off"),
    ({"RESNORM_POOL_MAX_CACHED": "lots"}, "ValueError: RESNORM_POOL_MAX_CACHED='lots' is not a "
                                          "byte count"),
])
def test_pool_environment(env, expect, compiled):
    code = ("from resnorm.kernels import cpu\n"
            "try:\n"
            "    s = cpu.status()['pool']\n"
            "    print(s['min_bytes'], s['max_cached'])\n"
            "except ValueError as e:\n"
            "    print(f'ValueError: {e}')\n")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(expect), out.stdout


def test_pool_in_forked_child(compiled):
    """A forked child (a DataLoader worker, say) allocates from the pool it inherited and gets
    the parent's results; the pool's lock is taken around fork, so a fork cannot leave it
    held. The child runs one intra-op thread, as DataLoader workers do: GNU OpenMP, under
    PyTorch's own ops as under this kernel, hangs in a forked child whose parent used it."""
    code = ("import multiprocessing as mp, torch\n"
            "from resnorm.kernels import add_norm, cpu, ops\n"
            "cpu.configure_pool(min_bytes=1 << 20)\n"
            "torch.manual_seed(0)\n"
            "x, r = torch.randn(300, 1024), torch.randn(300, 1024)\n"
            "ops.STOCK_BELOW = 0\n"
            "def child(_):\n"
            "    torch.set_num_threads(1)\n"
            "    y, h = add_norm(x, r, prenorm=True)\n"
            "    return float(y.double().sum()), float(h.double().sum()), cpu.pool_stats()['hits']\n"
            "y, h = add_norm(x, r, prenorm=True)\n"
            "del y, h\n"
            "y, h = add_norm(x, r, prenorm=True)\n"
            "want = (float(y.double().sum()), float(h.double().sum()))\n"
            "del y, h\n"
            "with mp.get_context('fork').Pool(1) as pool:\n"
            "    got = pool.map(child, [0, 1])\n"
            "assert all(g[:2] == want for g in got), (got, want)\n"
            "assert all(g[2] >= 2 for g in got), got\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok", out.stdout


# --------------------------------------------------------------------------------------------
# 16. the fused ReLU


def _masked_reference(mask: Tensor):
    """The float64 oracle with the ReLU applied through a given mask (the kernel's own, y > 0):
    where the kernel's mask and the sign of the exact z differ, |z| is within rounding of 0
    (``_assert_mask_within_rounding``), and the gradients follow the mask the forward used."""
    def fn(x, residual, weight, bias, *, kind, eps, prenorm, residual_in_fp32):
        out = add_norm_reference(x, residual, weight, bias, kind, eps, prenorm, residual_in_fp32)
        y, h = out if prenorm else (out, None)
        y = y * mask.to(y.dtype)
        return (y, h) if prenorm else y
    return fn


def _exact_z(x, res, w, b, kind, eps=1e-5):
    return add_norm_reference(*(None if t is None else t.double() for t in (x, res, w, b)),
                              kind=kind, eps=eps)


def _assert_mask_within_rounding(y: Tensor, z: Tensor, bound: Tensor) -> None:
    flips = (y > 0) != (z > 0)
    assert bool((z.abs()[flips] <= bound.expand_as(z)[flips]).all()), \
        f"{int(flips.sum())} mask flips beyond rounding"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_relu_matches_float64_oracle(kind, with_residual, dtype, only_compiled):
    shape = (3, 7, 200)  # 21 rows of twelve 16-lane blocks and a tail of 8
    x, res, w, b, dy = _case(shape, 300, kind=kind, dtype=dtype, residual=with_residual)
    dh = _data(shape, 301, dtype=_h_dtype(x, res, False), scale=1.0, shift=0.0)
    got = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh, activation="relu")
    z = _exact_z(x, res, w, b, kind)
    sc = _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh)
    y_bound = _ulp(z, x.dtype) + Y_TOL * sc.y
    zeros = float((got.y == 0).double().mean())
    assert 0.2 < zeros < 0.8, zeros  # both sides of the kink are exercised
    _assert_close(got.y, torch.relu(z), y_bound, "y vs relu(exact z)")
    _assert_mask_within_rounding(got.y, z, y_bound)
    want = _run(_masked_reference((got.y > 0).double()), *(None if t is None else t.double()
                for t in (x, res, w, b)), kind=kind, dy=dy.double(), dh=dh.double())
    _check(got, want, sc, x=x, residual=res, weight=w, what=f"relu {kind} {dtype}")
    # The check has teeth: the gradients without the ReLU's mask are far off.
    unmasked = _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh)
    with pytest.raises(AssertionError):
        _check(got, dataclasses.replace(unmasked, y=want.y), sc, x=x, residual=res, weight=w)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", LAYOUTS)
def test_relu_layouts_bit_equal(kind, how, only_compiled):
    shape = (6, 45)
    x, res, w, b, dy = _case(shape, 310, kind=kind)
    base = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dy, activation="relu")
    laid = _run(add_norm, _as_layout(x, how), _as_layout(res, how), w, b, kind=kind,
                dy=_as_layout(dy, how), dh=_as_layout(dy, how), activation="relu")
    for name, value in base.fields().items():
        _same(getattr(laid, name), value, f"{how}: {name}")


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_relu_gradcheck_float64(kind, with_residual, reference_calls):
    x, res, w, b, _ = _case((3, 8), 320, dtype=torch.float64, residual=with_residual,
                            kind=kind, param_dtype=torch.float64)
    names = [name for name, t in (("x", x), ("residual", res), ("weight", w), ("bias", b))
             if t is not None]
    inputs = tuple(t.detach().requires_grad_() for t in (x, res, w, b) if t is not None)

    def fn(*tensors):
        return add_norm(**dict(zip(names, tensors)), kind=kind, eps=1e-3, prenorm=True,
                        activation="relu")

    y, _ = fn(*inputs)
    assert bool((y == 0).any()) and bool((y > 0).any())
    assert torch.autograd.gradcheck(fn, inputs)
    assert reference_calls["backward"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_relu_stock_path_matches_kernel(kind, compiled, monkeypatch):
    """Small inputs run stock ops (F.layer_norm then F.relu); they agree with the kernel."""
    x, res, w, b, dy = _case((5, 64), 330, kind=kind)
    kernel = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dy, activation="relu")
    monkeypatch.setattr(ops, "STOCK_BELOW", _STOCK_BELOW)
    assert kernel_name(x, kind=kind, activation="relu") == "stock"
    stock = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dy, activation="relu")
    sc = _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dy)
    _assert_close(stock.y, kernel.y, 2 * Y_TOL * sc.y, "y")
    assert torch.equal(stock.y > 0, kernel.y > 0)
    for name, scale in (("dx", sc.dx), ("dres", sc.dx), ("dw", sc.dw), ("db", sc.db)):
        if getattr(kernel, name) is not None:
            _assert_close(getattr(stock, name), getattr(kernel, name), 2e-5 * scale, name)


def test_relu_plain_layer_norm_runs_the_kernel(compiled, monkeypatch):
    """Without a residual, a float32 layer norm runs stock F.layer_norm, but not with the
    ReLU fused: one pass instead of two."""
    monkeypatch.setattr(ops, "STOCK_PLAIN_LAYER_NORM", True)
    monkeypatch.setattr(ops, "STOCK_BELOW", 0)
    x = torch.zeros(4, 32)
    assert kernel_name(x, with_residual=False) == "stock"
    assert kernel_name(x, with_residual=False, activation="relu") == "compiled cpu"


def _relu_block(x, residual, weight, bias):
    y, h = add_norm(x, residual, weight, bias, kind="layer", prenorm=True, activation="relu")
    return y * 2.0 + h


def test_relu_compile_one_graph_matches_eager(compiled):
    torch._dynamo.reset()
    fn, graphs = _compile_counting(_relu_block)
    runs = _eager_and_compiled(fn, eager_fn=_relu_block)
    assert len(graphs) == 1
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.resnorm.add_norm_fwd.default) == 1, targets
    for a, b, name in zip(*runs, ("out", "dx", "dres", "dw", "db")):
        _same(b, a, f"compiled vs eager {name}")
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# 17. portability


@pytest.mark.slow
def test_builds_and_matches_without_avx512(compiled):
    """The kernel's AVX-512 code (register-streamed stores) has fallbacks that this
    machine's native build never compiles: build the source for AVX2 and compare."""
    import platform

    from torch.utils import cpp_extension

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"AVX2 is an x86-64 build; this machine is {platform.machine()}")
    name = f"resnorm_add_norm_cpu_avx2_{cpu.build_key()}"
    directory = cpu.build_directory().parent / name
    directory.mkdir(parents=True, exist_ok=True)
    flags = [f for f in cpu.FLAGS if not f.startswith(("-march", "-mprefer"))]
    avx2 = cpp_extension.load(name=name, sources=[str(cpu.CSRC / f) for f in cpu.SOURCES],
                              build_directory=str(directory),
                              extra_cflags=flags + ["-march=x86-64-v3"], verbose=False)
    native = cpu.load()
    for rows, n in [(300, 768), (17, 100)]:
        x, res, w, b, dy = _case((rows, n), 400 + n)
        for nontemporal, relu in itertools.product((False, True), (False, True)):
            runs = []
            for module in (native, avx2):
                h = torch.empty(rows, n)
                y, mean, rstd = module.add_norm_fwd(x, res, w, b, False, 1e-5, h, nontemporal,
                                                    relu)
                dx = torch.empty(rows, n)
                dw, db = module.add_norm_bwd(dy, h, h, w, b, mean, rstd, False, True, True, dx,
                                             nontemporal, relu)
                runs.append((y, h, mean, rstd, dx, dw, db))
            names = ("y", "h", "mean", "rstd", "dx", "dw", "db")
            for got, want, what in zip(runs[1], runs[0], names):
                torch.testing.assert_close(
                    got, want, rtol=1e-5, atol=1e-5,
                    msg=lambda m: f"{rows}x{n} {nontemporal=} {relu=} {what}: {m}")
