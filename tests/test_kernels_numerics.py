"""Tests of what ``resnorm.kernels.add_norm``, the fused residual add + layer/RMS norm,
computes: its results and gradients against a float64 oracle in every dtype, layout, store
path and split of the rows. How it plugs into PyTorch (the operator's registration,
``torch.compile``, dispatch and fallbacks, argument checks, the output pool, the build) is
tested in ``test_kernels_integration.py``; the fixtures, helpers and tolerances both use
are in ``kernel_cases.py``.

What is checked, and against what:

1. the compiled CPU kernel (float32) against the float64 oracle ``add_norm_reference`` run
   on float64 copies of the same inputs: y, the new residual stream h, and every gradient
   (x, residual, weight, bias), with random upstream gradients on y *and* h, for both kinds
   and every combination of the optional arguments; and that the compiled kernel, not the
   reference, did the work;
2. parity with the ``torch.nn`` twins (``nn.LayerNorm``/``F.layer_norm``,
   ``nn.RMSNorm``/``F.rms_norm``) applied to ``x + residual``;
3. large means (1e4 + noise): two-pass statistics hold float32 accuracy where a one-pass
   E[x^2] - E[x]^2 in float32 demonstrably fails the same bound;
4. non-contiguous inputs, weights and upstream gradients: bit-equal to contiguous ones;
5. bfloat16: y within one bf16 ulp of the oracle, ``residual_in_fp32``, gradients, x and
   residual in different dtypes;
6. hypothesis properties over shapes (vector tails), leading dims, layouts, dtypes, eps and
   kind;
7. the non-temporal (streaming) store path (outputs >= ``cpu.NONTEMPORAL_BYTES``) and the
   normal one;
8. one intra-op thread vs two; rows in blocks (whole, partial, split between threads);
9. zero rows;
10. ``prenorm=True`` without a residual returns x itself as h, and gradients still flow;
11. the fused ReLU (``activation="relu"``): y and every gradient against the float64
    oracle, the backward's mask (recomputed from h) against the forward's output, layouts.

Tolerances: see ``kernel_cases.py``.

``RESNORM_HYPOTHESIS_EXAMPLES`` raises the number of hypothesis examples for a longer run.
"""

from __future__ import annotations

import dataclasses
import os

import kernel_cases
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import (
    EPS32,
    TOL,
    Y_TOL,
    _assert_close,
    _case,
    _check,
    _data,
    _h_dtype,
    _NontemporalSpy,
    _oracle,
    _params,
    _run,
    _same,
    _Scales,
    _ulp,
    _within,
)
from torch import Tensor, nn

from resnorm.kernels import (
    KINDS,
    add_norm,
    add_norm_reference,
    cpu,
    kernel_name,
)

# The fixtures these tests share (kernel_cases.py), made this module's: pytest finds a
# module's fixtures by name, and the first one applies to every test here.
_through_the_operator = kernel_cases._through_the_operator
compiled = kernel_cases.compiled
only_compiled = kernel_cases.only_compiled

