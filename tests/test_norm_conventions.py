"""Tests of layer norm's epsilon-outside-the-square-root conventions (issue 18).

``convention="eps_outside"``: ``(x - E[x]) / (sqrt(Var[x]) + eps)``, biased variance, the
seed text's formula (``seeds/003``); ``convention="annotated_transformer"``: the same with
the unbiased standard deviation, the Annotated Transformer's ``LayerNorm`` (Rush, 2018).

Checked against:

1. a float64 reference written out here, the formula literally (forward, and the gradients
   of the input and the affine parameters; ``gradcheck`` in float64);
2. the Annotated Transformer's ``LayerNorm`` module, written out here as it is published;
3. ``torch.nn.LayerNorm`` (state-dict keys; where the formulas agree and where they differ);
4. ``make_norm``, the fused add+norm twin (which must not run the torch-formula kernel),
   and the errors for unknown names and for norm kinds the conventions do not apply to.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import resnorm.norms.fused as fused_module
from resnorm.norms import (
    CONVENTIONS,
    BatchNorm,
    FusedAddLayerNorm,
    FusedAddRMSNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    make_norm,
)

NEW = ("eps_outside", "annotated_transformer")
CORRECTION = {"eps_outside": 0, "annotated_transformer": 1}
DEFAULT_EPS = {"eps_outside": 1e-5, "annotated_transformer": 1e-6}
AFFINE = [{}, {"bias": False}, {"elementwise_affine": False}]
# (input shape, normalized_shape): 2-D, 3-D, and two trailing dims normalized together.
SHAPES = [((5, 8), 8), ((3, 4, 8), 8), ((2, 3, 4, 6), (4, 6))]


def _data(shape, seed=0, dtype=torch.float64, scale=2.0, shift=0.7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def _randomize(module, seed=1):
    for i, name in enumerate(("weight", "bias")):
        p = getattr(module, name, None)
        if p is not None:
            noise = _data(p.shape, seed + i, scale=0.5, shift=1.0 if name == "weight" else 0.0)
            with torch.no_grad():
                p.copy_(noise.to(p.dtype))


def reference(x, normalized_shape, weight, bias, eps, correction):
    """The formula literally, in float64: mean, then the variance as a sum of squares over
    n - correction, then (x - mean) / (sqrt(var) + eps) * weight + bias."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    dims = tuple(range(-len(shape), 0))
    n = math.prod(shape)
    x = x.double()
    mean = x.sum(dims, keepdim=True) / n
    var = ((x - mean) ** 2).sum(dims, keepdim=True) / (n - correction)
    y = (x - mean) / (torch.sqrt(var) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


class AnnotatedTransformerLayerNorm(nn.Module):
    """The Annotated Transformer's LayerNorm (Rush, 2018), as published."""

    def __init__(self, features, eps=1e-6):
        super().__init__()
        self.a_2 = nn.Parameter(torch.ones(features))
        self.b_2 = nn.Parameter(torch.zeros(features))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


def _reference_of(norm, x):
    return reference(
        x, norm.normalized_shape, norm.weight, norm.bias, norm.eps, CORRECTION[norm.convention]
    )


# --------------------------------------------------------------------------------------------
# 1. the formula, forward and backward


@pytest.mark.parametrize("kwargs", AFFINE, ids=str)
@pytest.mark.parametrize(("shape", "normalized"), SHAPES, ids=str)
@pytest.mark.parametrize("convention", NEW)
def test_forward_and_gradients_are_the_formula(convention, shape, normalized, kwargs):
    norm = LayerNorm(normalized, convention=convention, dtype=torch.float64, **kwargs)
    _randomize(norm)
    x = _data(shape).requires_grad_()
    # The reference's own leaves: a copy of the input and of each affine parameter.
    xr = x.detach().clone().requires_grad_()
    w, b = (None if p is None else p.detach().clone().requires_grad_() for p in _affine(norm))
    y = norm(x)
    expected = reference(xr, normalized, w, b, norm.eps, CORRECTION[convention])
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)
    g = _data(shape, seed=5)
    y.backward(g)
    expected.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-10, rtol=1e-10)
    for param, ref in zip(_affine(norm), (w, b), strict=True):
        assert (param is None) == (ref is None)
        if param is not None:
            torch.testing.assert_close(param.grad, ref.grad, atol=1e-10, rtol=1e-10)


