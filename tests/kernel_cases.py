"""What the kernel tests share (``test_kernels_numerics.py``, ``test_kernels_integration.py``):
the fixtures that pick the kernel, the inputs of a case, ``add_norm`` run with its gradients,
the float64 oracle and the tolerances of the comparison with it.

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
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from resnorm.kernels import (
    add_norm_reference,
    cpu,
    ops,
    reference,
)

EPS32 = torch.finfo(torch.float32).eps
# tol of the gradients by the dtype h is stored in (see the module docstring); y: Y_TOL
TOL = {
    torch.float32: 1e-5,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.float64: 1e-12,
}
Y_TOL = 1e-5  # y is computed in float32 from the unrounded h, whatever the input dtype


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


# --------------------------------------------------------------------------------------------
# helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(shape, seed: int, dtype=torch.float32, scale: float = 2.0, shift: float = 0.7):
    """Random data with a non-zero mean and a non-unit variance (so normalization matters)."""
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale + shift).to(dtype)


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
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.numel()} elements off; worst "
            f"error/bound {ratio.max().item():.3g}, max error "
            f"{err.nan_to_num(nan=float('inf')).max().item():.3g}"
        )


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
        return {
            "y": self.y,
            "h": self.h,
            "dx": self.dx,
            "dres": self.dres,
            "dw": self.dw,
            "db": self.db,
        }


def _run(
    fn,
    x,
    residual=None,
    weight=None,
    bias=None,
    *,
    kind="layer",
    eps=1e-5,
    dy=None,
    dh=None,
    residual_in_fp32=False,
    prenorm=True,
    activation=None,
) -> Run:
    """Call ``fn`` (add_norm or the reference) on leaves sharing the inputs' memory and
    layout, then backpropagate ``dy`` into y and ``dh`` into h (either may be None)."""
    leaves = [
        None if t is None else t.detach().requires_grad_() for t in (x, residual, weight, bias)
    ]
    extra = {"activation": activation} if activation is not None else {}
    out = fn(
        *leaves, kind=kind, eps=eps, prenorm=prenorm, residual_in_fp32=residual_in_fp32, **extra
    )
    y, h = out if prenorm else (out, None)
    outputs, grads = [], []
    for tensor, grad in ((y, dy), (h, dh)):
        if grad is not None:
            outputs.append(tensor)
            grads.append(grad)
    if outputs:
        torch.autograd.backward(outputs, grads)
    grads = [None if t is None else t.grad for t in leaves]
    return Run(
        y.detach(),
        None if h is None else h.detach(),
        *grads,
        h_is_x=h is not None and h is leaves[0],
    )


def _oracle(
    x,
    residual=None,
    weight=None,
    bias=None,
    *,
    kind="layer",
    eps=1e-5,
    dy=None,
    dh=None,
    prenorm=True,
) -> Run:
    """The float64 oracle on float64 copies of the same values."""

    def f64(t):
        return None if t is None else t.detach().double().clone()

    return _run(
        add_norm_reference,
        f64(x),
        f64(residual),
        f64(weight),
        f64(bias),
        kind=kind,
        eps=eps,
        dy=f64(dy),
        dh=f64(dh),
        prenorm=prenorm,
    )


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
    def of(
        cls, x, residual=None, weight=None, bias=None, *, kind="layer", eps=1e-5, dy=None, dh=None
    ):
        h = x.detach().double()
        if residual is not None:
            h = h + residual.detach().double()
        n = h.shape[-1]
        centred = h - h.mean(-1, keepdim=True) if kind == "layer" else h
        rstd = (centred.square().mean(-1, keepdim=True) + eps).rsqrt()
        xhat = centred * rstd
        w = (
            weight.detach().double().abs()
            if weight is not None
            else torch.ones(n, dtype=torch.float64)
        )
        bmax = bias.detach().double().abs().max() if bias is not None else 0.0
        amp = rstd * h.abs().amax(-1, keepdim=True)
        y = amp * w.max() + bmax
        y_centred = rstd * centred.abs().amax(-1, keepdim=True) * w.max() + bmax
        dy = torch.zeros_like(h) if dy is None else dy.detach().double().abs()
        dh = torch.zeros_like(h) if dh is None else dh.detach().double().abs()
        g = dy * w
        dx = rstd * g.amax(-1, keepdim=True) * (
            1 + amp * (1 + xhat.abs().amax(-1, keepdim=True))
        ) + dh.amax(-1, keepdim=True)
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


def _check(
    got: Run,
    want: Run,
    sc: _Scales,
    *,
    x,
    residual=None,
    weight=None,
    residual_in_fp32=False,
    what="",
) -> None:
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
    dx = tol * sc.dx + tol**2 * sc.dx2
    for name, scale in (("dx", dx), ("dres", dx), ("dw", tol * sc.dw), ("db", tol * sc.db)):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, f"{what}: {name} should not exist"
            continue
        assert a is not None, f"{what}: no gradient {name}"
        _assert_close(a, b, _ulp(b, a.dtype) + scale, f"{what}: {name}")
    if got.dres is not None and got.dres.dtype == got.dx.dtype:
        _same(got.dx, got.dres, f"{what}: the gradients of x and of the residual")


def _case(
    shape,
    seed,
    *,
    dtype=torch.float32,
    residual=True,
    weight=True,
    bias=True,
    kind="layer",
    param_dtype=torch.float32,
    residual_dtype=None,
):
    """Inputs and upstream gradients of one test case."""
    n = shape[-1]
    x = _data(shape, seed, dtype)
    res = (
        _data(shape, seed + 1, residual_dtype or dtype, scale=1.5, shift=-0.3) if residual else None
    )
    w, b = _params(n, seed + 2, param_dtype, param_dtype)
    dy = _data(shape, seed + 4, dtype, scale=1.0, shift=0.1)
    return x, res, w if weight else None, b if bias and kind == "layer" else None, dy


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