EXAMPLES = int(os.environ.get("RESNORM_HYPOTHESIS_EXAMPLES", "30"))
HYPOTHESIS = settings(max_examples=EXAMPLES, deadline=None)
LARGE_MEAN_TOL = 8 * EPS32  # of |h| * rstd: a few roundings of the inputs' magnitude
LAYOUTS = ("contiguous", "transposed", "column-strided", "row-strided")


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def threads():
    """Restores the intra-op thread count (conftest sets 1) after a test that changes it."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


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


CONFIGS = [
    (kind, res, w, b)
    for kind in KINDS
    for res in (False, True)
    for w in (False, True)
    for b in ((False, True) if kind == "layer" else (False,))
]


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("kind,with_residual,with_weight,with_bias", CONFIGS)
def test_compiled_kernel_matches_float64_oracle(
    kind, with_residual, with_weight, with_bias, prenorm, only_compiled
):
    # n = 200: twelve blocks of 16 partial sums and a tail of 8; 3-D input, 15 rows.
    shape = (3, 5, 200)
    x, res, w, b, dy = _case(
        shape, 10, residual=with_residual, weight=with_weight, bias=with_bias, kind=kind
    )
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
    functional = (
        F.layer_norm(x + res, (n,), w, b, eps)
        if kind == "layer"
        else F.rms_norm(x + res, (n,), w, eps)
    )
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
# 3. large means


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
# 4. non-contiguous inputs


@pytest.mark.parametrize(
    "x_layout,res_layout",
    [
        ("transposed", "row-strided"),
        ("column-strided", "transposed"),
        ("row-strided", "column-strided"),
        ("row-strided", "broadcast"),
    ],
)
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
    views = {
        "x": _as_layout(x, x_layout),
        "residual": res_view,
        "weight": _as_layout(w, "column-strided"),
        "bias": None if b is None else _as_layout(b, "column-strided"),
        "dy": _as_layout(dy, "transposed"),
        "dh": _as_layout(dh, "row-strided"),
    }
    assert not any(t.is_contiguous() for t in views.values() if t is not None)
    got = _run(
        add_norm,
        views["x"],
        views["residual"],
        views["weight"],
        views["bias"],
        kind=kind,
        dy=views["dy"],
        dh=views["dh"],
    )
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
    _check(
        got,
        _oracle(x, res, w, b, dy=dy),
        _Scales.of(x, res, w, b, dy=dy),
        x=x,
        residual=res,
        what="broadcast dy",
    )


# --------------------------------------------------------------------------------------------
# 5. bfloat16


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, None])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_matches_oracle(kind, residual_in_fp32, param_dtype, only_compiled):
    shape = (6, 136)  # 2 blocks of 64 and a tail of 8
    x, res, w, b, dy = _case(
        shape,
        100,
        dtype=torch.bfloat16,
        kind=kind,
        weight=param_dtype is not None,
        bias=param_dtype is not None,
        param_dtype=param_dtype or torch.float32,
    )
    h_dtype = torch.float32 if residual_in_fp32 else torch.bfloat16
    dh = _data(shape, 101, h_dtype, scale=1.0, shift=0.0)
    assert kernel_name(x) == "compiled cpu"
    got = _run(add_norm, x, res, w, b, kind=kind, dy=dy, dh=dh, residual_in_fp32=residual_in_fp32)
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
    _check(
        got, want, sc, x=x, residual=res, weight=w, residual_in_fp32=residual_in_fp32, what="bf16"
    )


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
    bound = 2.0**-8 * want.dx.abs().amax(-1, keepdim=True)
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
    _assert_close(
        y,
        want.y,
        _ulp(want.y, torch.bfloat16) + LARGE_MEAN_TOL * sc.y + Y_TOL * sc.y_centred,
        "y, bf16 stream",
    )


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


@pytest.mark.parametrize(
    "x_dtype,res_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_mixed_dtypes(x_dtype, res_dtype, only_compiled):
    """x and the residual stream in different dtypes: h takes the residual's dtype, y x's;
    the gradient of h (hence of x and of the residual) is computed in float32 and rounded
    to the wider of the two dtypes; the narrower one's gradient is that, cast."""
    x, res, w, got, want, sc = _mixed_case(x_dtype, res_dtype)
    assert (got.y.dtype, got.h.dtype) == (x_dtype, res_dtype)
    assert (got.dx.dtype, got.dres.dtype) == (x_dtype, res_dtype)
    _check(
        dataclasses.replace(got, dres=None),
        dataclasses.replace(want, dres=None),
        sc,
        x=x,
        residual=res,
        weight=w,
        what=f"{x_dtype} + {res_dtype}",
    )
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
    _assert_close(
        got.dres,
        want.dres,
        _ulp(want.dres, torch.float32) + 1e-5 * sc.dx,
        "float32 residual gradient",
    )


# --------------------------------------------------------------------------------------------
# 6. hypothesis properties


@st.composite
def cases(draw):
    rows = draw(st.integers(1, 17))
    n = draw(
        st.one_of(
            st.integers(1, 300), st.sampled_from([1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 257])
        )
    )
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
        "seed": draw(st.integers(0, 2**16)),
    }