def _affine(norm):
    return norm.weight, norm.bias


@pytest.mark.parametrize(
    ("shape", "normalized"), [((3, 5), 5), ((2, 3, 4), 4), ((2, 2, 3), (2, 3))]
)
@pytest.mark.parametrize("convention", NEW)
def test_gradcheck_in_float64(convention, shape, normalized):
    norm = LayerNorm(normalized, convention=convention, dtype=torch.float64)
    _randomize(norm)

    def fn(x, weight, bias):
        return torch.func.functional_call(norm, {"weight": weight, "bias": bias}, (x,))

    inputs = (
        _data(shape).requires_grad_(),
        norm.weight.detach().clone().requires_grad_(),
        norm.bias.detach().clone().requires_grad_(),
    )
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("convention", NEW)
def test_float32_is_the_float64_formula_within_rounding(convention, channel_dim):
    norm = LayerNorm(8, convention=convention, channel_dim=channel_dim)
    _randomize(norm)
    x = _data((4, 8, 5) if channel_dim == 1 else (4, 5, 8), dtype=torch.float32)
    last = x.movedim(1, -1) if channel_dim == 1 else x
    expected = _reference_of(norm, last)
    expected = expected.movedim(-1, 1) if channel_dim == 1 else expected
    y = norm(x)
    assert y.dtype == torch.float32 and y.is_contiguous()
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("convention", NEW)
def test_layer_norm_2d_normalizes_the_channels_by_the_formula(convention):
    norm = LayerNorm2d(6, convention=convention, dtype=torch.float64)
    _randomize(norm)
    x = _data((2, 6, 3, 4))
    expected = _reference_of(norm, x.movedim(1, -1)).movedim(-1, 1)
    torch.testing.assert_close(norm(x), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("convention", NEW)
def test_half_precision_is_computed_in_float32(convention, dtype):
    norm = LayerNorm(16, convention=convention, dtype=dtype)
    _randomize(norm)
    x = _data((4, 16), dtype=dtype)
    y = norm(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), _reference_of(norm, x), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("convention", NEW)
def test_a_constant_row_gives_the_bias_and_finite_gradients(convention):
    norm = LayerNorm(6, convention=convention, dtype=torch.float64)
    _randomize(norm)
    x = torch.full((3, 6), 0.25, dtype=torch.float64, requires_grad=True)
    y = norm(x)
    torch.testing.assert_close(y, norm.bias.detach().expand(3, 6))
    g = _data((3, 6), seed=3)
    y.backward(g)
    # std 0: its own gradient counts as 0 (torch.std's rule), leaving weight / eps times the
    # centred upstream gradient, finite, where sqrt(var)'s gradient would give NaN.
    wg = g * norm.weight.detach()
    torch.testing.assert_close(x.grad, (wg - wg.mean(-1, keepdim=True)) / norm.eps)
    assert torch.isfinite(norm.weight.grad).all()


# --------------------------------------------------------------------------------------------
# 2. the Annotated Transformer's module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 12), (3, 7, 12)], ids=str)
def test_annotated_transformer_convention_is_its_layer_norm(shape, dtype):
    ours = LayerNorm(12, convention="annotated_transformer", dtype=dtype)
    twin = AnnotatedTransformerLayerNorm(12).to(dtype)
    assert ours.eps == twin.eps == 1e-6
    _randomize(ours)
    with torch.no_grad():
        twin.a_2.copy_(ours.weight)
        twin.b_2.copy_(ours.bias)
    x = _data(shape, dtype=dtype).requires_grad_()
    xt = x.detach().clone().requires_grad_()
    y, yt = ours(x), twin(xt)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 2e-6, "rtol": 2e-6}
    torch.testing.assert_close(y, yt, **tol)
    g = _data(shape, seed=9, dtype=dtype)
    y.backward(g)
    yt.backward(g)
    torch.testing.assert_close(x.grad, xt.grad, **tol)
    torch.testing.assert_close(ours.weight.grad, twin.a_2.grad, **tol)
    torch.testing.assert_close(ours.bias.grad, twin.b_2.grad, **tol)