@HYPOTHESIS
@given(cases())
def test_property_matches_float64_oracle(compiled, case):
    shape, dtype, kind, eps = case["shape"], case["dtype"], case["kind"], case["eps"]
    x, res, w, b, dy = _case(
        shape,
        case["seed"],
        dtype=dtype,
        residual=case["residual"],
        weight=case["weight"],
        bias=case["bias"],
        kind=kind,
    )
    h_dtype = _h_dtype(x, res, case["residual_in_fp32"])
    dh = _data(shape, case["seed"] + 7, h_dtype, scale=1.0, shift=0.0) if case["prenorm"] else None
    layout = case["layout"]
    views = [None if t is None else _as_layout(t, layout) for t in (x, res, dy)]
    got = _run(
        add_norm,
        views[0],
        views[1],
        w,
        b,
        kind=kind,
        eps=eps,
        dy=views[2],
        dh=dh,
        prenorm=case["prenorm"],
        residual_in_fp32=case["residual_in_fp32"],
    )
    want = _oracle(x, res, w, b, kind=kind, eps=eps, dy=dy, dh=dh, prenorm=case["prenorm"])
    sc = _Scales.of(x, res, w, b, kind=kind, eps=eps, dy=dy, dh=dh)
    assert got.y.shape == x.shape
    _check(
        got,
        want,
        sc,
        x=x,
        residual=res,
        weight=w,
        residual_in_fp32=case["residual_in_fp32"],
        what=str(case),
    )


# --------------------------------------------------------------------------------------------
# 7. non-temporal (streaming) stores


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
    _check(
        got,
        want,
        _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh),
        x=x,
        residual=res,
        what=f"{rows} rows",
    )


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
    _check(
        runs[0],
        _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh),
        _Scales.of(x, res, w, b, kind=kind, dy=dy, dh=dh),
        x=x,
        residual=res,
        what="streamed",
    )


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
        alone = add_norm(x[i : i + 1], res[i : i + 1], w, b, kind=kind, prenorm=True)
        for got, want, name in zip(together, alone, ("y", "h")):
            _same(got[i : i + 1], want, f"row {i}: {name}")


# --------------------------------------------------------------------------------------------
# 8. threads


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
    _check(
        two, _oracle(x, res, w, b, kind=kind, dy=dy, dh=dh), sc, x=x, residual=res, what="2 threads"
    )


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
    _check(
        got,
        _oracle(x, res, w, b, kind="layer", dy=dy, dh=dh),
        _Scales.of(x, res, w, b, kind="layer", dy=dy, dh=dh),
        x=x,
        residual=res,
        weight=w,
        what=f"{shape} {dtype}, {count} threads",
    )


# --------------------------------------------------------------------------------------------
# 9. zero rows


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
# 10. prenorm without a residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_prenorm_without_residual_returns_x(kind, dtype):
    x, _, w, b, dy = _case((4, 33), 160, dtype=dtype, residual=False, kind=kind, param_dtype=dtype)
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
# 11. the fused ReLU


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
    return add_norm_reference(
        *(None if t is None else t.double() for t in (x, res, w, b)), kind=kind, eps=eps
    )


def _assert_mask_within_rounding(y: Tensor, z: Tensor, bound: Tensor) -> None:
    flips = (y > 0) != (z > 0)
    assert bool((z.abs()[flips] <= bound.expand_as(z)[flips]).all()), (
        f"{int(flips.sum())} mask flips beyond rounding"
    )


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
    want = _run(
        _masked_reference((got.y > 0).double()),
        *(None if t is None else t.double() for t in (x, res, w, b)),
        kind=kind,
        dy=dy.double(),
        dh=dh.double(),
    )
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
    laid = _run(
        add_norm,
        _as_layout(x, how),
        _as_layout(res, how),
        w,
        b,
        kind=kind,
        dy=_as_layout(dy, how),
        dh=_as_layout(dy, how),
        activation="relu",
    )
    for name, value in base.fields().items():
        _same(getattr(laid, name), value, f"{how}: {name}")