def test_eps_outside_is_the_annotated_formula_with_the_biased_std():
    n = 10
    ours = LayerNorm(n, convention="eps_outside", eps=1e-6, dtype=torch.float64)
    twin = AnnotatedTransformerLayerNorm(n).double()
    x = _data((4, n))
    # Only the standard deviation differs: unbiased = biased * sqrt(n / (n - 1)).
    biased = x.std(-1, keepdim=True, correction=0)
    expected = (x - x.mean(-1, keepdim=True)) / (biased + 1e-6)
    torch.testing.assert_close(ours(x), expected, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(ours(x), twin(x), atol=1e-3)


# --------------------------------------------------------------------------------------------
# 3. against torch's convention


@pytest.mark.parametrize("convention", NEW)
def test_state_dict_keys_are_torchs(convention):
    ours = LayerNorm(8, convention=convention)
    torch_convention, twin = LayerNorm(8), nn.LayerNorm(8)
    assert list(ours.state_dict()) == list(torch_convention.state_dict())
    assert list(ours.state_dict()) == list(twin.state_dict())
    _randomize(twin)
    ours.load_state_dict(twin.state_dict())
    twin.load_state_dict(ours.state_dict())
    assert torch.equal(ours.weight, twin.weight) and torch.equal(ours.bias, twin.bias)
    no_bias = LayerNorm(8, bias=False, convention=convention)
    assert list(no_bias.state_dict()) == list(LayerNorm(8, bias=False).state_dict())


def _two_level_rows(stds):
    """Rows (-s, -s, s, s): mean 0, biased std s, unbiased std s * sqrt(4 / 3)."""
    pattern = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    return torch.stack([s * pattern for s in stds])


def test_conventions_differ_from_torchs_on_small_variance_rows():
    x = _two_level_rows([1e-4])
    torch_y = LayerNorm(4, dtype=torch.float64)(x)
    # torch: 1e-4 / sqrt(1e-8 + 1e-5) = 0.0316; eps_outside: 1e-4 / (1e-4 + 1e-5) = 0.909;
    # annotated: 1e-4 / (1e-4 * sqrt(4/3) + 1e-6) = 0.8586.
    expected = {"torch": 0.0316, "eps_outside": 0.9091, "annotated_transformer": 0.8586}
    assert torch_y[0, -1].item() == pytest.approx(expected["torch"], abs=1e-4)
    for convention in NEW:
        y = LayerNorm(4, convention=convention, dtype=torch.float64)(x)
        assert y[0, -1].item() == pytest.approx(expected[convention], abs=1e-4)
        assert (y - torch_y).abs().max() > 0.8


def test_conventions_agree_with_torch_where_they_should_on_unit_variance_rows():
    x = _data((6, 32), scale=1.0)
    torch_y = LayerNorm(32, dtype=torch.float64)(x)
    eps_outside = LayerNorm(32, convention="eps_outside", dtype=torch.float64)(x)
    # 1 / (s + eps) vs 1 / sqrt(s^2 + eps): a relative 1e-5-ish difference at s near 1.
    torch.testing.assert_close(eps_outside, torch_y, atol=3e-5, rtol=3e-5)
    annotated = LayerNorm(32, convention="annotated_transformer", dtype=torch.float64)(x)
    # The unbiased std is sqrt(n / (n - 1)) times the biased one: a 1.6% smaller output.
    torch.testing.assert_close(annotated, torch_y * math.sqrt(31 / 32), atol=3e-5, rtol=3e-5)


# --------------------------------------------------------------------------------------------
# 4. make_norm, the fused twin, errors


@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("convention", NEW)
def test_make_norm_builds_the_convention(convention, channel_dim):
    norm = make_norm("layer", 8, convention=convention, channel_dim=channel_dim)
    assert isinstance(norm, LayerNorm) and norm.convention == convention
    assert norm.eps == DEFAULT_EPS[convention]
    assert make_norm("layer", 8, convention=convention, eps=0.5).eps == 0.5
    assert f"convention={convention!r}" in repr(norm)
    fused = make_norm("layer", 8, convention=convention, fused=True)
    assert isinstance(fused, FusedAddLayerNorm) and fused.convention == convention
    assert set(NEW) <= set(CONVENTIONS) and CONVENTIONS[:2] == ("torch", "keras")


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("convention", NEW)
def test_fused_twin_computes_its_convention_without_the_torch_kernel(
    convention, activation, monkeypatch
):
    calls = []
    real = fused_module.add_norm
    monkeypatch.setattr(fused_module, "add_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    FusedAddLayerNorm(8)(_data((3, 8), dtype=torch.float32))
    assert calls, "the torch convention should reach the fused kernel"
    calls.clear()
    norm = FusedAddLayerNorm(8, convention=convention, activation=activation, dtype=torch.float64)
    _randomize(norm)
    x, r = _data((3, 5, 8)), _data((3, 5, 8), seed=4)
    y, h = norm(x, r, prenorm=True)
    expected = _reference_of(norm, x + r)
    expected = torch.relu(expected) if activation == "relu" else expected
    assert not calls
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)
    alone = _reference_of(norm, x)  # no residual: the norm of x
    alone = torch.relu(alone) if activation == "relu" else alone
    torch.testing.assert_close(norm(x), alone, atol=1e-12, rtol=1e-12)
    assert not calls


def test_unknown_convention_lists_the_accepted_ones():
    for build in (
        lambda: make_norm("layer", 4, convention="eps-outside"),
        lambda: LayerNorm(4, convention="annotated"),
    ):
        with pytest.raises(ValueError) as info:
            build()
        for name in ("torch", "keras", *NEW):
            assert repr(name) in str(info.value)


@pytest.mark.parametrize("convention", NEW)
@pytest.mark.parametrize(
    "build",
    [
        lambda c: make_norm("batch", 4, convention=c),
        lambda c: make_norm("rms", 4, convention=c),
        lambda c: make_norm("rms", 4, convention=c, fused=True),
        lambda c: make_norm("group", 4, convention=c),
        lambda c: make_norm("instance", 4, convention=c),
        lambda c: BatchNorm(4, convention=c),
        lambda c: RMSNorm(4, convention=c),
        lambda c: FusedAddRMSNorm(4, convention=c),
        lambda c: GroupNorm(2, 4, convention=c),
        lambda c: InstanceNorm(4, convention=c),
    ],
)
def test_other_kinds_reject_the_layer_norm_conventions(build, convention):
    with pytest.raises(ValueError, match=rf"convention='{convention}' applies to .*'layer' only"):
        build(convention)
    with pytest.raises(ValueError, match=r"accepted for '\w+': 'torch', 'keras'$"):
        build(convention)


def test_dyt_has_no_eps_and_ignores_the_convention():
    for convention in NEW:
        make_norm("dyt", 4, convention=convention)


def test_the_unbiased_std_needs_two_values():
    with pytest.raises(ValueError, match="at least 2 normalized values"):
        LayerNorm(1, convention="annotated_transformer")
    with pytest.raises(ValueError, match="at least 2 normalized values"):
        make_norm("layer", 1, convention="annotated_transformer")
    # The biased one is defined for one value: the output is the bias.
    assert torch.equal(LayerNorm(1, convention="eps_outside")(torch.ones(3, 1)), torch.zeros(3, 1))
