"""Tests of the normalization layers in ``resnorm.norms``.

What is checked, and against what:

1. parity with the ``torch.nn`` twin of every layer that has one: forward output, gradients
   of the input and of the affine parameters, running statistics and ``num_batches_tracked``
   after several training steps, then the eval-mode output (bit-equal where both sides call
   the same torch function);
2. a float64 reference written out here from each layer's docstring formula;
3. state dicts that move between our layers and ``torch.nn``'s in both directions;
4. the Keras 3 convention of batch norm (its documented moving-average rule, biased variance,
   eps 1e-3, momentum 0.99);
5. hypothesis properties over shapes, layouts, dtypes and eps (shape and dtype kept, batch
   independence of the per-sample norms, batch dependence of batch norm);
6. ``make_norm``;
7. bad arguments and bad inputs;
8. ``extra_repr`` and ``reset_parameters``.

``RESNORM_HYPOTHESIS_EXAMPLES`` raises the number of hypothesis examples for a longer run.
"""

from __future__ import annotations

import collections
import math
import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from resnorm.norms import (
    NORM_KINDS,
    BatchNorm,
    DyT,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    default_num_groups,
    make_norm,
)

EXAMPLES = int(os.environ.get("RESNORM_HYPOTHESIS_EXAMPLES", "30"))
HYPOTHESIS = settings(max_examples=EXAMPLES, deadline=None)

F32 = {"atol": 1e-6, "rtol": 1e-6}  # float32 results that may differ by rounding


# --------------------------------------------------------------------------------------------
# helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(shape, seed: int, dtype=torch.float64, scale: float = 2.0, shift: float = 0.7):
    """Random data with a non-zero mean and a non-unit variance (so normalization matters)."""
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale + shift).to(dtype)


def _randomize_affine(*modules, seed: int = 123) -> None:
    """Give the same random weight (about 1 +- 0.5) and bias to every module, so that the
    affine parameters are neither ones nor zeros."""
    for i, name in enumerate(("weight", "bias")):
        params = [getattr(m, name, None) for m in modules]
        assert len({p is None for p in params}) == 1, f"{name} present in some modules only"
        if params[0] is None:
            continue
        noise = torch.randn(params[0].shape, generator=_gen(seed + i), dtype=torch.float64)
        value = 1.0 + 0.5 * noise if name == "weight" else 0.5 * noise
        with torch.no_grad():
            for p in params:
                p.copy_(value.to(p.dtype))


def _same(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert torch.equal(a, b), f"{what}: max abs diff {(a - b).abs().max().item()}"


def _param_names(module):
    return [n for n, _ in module.named_parameters()]


def _check_twin_parity(
    ours, twin, shape, *, to_twin=lambda t: t, from_twin=lambda t: t, steps=3, seed=0
):
    """Train both for ``steps`` steps on the same batches, comparing outputs, gradients and
    buffers at every step, then compare eval-mode outputs. ``to_twin``/``from_twin`` map an
    input/output between our layout and the twin's. Every layer calls the same torch
    function as its twin (on the same, possibly permuted, view), so all must be bit-equal."""
    assert sorted(ours.state_dict()) == sorted(twin.state_dict())
    assert _param_names(ours) == _param_names(twin)
    _randomize_affine(ours, twin)
    ours.train()
    twin.train()
    for step in range(steps):
        x = _data(shape, seed + step, torch.float32)
        xa = x.clone().requires_grad_()
        xb = to_twin(x.clone()).detach().requires_grad_()
        ya = ours(xa)
        yb = from_twin(twin(xb))
        _same(ya, yb, f"output at step {step}")
        grad = _data(ya.shape, 1000 + seed + step, torch.float32, scale=1.0, shift=0.0)
        ya.backward(grad)
        yb.backward(grad)
        _same(xa.grad, from_twin(xb.grad), f"input grad at step {step}")
        for name, p in ours.named_parameters():
            q = getattr(twin, name)
            assert p.grad is not None
            _same(p.grad, q.grad, f"{name}.grad at step {step}")
        ours.zero_grad()
        twin.zero_grad()
        for name, buf in ours.named_buffers():
            _same(buf, getattr(twin, name), f"buffer {name} at step {step}")
    ours.eval()
    twin.eval()
    x = _data(shape, seed + 99, torch.float32)
    with torch.no_grad():
        _same(ours(x), from_twin(twin(to_twin(x))), "eval output")


def _channels_first(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x if channel_dim == 1 or x.dim() <= 2 else x.movedim(-1, 1)


def _channels_back(y: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return y if channel_dim == 1 or y.dim() <= 2 else y.movedim(1, -1)


def _per_channel(param, ndim):
    """(C,) -> (1, C, 1, ...) for a channels-first tensor of rank ndim."""
    return param.reshape(1, -1, *([1] * (ndim - 2)))


# --------------------------------------------------------------------------------------------
# float64 references, written from the docstring formulas. Every reference takes and
# returns float64 tensors; ``weight``/``bias`` may be None.


def ref_batch_norm(x, weight, bias, eps, channel_dim=1, mean=None, var=None):
    """(x - E[x]) / sqrt(Var[x] + eps) * gamma + beta, statistics per channel over N and the
    spatial dims, variance biased; or with the given (running) ``mean``/``var``."""
    x = _channels_first(x, channel_dim)
    dims = [0, *range(2, x.dim())]
    if mean is None:
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
    else:
        mean, var = _per_channel(mean, x.dim()), _per_channel(var, x.dim())
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * _per_channel(weight, x.dim()) + _per_channel(bias, x.dim())
    return _channels_back(y, channel_dim)


def ref_batch_stats(x, channel_dim=1):
    """Per-channel batch mean, biased variance and unbiased variance."""
    x = _channels_first(x, channel_dim)
    c = x.shape[1]
    flat = x.movedim(1, 0).reshape(c, -1)
    n = flat.shape[1]
    mean = flat.sum(1) / n
    ss = ((flat - mean[:, None]) ** 2).sum(1)
    return mean, ss / n, ss / (n - 1)


def ref_layer_norm(x, normalized_shape, weight, bias, eps):
    """Mean and biased variance over the trailing ``normalized_shape`` dims of one sample."""
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def ref_layer_norm_channels(x, weight, bias, eps, channel_dim):
    """Layer norm over the C channels at every position, whatever the layout."""
    if channel_dim == -1 or x.dim() <= 2:
        return ref_layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return ref_layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, eps).movedim(-1, 1)


def ref_rms_norm(x, normalized_shape, weight, eps):
    """x / sqrt(E[x^2] + eps) * gamma over the trailing dims; no centring, no bias."""
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    y = x / torch.sqrt((x * x).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * weight


def ref_rms_norm_channels(x, weight, eps, channel_dim):
    if channel_dim == -1 or x.dim() <= 2:
        return ref_rms_norm(x, (x.shape[-1],), weight, eps)
    return ref_rms_norm(x.movedim(1, -1), (x.shape[1],), weight, eps).movedim(-1, 1)


def ref_group_norm(x, num_groups, weight, bias, eps, channel_dim=1):
    """Each sample's channels split into ``num_groups`` consecutive groups; each group is
    normalized over its channels and all positions."""
    x = _channels_first(x, channel_dim)
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, c // num_groups, -1)
    mean = g.mean((2, 3), keepdim=True)
    var = ((g - mean) ** 2).mean((2, 3), keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * _per_channel(weight, x.dim()) + _per_channel(bias, x.dim())
    return _channels_back(y, channel_dim)


def ref_instance_norm(x, weight, bias, eps, channel_dim=1):
    """Each channel of each sample normalized over its spatial positions."""
    x = _channels_first(x, channel_dim)
    dims = list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * _per_channel(weight, x.dim()) + _per_channel(bias, x.dim())
    return _channels_back(y, channel_dim)


def ref_dyt(x, alpha, weight, bias, channel_dim=-1):
    """weight * tanh(alpha * x) + bias, weight and bias per channel."""
    x = _channels_first(x, channel_dim)
    y = _per_channel(weight, x.dim()) * torch.tanh(alpha * x) + _per_channel(bias, x.dim())
    return _channels_back(y, channel_dim)


def _p64(module, name):
    p = getattr(module, name, None)
    return None if p is None else p.detach().double()


# ============================================================================================
# 1. parity with the torch.nn twins

BN_SHAPES = [
    ((6, 4), nn.BatchNorm1d),
    ((4, 4, 7), nn.BatchNorm1d),
    ((3, 4, 5, 6), nn.BatchNorm2d),
    ((2, 4, 3, 4, 5), nn.BatchNorm3d),
]


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize(("shape", "twin_cls"), BN_SHAPES, ids=lambda v: str(v))
def test_batch_norm_matches_torch(shape, twin_cls, momentum):
    ours = BatchNorm(4, momentum=momentum)
    twin = twin_cls(4, momentum=momentum)
    _check_twin_parity(ours, twin, shape, steps=4)
    assert int(ours.num_batches_tracked) == 4


@pytest.mark.parametrize(("affine", "track"), [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize(("shape", "twin_cls"), BN_SHAPES[1:3], ids=lambda v: str(v))
def test_batch_norm_matches_torch_without_affine_or_stats(shape, twin_cls, affine, track):
    ours = BatchNorm(4, eps=1e-3, affine=affine, track_running_stats=track)
    twin = twin_cls(4, eps=1e-3, affine=affine, track_running_stats=track)
    _check_twin_parity(ours, twin, shape)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    ("shape", "twin_cls"),
    [((5, 7, 4), nn.BatchNorm1d), ((2, 3, 5, 4), nn.BatchNorm2d), ((6, 4), nn.BatchNorm1d)],
    ids=lambda v: str(v),
)
def test_channels_last_batch_norm_matches_torch_on_transposed_input(shape, twin_cls, momentum):
    ours = BatchNorm(4, momentum=momentum, channel_dim=-1)
    twin = twin_cls(4, momentum=momentum)
    _check_twin_parity(
        ours,
        twin,
        shape,
        to_twin=lambda t: _channels_first(t, -1),
        from_twin=lambda t: _channels_back(t, -1),
    )


@pytest.mark.parametrize(
    "kwargs", [{}, {"bias": False}, {"elementwise_affine": False}, {"eps": 1e-2}], ids=str
)
@pytest.mark.parametrize(
    ("normalized_shape", "shape"),
    [(8, (4, 8)), (8, (3, 5, 8)), ((3, 8), (2, 3, 8)), ((2, 3, 4), (3, 2, 2, 3, 4))],
    ids=str,
)
def test_layer_norm_matches_torch(normalized_shape, shape, kwargs):
    _check_twin_parity(
        LayerNorm(normalized_shape, **kwargs), nn.LayerNorm(normalized_shape, **kwargs), shape
    )


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False}], ids=str)
@pytest.mark.parametrize("shape", [(3, 6, 4, 5), (4, 6, 7), (5, 6)], ids=str)
@pytest.mark.parametrize(
    "cls",
    [LayerNorm2d, lambda c, **kw: LayerNorm(c, channel_dim=1, **kw)],
    ids=["LayerNorm2d", "LayerNorm(channel_dim=1)"],
)
def test_channels_first_layer_norm_matches_torch_on_permuted_input(cls, shape, kwargs):
    _check_twin_parity(
        cls(6, **kwargs),
        nn.LayerNorm(6, **kwargs),
        shape,
        to_twin=lambda t: _channels_back(t, -1),
        from_twin=lambda t: _channels_first(t, -1),
    )


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"eps": None}, {"eps": 1e-6}, {"eps": 0.1}, {"elementwise_affine": False}],
    ids=str,
)
@pytest.mark.parametrize(
    ("normalized_shape", "shape"), [(8, (4, 8)), (8, (3, 5, 8)), ((3, 8), (2, 3, 8))], ids=str
)
def test_rms_norm_matches_torch(normalized_shape, shape, kwargs):
    _check_twin_parity(
        RMSNorm(normalized_shape, **kwargs), nn.RMSNorm(normalized_shape, **kwargs), shape
    )


def test_rms_norm_eps_none_is_machine_epsilon_like_torch():
    x = torch.full((2, 4), 1e-2)  # mean square 1e-4
    ours, twin = RMSNorm(4), nn.RMSNorm(4)
    assert ours.eps is None and twin.eps is None
    assert torch.equal(ours(x), twin(x))
    machine = 1e-2 / math.sqrt(1e-4 + torch.finfo(torch.float32).eps)  # 0.9994
    torch.testing.assert_close(ours(x), torch.full((2, 4), machine), atol=1e-6, rtol=0)
    # a "usual" eps of 1e-5 would give 0.953 here
    assert (RMSNorm(4, eps=1e-5)(x) - machine).abs().min() > 0.04


def test_channels_first_rms_norm_matches_torch_on_permuted_input():
    _check_twin_parity(
        RMSNorm(6, channel_dim=1),
        nn.RMSNorm(6),
        (3, 6, 4, 5),
        to_twin=lambda t: _channels_back(t, -1),
        from_twin=lambda t: _channels_first(t, -1),
    )


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 5), (2, 6, 3, 4), (2, 6, 2, 3, 2)], ids=str)
def test_group_norm_matches_torch(shape, groups, affine):
    _check_twin_parity(
        GroupNorm(groups, 6, affine=affine), nn.GroupNorm(groups, 6, affine=affine), shape
    )


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("shape", [(3, 5, 6), (2, 3, 4, 6)], ids=str)
def test_channels_last_group_norm_matches_torch_on_permuted_input(shape, groups):
    _check_twin_parity(
        GroupNorm(groups, 6, eps=1e-3, channel_dim=-1),
        nn.GroupNorm(groups, 6, eps=1e-3),
        shape,
        to_twin=lambda t: _channels_first(t, -1),
        from_twin=lambda t: _channels_back(t, -1),
    )


IN_SHAPES = [
    ((3, 4, 7), nn.InstanceNorm1d),
    ((2, 4, 5, 3), nn.InstanceNorm2d),
    ((2, 4, 2, 3, 3), nn.InstanceNorm3d),
]


@pytest.mark.parametrize(
    ("affine", "track", "momentum"),
    [
        (False, False, 0.1),
        (True, False, 0.1),
        (False, True, 0.1),
        (True, True, 0.1),
        (True, True, 0.5),
        (False, True, None),
        (True, True, None),
    ],
)
@pytest.mark.parametrize(("shape", "twin_cls"), IN_SHAPES, ids=lambda v: str(v))
def test_instance_norm_matches_torch(shape, twin_cls, affine, track, momentum):
    ours = InstanceNorm(4, momentum=momentum, affine=affine, track_running_stats=track)
    twin = twin_cls(4, momentum=momentum, affine=affine, track_running_stats=track)
    _check_twin_parity(ours, twin, shape)


def test_instance_norm_defaults_are_torchs():
    ours, twin = InstanceNorm(5), nn.InstanceNorm2d(5)
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == (
        twin.eps,
        twin.momentum,
        twin.affine,
        twin.track_running_stats,
    )
    assert ours.state_dict().keys() == twin.state_dict().keys() == set()


def test_channels_last_instance_norm_matches_torch_on_permuted_input():
    _check_twin_parity(
        InstanceNorm(4, affine=True, track_running_stats=True, channel_dim=-1),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        (2, 5, 3, 4),
        to_twin=lambda t: _channels_first(t, -1),
        from_twin=lambda t: _channels_back(t, -1),
    )


def test_defaults_match_torch():
    assert (BatchNorm(3).eps, BatchNorm(3).momentum) == (
        nn.BatchNorm2d(3).eps,
        nn.BatchNorm2d(3).momentum,
    )
    assert LayerNorm(3).eps == nn.LayerNorm(3).eps
    assert RMSNorm(3).eps is nn.RMSNorm(3).eps is None
    assert GroupNorm(1, 3).eps == nn.GroupNorm(1, 3).eps
    assert DyT(3).alpha.item() == 0.5  # the paper's alpha_0


# ============================================================================================
# 2. float64 references from the docstring formulas, in float64 (tight) and float32 (loose)

TIGHT = {"atol": 1e-10, "rtol": 1e-10}
LOOSE = {"atol": 2e-5, "rtol": 2e-5}


def _check_against_reference(make, reference, shape, seed=0):
    """Build the layer in float64 and float32 with the same random affine parameters and
    compare its output on the same data to ``reference(module64, x64)``."""
    for dtype, tol in ((torch.float64, TIGHT), (torch.float32, LOOSE)):
        module = make().to(dtype)
        _randomize_affine(module, seed=seed + 7)
        x = _data(shape, seed, dtype)
        with torch.no_grad():
            expected = reference(module, x.double())
            got = module(x)
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got.double(), expected, **tol)


@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 7), (3, 5, 4, 3), (2, 5, 2, 3, 2)], ids=str)
def test_batch_norm_training_output_is_the_formula(shape, channel_dim):
    if channel_dim == -1:
        shape = (shape[0], *shape[2:], shape[1])
    _check_against_reference(
        lambda: BatchNorm(5, eps=1e-3, channel_dim=channel_dim),
        lambda m, x: ref_batch_norm(x, _p64(m, "weight"), _p64(m, "bias"), 1e-3, channel_dim),
        shape,
    )


@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("momentum", [0.1, 0.25, None])
def test_batch_norm_running_stats_follow_the_torch_rule(momentum, channel_dim):
    """running = (1 - m) * running + m * stat with the unbiased variance; momentum=None is
    the cumulative average of the batch statistics."""
    shape = (4, 3, 5) if channel_dim == 1 else (4, 5, 3)
    for dtype, tol in ((torch.float64, TIGHT), (torch.float32, LOOSE)):
        bn = BatchNorm(3, momentum=momentum, channel_dim=channel_dim, dtype=dtype)
        mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        means, vars_ = [], []
        for step in range(5):
            x = _data(shape, step, dtype, shift=step - 2.0)
            bn(x)
            m, _, v = ref_batch_stats(x.double(), channel_dim)
            means.append(m)
            vars_.append(v)
            if momentum is None:
                mean = torch.stack(means).mean(0)
                var = torch.stack(vars_).mean(0)
            else:
                mean = (1 - momentum) * mean + momentum * m
                var = (1 - momentum) * var + momentum * v
            torch.testing.assert_close(bn.running_mean.double(), mean, **tol)
            torch.testing.assert_close(bn.running_var.double(), var, **tol)
        bn.eval()
        x = _data(shape, 50, dtype)
        with torch.no_grad():
            torch.testing.assert_close(
                bn(x).double(),
                ref_batch_norm(x.double(), None, None, bn.eps, channel_dim, mean=mean, var=var),
                **tol,
            )


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False}], ids=str)
@pytest.mark.parametrize(
    ("normalized_shape", "shape"), [(6, (3, 6)), (6, (2, 4, 6)), ((4, 6), (3, 4, 6))], ids=str
)
def test_layer_norm_is_the_formula(normalized_shape, shape, kwargs):
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    _check_against_reference(
        lambda: LayerNorm(normalized_shape, eps=1e-4, **kwargs),
        lambda m, x: ref_layer_norm(x, ns, _p64(m, "weight"), _p64(m, "bias"), 1e-4),
        shape,
    )


@pytest.mark.parametrize("shape", [(3, 6), (2, 6, 5), (2, 6, 3, 4)], ids=str)
@pytest.mark.parametrize(
    "make",
    [lambda: LayerNorm2d(6, eps=1e-4), lambda: LayerNorm(6, eps=1e-4, channel_dim=1)],
    ids=["LayerNorm2d", "LayerNorm(channel_dim=1)"],
)
def test_channels_first_layer_norm_is_the_formula(make, shape):
    _check_against_reference(
        make,
        lambda m, x: ref_layer_norm_channels(x, _p64(m, "weight"), _p64(m, "bias"), 1e-4, 1),
        shape,
    )


@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("eps", [None, 1e-6, 0.5])
@pytest.mark.parametrize("shape", [(3, 6), (2, 6, 5), (2, 6, 3, 4)], ids=str)
def test_rms_norm_is_the_formula(shape, eps, channel_dim):
    if channel_dim == -1:
        shape = (shape[0], *shape[2:], shape[1])

    def reference(m, x):
        e = torch.finfo(m.weight.dtype).eps if eps is None else eps
        return ref_rms_norm_channels(x, _p64(m, "weight"), e, channel_dim)

    _check_against_reference(lambda: RMSNorm(6, eps=eps, channel_dim=channel_dim), reference, shape)


def test_rms_norm_multi_dim_is_the_formula():
    _check_against_reference(
        lambda: RMSNorm((3, 4), eps=1e-3),
        lambda m, x: ref_rms_norm(x, (3, 4), _p64(m, "weight"), 1e-3),
        (2, 5, 3, 4),
    )


@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(3, 6), (2, 6, 5), (2, 6, 3, 4), (2, 6, 2, 2, 3)], ids=str)
def test_group_norm_is_the_formula(shape, groups, channel_dim):
    if channel_dim == -1:
        shape = (shape[0], *shape[2:], shape[1])
    _check_against_reference(
        lambda: GroupNorm(groups, 6, eps=1e-4, channel_dim=channel_dim),
        lambda m, x: ref_group_norm(
            x, groups, _p64(m, "weight"), _p64(m, "bias"), 1e-4, channel_dim
        ),
        shape,
    )


@pytest.mark.parametrize("shape", [(1, 16), (1, 16, 1), (1, 16, 1, 1)], ids=str)
def test_group_norm_of_one_sample_with_one_value_per_group_is_the_bias(shape):
    """Per-sample: a batch of one is fine even when each group holds a single value (torch's
    F.group_norm wrongly applies batch norm's "more than 1 value per channel" check here)."""
    norm = GroupNorm(16, 16)  # 16 groups of one channel
    _randomize_affine(norm)
    x = _data(shape, 0, torch.float32).requires_grad_()
    y = norm(x)
    # x - E[x] is 0 up to rounding, which 1/sqrt(eps) amplifies: about 1e-4 here
    torch.testing.assert_close(
        y.detach(), norm.bias.detach().view(1, 16, *shape[2:]), atol=1e-3, rtol=0
    )
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros(shape), atol=1e-3, rtol=0)
    torch.testing.assert_close(norm.bias.grad, torch.ones(16))
    batch = _data((3, *shape[1:]), 1, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(norm(batch[:1]), norm(batch)[:1], **F32)


def test_group_norm_with_one_group_per_channel_is_instance_norm_and_one_group_layer_norm():
    x = _data((2, 4, 3, 5), 0, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            GroupNorm(4, 4, eps=1e-4).double()(x), InstanceNorm(4, eps=1e-4).double()(x), **TIGHT
        )
        torch.testing.assert_close(
            GroupNorm(1, 4, eps=1e-4).double()(x),
            ref_layer_norm(x, (4, 3, 5), None, None, 1e-4),
            **TIGHT,
        )


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 5, 3, 4), (2, 5, 2, 3, 2)], ids=str)
def test_instance_norm_is_the_formula(shape, channel_dim, affine):
    if channel_dim == -1:
        shape = (shape[0], *shape[2:], shape[1])
    _check_against_reference(
        lambda: InstanceNorm(5, eps=1e-4, affine=affine, channel_dim=channel_dim),
        lambda m, x: ref_instance_norm(x, _p64(m, "weight"), _p64(m, "bias"), 1e-4, channel_dim),
        shape,
    )


@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("alpha", [0.5, 1.7, -0.3])
@pytest.mark.parametrize("shape", [(3, 6), (2, 6, 5), (2, 6, 3, 4), (2, 6, 2, 2, 3)], ids=str)
def test_dyt_is_the_formula(shape, alpha, channel_dim):
    if channel_dim == -1:
        shape = (shape[0], *shape[2:], shape[1])
    _check_against_reference(
        lambda: DyT(6, alpha_init=alpha, channel_dim=channel_dim),
        lambda m, x: ref_dyt(x, _p64(m, "alpha"), _p64(m, "weight"), _p64(m, "bias"), channel_dim),
        shape,
    )
    assert DyT(6, alpha_init=alpha).alpha.item() == pytest.approx(alpha, rel=1e-7)


def test_dyt_gradients_are_those_of_the_formula():
    dyt = DyT(4, alpha_init=0.8, channel_dim=1).double()
    _randomize_affine(dyt)
    x = _data((2, 4, 3), 0).requires_grad_()
    dyt(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    w = dyt.weight.detach().clone().requires_grad_()
    b = dyt.bias.detach().clone().requires_grad_()
    a = dyt.alpha.detach().clone().requires_grad_()
    ref_dyt(x_ref, a, w, b, 1).sum().backward()
    for got, want in (
        (x.grad, x_ref.grad),
        (dyt.weight.grad, w.grad),
        (dyt.bias.grad, b.grad),
        (dyt.alpha.grad, a.grad),
    ):
        torch.testing.assert_close(got, want, **TIGHT)


# ============================================================================================
# 3. state dicts move both ways

STATE_DICT_PAIRS = [
    pytest.param(lambda: BatchNorm(4), lambda: nn.BatchNorm2d(4), (3, 4, 2, 5), id="batch"),
    pytest.param(
        lambda: BatchNorm(4, momentum=None),
        lambda: nn.BatchNorm1d(4, momentum=None),
        (3, 4, 5),
        id="batch-cumulative",
    ),
    pytest.param(
        lambda: BatchNorm(4, affine=False),
        lambda: nn.BatchNorm1d(4, affine=False),
        (6, 4),
        id="batch-no-affine",
    ),
    pytest.param(lambda: LayerNorm(4), lambda: nn.LayerNorm(4), (3, 5, 4), id="layer"),
    pytest.param(
        lambda: LayerNorm((2, 4), bias=False),
        lambda: nn.LayerNorm((2, 4), bias=False),
        (3, 2, 4),
        id="layer-no-bias",
    ),
    pytest.param(lambda: RMSNorm(4), lambda: nn.RMSNorm(4), (3, 5, 4), id="rms"),
    pytest.param(lambda: GroupNorm(2, 4), lambda: nn.GroupNorm(2, 4), (3, 4, 5), id="group"),
    pytest.param(
        lambda: InstanceNorm(4, affine=True, track_running_stats=True),
        lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        (3, 4, 3, 2),
        id="instance",
    ),
]


def _train_some(module, shape, steps=3, seed=0):
    _randomize_affine(module, seed=seed + 11)
    module.train()
    with torch.no_grad():
        for step in range(steps):
            module(_data(shape, seed + step, torch.float32))


@pytest.mark.parametrize(("make_ours", "make_twin", "shape"), STATE_DICT_PAIRS)
def test_state_dict_loads_into_torch_and_back(make_ours, make_twin, shape):
    x = _data(shape, 77, torch.float32)
    # ours -> torch
    ours, twin = make_ours(), make_twin()
    _train_some(ours, shape)
    state = ours.state_dict()
    assert list(state) == list(twin.state_dict())
    result = twin.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in twin.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), twin.eval()(x))
    # torch -> ours
    ours, twin = make_ours(), make_twin()
    _train_some(twin, shape, seed=5)
    state = twin.state_dict()
    result = ours.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in ours.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), twin.eval()(x))
    # the version metadata that guides old-checkpoint loading is torch's
    assert ours.state_dict()._metadata[""].get("version") == twin.state_dict()._metadata[""].get(
        "version"
    )


def _without_num_batches_tracked(state, version):
    old = collections.OrderedDict(
        (k, v.clone()) for k, v in state.items() if not k.endswith("num_batches_tracked")
    )
    if version is not None:
        old._metadata = collections.OrderedDict({"": {"version": version}})
    return old


@pytest.mark.parametrize("version", [None, 1])
@pytest.mark.parametrize("trained_before", [False, True])
def test_old_batch_norm_state_dict_without_num_batches_tracked_loads_like_torch(
    version, trained_before
):
    source = nn.BatchNorm2d(4, momentum=None)
    _train_some(source, (3, 4, 2, 2), steps=2)
    old = _without_num_batches_tracked(source.state_dict(), version)
    ours, twin = BatchNorm(4, momentum=None), nn.BatchNorm2d(4, momentum=None)
    if trained_before:
        _train_some(ours, (3, 4, 2, 2), steps=5, seed=40)
        _train_some(twin, (3, 4, 2, 2), steps=5, seed=40)
    result = ours.load_state_dict(old, strict=True)  # load_state_dict copies its argument
    assert not result.missing_keys and not result.unexpected_keys
    twin.load_state_dict(old, strict=True)
    assert torch.equal(ours.running_mean, source.running_mean)
    assert torch.equal(ours.running_var, source.running_var)
    assert ours.num_batches_tracked.dtype == torch.long
    assert int(ours.num_batches_tracked) == int(twin.num_batches_tracked)
    if not trained_before:
        assert int(ours.num_batches_tracked) == 0
    # with momentum=None the counter weights the next update: it must be torch's
    x = _data((3, 4, 2, 2), 90, torch.float32)
    with torch.no_grad():
        _same(ours.train()(x), twin.train()(x), "train output")
    assert torch.equal(ours.running_mean, twin.running_mean)
    assert torch.equal(ours.running_var, twin.running_var)


def test_old_state_dict_with_current_version_but_no_counter_is_rejected_like_torch():
    old = _without_num_batches_tracked(nn.BatchNorm1d(3).state_dict(), 2)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        nn.BatchNorm1d(3).load_state_dict(old)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        BatchNorm(3).load_state_dict(old)


# ============================================================================================
# 4. the Keras 3 convention


def test_keras_convention_defaults():
    bn = BatchNorm(8, convention="keras")
    assert bn.eps == 1e-3 and bn.momentum == 0.99 and bn.convention == "keras"
    for kind in ("batch", "layer", "group", "instance"):
        assert make_norm(kind, 8, convention="keras").eps == 1e-3, kind
    assert make_norm("rms", 8, convention="keras").eps == 1e-6
    assert make_norm("batch", 8, convention="keras").momentum == 0.99
    for cls in (LayerNorm, LayerNorm2d, RMSNorm):
        assert cls(8, convention="keras").eps == (1e-6 if cls is RMSNorm else 1e-3)
    assert GroupNorm(2, 8, convention="keras").eps == 1e-3
    assert InstanceNorm(8, convention="keras").eps == 1e-3
    # an explicit eps wins over the convention
    assert BatchNorm(8, eps=0.25, convention="keras").eps == 0.25


def test_keras_and_torch_momentum_on_a_batch_worked_by_hand():
    x = torch.tensor([[1.0, 10.0], [3.0, 30.0]], dtype=torch.float64)
    # per channel: mean (2, 20); biased variance (1, 100); unbiased (2, 200)
    keras = BatchNorm(2, convention="keras", dtype=torch.float64)
    keras(x)
    torch.testing.assert_close(keras.running_mean, torch.tensor([0.02, 0.2], dtype=torch.float64))
    torch.testing.assert_close(keras.running_var, torch.tensor([1.0, 1.99], dtype=torch.float64))
    torch_bn = BatchNorm(2, dtype=torch.float64)
    torch_bn(x)
    torch.testing.assert_close(torch_bn.running_mean, torch.tensor([0.2, 2.0], dtype=torch.float64))
    torch.testing.assert_close(torch_bn.running_var, torch.tensor([1.1, 20.9], dtype=torch.float64))


@pytest.mark.parametrize("momentum", [None, 0.9])
@pytest.mark.parametrize(
    ("shape", "channel_dim"),
    [((6, 3), 1), ((4, 3, 5), 1), ((3, 3, 4, 2), 1), ((4, 5, 3), -1), ((2, 3, 4, 3), -1)],
    ids=str,
)
def test_keras_batch_norm_follows_the_keras_rule(shape, channel_dim, momentum):
    """moving = moving * momentum + batch_stat * (1 - momentum), biased variance; training
    normalizes with the batch's biased variance and eps 1e-3, eval with the moving stats."""
    kwargs = {} if momentum is None else {"momentum": momentum}
    m = 0.99 if momentum is None else momentum
    for dtype, tol in ((torch.float64, TIGHT), (torch.float32, LOOSE)):
        bn = BatchNorm(3, convention="keras", channel_dim=channel_dim, dtype=dtype, **kwargs)
        _randomize_affine(bn)
        w, b = _p64(bn, "weight"), _p64(bn, "bias")
        moving_mean = torch.zeros(3, dtype=torch.float64)
        moving_var = torch.ones(3, dtype=torch.float64)
        for step in range(4):
            x = _data(shape, step, dtype, scale=1.0 + step, shift=3.0 - step)
            y = bn(x)
            mean, biased, _ = ref_batch_stats(x.double(), channel_dim)
            moving_mean = moving_mean * m + mean * (1 - m)
            moving_var = moving_var * m + biased * (1 - m)
            assert y.dtype == dtype
            torch.testing.assert_close(
                y.detach().double(), ref_batch_norm(x.double(), w, b, 1e-3, channel_dim), **tol
            )
            torch.testing.assert_close(bn.running_mean.double(), moving_mean, **tol)
            torch.testing.assert_close(bn.running_var.double(), moving_var, **tol)
        assert int(bn.num_batches_tracked) == 4
        bn.eval()
        x = _data(shape, 10, dtype)
        with torch.no_grad():
            torch.testing.assert_close(
                bn(x).double(),
                ref_batch_norm(
                    x.double(), w, b, 1e-3, channel_dim, mean=moving_mean, var=moving_var
                ),
                **tol,
            )


def test_keras_batch_norm_training_gradients_are_those_of_the_formula():
    bn = BatchNorm(3, convention="keras", dtype=torch.float64)
    _randomize_affine(bn)
    x = _data((4, 3, 5), 0).requires_grad_()
    grad = _data((4, 3, 5), 1, scale=1.0, shift=0.0)
    bn(x).backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    ref_batch_norm(x_ref, w, b, 1e-3).backward(grad)
    for got, want in ((x.grad, x_ref.grad), (bn.weight.grad, w.grad), (bn.bias.grad, b.grad)):
        torch.testing.assert_close(got, want, **TIGHT)


def test_keras_batch_norm_without_running_stats_always_uses_the_batch():
    bn = BatchNorm(3, convention="keras", track_running_stats=False, dtype=torch.float64)
    x = _data((5, 3), 0)
    for mode in (True, False):
        bn.train(mode)
        torch.testing.assert_close(bn(x), ref_batch_norm(x, None, None, 1e-3), **TIGHT)
    assert bn.running_mean is None and bn.num_batches_tracked is None


def test_keras_momentum_none_is_rejected():
    with pytest.raises(ValueError, match="momentum=None"):
        BatchNorm(4, momentum=None, convention="keras")
    with pytest.raises(ValueError, match="momentum=None"):
        make_norm("batch", 4, convention="keras", momentum=None)


def test_unknown_convention_is_rejected():
    for build in (
        lambda: BatchNorm(4, convention="jax"),
        lambda: LayerNorm(4, convention="jax"),
        lambda: RMSNorm(4, convention="jax"),
        lambda: GroupNorm(2, 4, convention="jax"),
        lambda: InstanceNorm(4, convention="jax"),
        lambda: make_norm("batch", 4, convention="jax"),
    ):
        with pytest.raises(ValueError, match="convention='jax'.*'torch', 'keras'"):
            build()


# ============================================================================================
# 5. hypothesis properties

PER_SAMPLE_KINDS = ("layer", "layer2d", "rms", "group", "instance", "dyt")
ALL_KINDS = ("batch", *PER_SAMPLE_KINDS)
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@st.composite
def norm_cases(draw, kinds=ALL_KINDS, dtypes=DTYPES):
    kind = draw(st.sampled_from(kinds))
    channel_dim = 1 if kind == "layer2d" else draw(st.sampled_from((1, -1)))
    rank = draw(st.integers(3 if kind == "instance" else 2, 5))
    n = draw(st.integers(2, 5))
    c = draw(st.integers(1, 12))
    spatial = draw(st.lists(st.integers(1, 5), min_size=rank - 2, max_size=rank - 2))
    if kind == "instance" and math.prod(spatial) < 2:
        spatial[0] = 2  # instance norm in training needs two positions per channel
    shape = (n, c, *spatial) if channel_dim == 1 else (n, *spatial, c)
    dtype = draw(st.sampled_from(dtypes))
    eps = draw(st.sampled_from((1e-5, 1e-3, 0.1)) | st.floats(1e-6, 1.0))
    case = {
        "kind": kind,
        "shape": shape,
        "channel_dim": channel_dim,
        "dtype": dtype,
        "eps": eps,
        "seed": draw(st.integers(0, 2**31 - 1)),
        "scale": draw(st.floats(0.5, 3.0)),
        "shift": draw(st.floats(-2.0, 2.0)),
    }
    if kind == "rms" and dtype != torch.bfloat16 and draw(st.booleans()):
        case["eps"] = None
    if kind in ("layer", "rms") and channel_dim == -1 and rank >= 3 and draw(st.booleans()):
        case["normalized_shape"] = shape[-2:]  # several trailing dims
    if kind == "group":
        case["groups"] = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    if kind == "dyt":
        case["alpha"] = draw(st.floats(-2.0, 2.0))
    if kind == "batch":
        case["convention"] = draw(st.sampled_from(("torch", "keras")))
    return case


def _build_case(case):
    kind, cd, eps = case["kind"], case["channel_dim"], case["eps"]
    c = case["shape"][1] if cd == 1 else case["shape"][-1]
    factory = {"dtype": case["dtype"]}
    if kind == "batch":
        m = BatchNorm(c, eps, convention=case["convention"], channel_dim=cd, **factory)
    elif kind == "layer":
        m = LayerNorm(case.get("normalized_shape", c), eps, channel_dim=cd, **factory)
    elif kind == "layer2d":
        m = LayerNorm2d(c, eps, **factory)
    elif kind == "rms":
        m = RMSNorm(case.get("normalized_shape", c), eps, channel_dim=cd, **factory)
    elif kind == "group":
        m = GroupNorm(case["groups"], c, eps, channel_dim=cd, **factory)
    elif kind == "instance":
        m = InstanceNorm(c, eps, affine=True, channel_dim=cd, **factory)
    else:
        m = DyT(c, case["alpha"], channel_dim=cd, **factory)
    _randomize_affine(m, seed=case["seed"] % 1000)
    return m


def _reference_case(case, module, x64):
    kind, cd, eps = case["kind"], case["channel_dim"], case["eps"]
    w, b = _p64(module, "weight"), _p64(module, "bias")
    if kind == "batch":
        return ref_batch_norm(x64, w, b, eps, cd)
    if kind in ("layer", "layer2d"):
        if "normalized_shape" in case:
            return ref_layer_norm(x64, case["normalized_shape"], w, b, eps)
        return ref_layer_norm_channels(x64, w, b, eps, cd)
    if kind == "rms":
        if eps is None:
            eps = torch.finfo(case["dtype"]).eps
        if "normalized_shape" in case:
            return ref_rms_norm(x64, case["normalized_shape"], w, eps)
        return ref_rms_norm_channels(x64, w, eps, cd)
    if kind == "group":
        return ref_group_norm(x64, case["groups"], w, b, eps, cd)
    if kind == "instance":
        return ref_instance_norm(x64, w, b, eps, cd)
    return ref_dyt(x64, _p64(module, "alpha"), w, b, cd)


def _statistics_case(case, x64):
    """Per element, broadcast to x's shape: the |mean| subtracted and the sqrt(var + eps)
    divided by, for the normalizing kinds (None for DyT, which has neither)."""
    kind, cd, eps = case["kind"], case["channel_dim"], case["eps"]
    if kind == "dyt":
        return None
    if kind == "rms" and eps is None:
        eps = torch.finfo(case["dtype"]).eps
    if kind in ("layer", "layer2d", "rms"):
        if "normalized_shape" in case:
            t, back = x64, lambda u: u
            dims = [-2, -1]
        else:
            t = x64 if cd == -1 or x64.dim() <= 2 else x64.movedim(1, -1)
            back = (lambda u: u) if t is x64 else (lambda u: u.movedim(-1, 1))
            dims = [-1]
        if kind == "rms":
            mean = torch.zeros_like(t)
            scale = torch.sqrt((t * t).mean(dims, keepdim=True) + eps).expand_as(t)
        else:
            mean = t.mean(dims, keepdim=True)
            scale = torch.sqrt(((t - mean) ** 2).mean(dims, keepdim=True) + eps).expand_as(t)
        return back(mean.expand_as(t).abs()), back(scale)
    t = _channels_first(x64, cd)
    if kind == "group":
        g = t.reshape(t.shape[0], case["groups"], -1)
        mean = g.mean(2, keepdim=True)
        scale = torch.sqrt(((g - mean) ** 2).mean(2, keepdim=True) + eps)
        mean, scale = mean.expand_as(g).reshape(t.shape), scale.expand_as(g).reshape(t.shape)
    else:
        dims = [0, *range(2, t.dim())] if kind == "batch" else list(range(2, t.dim()))
        mean = t.mean(dims, keepdim=True)
        scale = torch.sqrt(((t - mean) ** 2).mean(dims, keepdim=True) + eps)
        mean, scale = mean.expand_as(t), scale.expand_as(t)
    return _channels_back(mean.abs(), cd), _channels_back(scale, cd)


# Per dtype: absolute and relative tolerance on the output, and the unit roundoff u.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10, 2.0**-53),
    torch.float32: (1e-5, 1e-5, 2.0**-24),
    torch.bfloat16: (0.06, 0.03, 2.0**-8),
}


def _assert_close_to_reference(case, module, x, y, expected):
    """Compare with the float64 reference, allowing for the conditioning of normalization.

    Besides the output's own rounding, x - mean is only known to about u * (|x| + |mean|),
    which the division by sqrt(var + eps) amplifies, by up to 1/sqrt(eps) when a
    normalization group holds one value or nearly equal ones. torch's CPU batch_norm and
    instance_norm keep bfloat16 statistics in bfloat16, so there the whole error is of that
    kind. The bound allows 16 times that term, times |gamma|."""
    atol, rtol, u = TOLERANCE[case["dtype"]]
    x64 = x.double()
    slack = torch.zeros_like(expected)
    stats = _statistics_case(case, x64)
    if stats is not None:
        mean, scale = stats
        gamma = _p64(module, "weight")
        per_channel = case["kind"] not in ("layer", "layer2d", "rms") or (
            case["channel_dim"] == 1 and x.dim() > 2 and "normalized_shape" not in case
        )
        if per_channel:  # else gamma already broadcasts over the trailing dims
            gamma = _channels_back(_per_channel(gamma, x.dim()), case["channel_dim"])
        slack = gamma.abs() * 16 * u * (x64.abs() + mean) / scale
    err = (y.double() - expected).abs()
    excess = err - (atol + rtol * expected.abs() + slack)
    assert excess.max() <= 0, (
        f"{case['dtype']} output off the float64 reference by {err.flatten()[excess.argmax()]}"
        f" at flat index {excess.argmax().item()}, beyond its bound"
    )


def _case_input(case):
    return _data(case["shape"], case["seed"], case["dtype"], case["scale"], case["shift"])


@HYPOTHESIS
@given(norm_cases())
def test_property_output_is_the_reference_with_the_input_shape_and_dtype(case):
    module = _build_case(case)
    x = _case_input(case)
    with torch.no_grad():
        y = module(x)
        expected = _reference_case(case, module, x.double())
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    _assert_close_to_reference(case, module, x, y, expected)


@HYPOTHESIS
@given(norm_cases(kinds=("batch",)))
def test_property_batch_norm_running_stats_follow_their_convention(case):
    bn = _build_case(case)
    x = _case_input(case)
    with torch.no_grad():
        bn(x)
    mean, biased, unbiased = ref_batch_stats(x.double(), case["channel_dim"])
    if case["convention"] == "keras":
        want_mean, want_var = 0.01 * mean, 0.99 + 0.01 * biased
    else:
        want_mean, want_var = 0.1 * mean, 0.9 + 0.1 * unbiased
    tol = {
        torch.float64: {"atol": 1e-10, "rtol": 1e-10},
        torch.float32: {"atol": 1e-5, "rtol": 1e-5},
        torch.bfloat16: {"atol": 0.06, "rtol": 0.03},
    }[case["dtype"]]
    torch.testing.assert_close(bn.running_mean.double(), want_mean, **tol)
    torch.testing.assert_close(bn.running_var.double(), want_var, **tol)
    assert bn.running_mean.dtype == case["dtype"] and int(bn.num_batches_tracked) == 1


@HYPOTHESIS
@given(norm_cases(kinds=PER_SAMPLE_KINDS))
def test_property_per_sample_norms_ignore_the_rest_of_the_batch(case):
    module = _build_case(case)
    x = _case_input(case)
    others = x.clone()
    others[1:] = _data(x[1:].shape, case["seed"] + 1, x.dtype, scale=5.0, shift=-3.0)
    with torch.no_grad():
        y = module(x)
        # the same sample in another batch: the same output, to rounding
        _assert_close_to_reference(case, module, x[:1], module(others)[:1], y[:1].double())
        for i in range(x.shape[0]):
            _assert_close_to_reference(
                case, module, x[i : i + 1], module(x[i : i + 1]), y[i : i + 1].double()
            )


@HYPOTHESIS
@given(norm_cases(kinds=("batch",), dtypes=(torch.float32, torch.float64)))
def test_property_batch_norm_depends_on_the_rest_of_the_batch(case):
    bn = _build_case(case)
    bn.reset_parameters()  # gamma = 1: no channel's output is scaled towards 0
    x = _case_input(case)
    above, below = x.clone(), x.clone()
    # Put the other samples far above, then far below, sample 0: its normalized values go
    # from about -sqrt(N - 1) to about +sqrt(N - 1), although sample 0 itself is unchanged.
    above[1:] += 100.0
    below[1:] -= 100.0
    with torch.no_grad():
        change = (bn(below)[0] - bn(above)[0]).min().item()
    assert change > 1.0
    # in eval mode, with running statistics, it no longer does
    bn.eval()
    with torch.no_grad():
        assert torch.equal(bn(above)[0], bn(below)[0])


# ============================================================================================
# 6. make_norm


def _features(module):
    if isinstance(module, (LayerNorm, RMSNorm)):
        assert len(module.normalized_shape) == 1
        return module.normalized_shape[0]
    if isinstance(module, GroupNorm):
        return module.num_channels
    return module.num_features


KIND_CLASSES = {
    "batch": BatchNorm,
    "layer": LayerNorm,
    "rms": RMSNorm,
    "group": GroupNorm,
    "instance": InstanceNorm,
    "dyt": DyT,
    "none": nn.Identity,
}


def test_norm_kinds_are_the_documented_ones():
    assert set(NORM_KINDS) == set(KIND_CLASSES)


@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("kind", [k for k in NORM_KINDS if k != "none"])
def test_make_norm_builds_each_kind(kind, channel_dim):
    module = make_norm(kind, 24, channel_dim=channel_dim)
    assert type(module) is KIND_CLASSES[kind]
    assert _features(module) == 24
    assert module.channel_dim == channel_dim
    # and it runs on an input of that layout
    x = _data((2, 24, 3, 4) if channel_dim == 1 else (2, 3, 4, 24), 0, torch.float32)
    assert module(x).shape == x.shape


@pytest.mark.parametrize("kind", [None, "none"])
def test_make_norm_none_is_identity(kind):
    module = make_norm(kind, 5)
    assert isinstance(module, nn.Identity)
    x = torch.randn(2, 5)
    assert module(x) is x
    with pytest.raises(TypeError, match="eps"):
        make_norm(kind, 5, eps=1e-3)


def test_make_norm_layer_normalizes_channels_in_either_layout():
    x = _data((2, 6, 3, 4), 0, torch.float32)
    first = make_norm("layer", 6, channel_dim=1)
    last = make_norm("layer", 6, channel_dim=-1)
    torch.testing.assert_close(first(x), last(x.movedim(1, -1)).movedim(-1, 1), **F32)
    torch.testing.assert_close(first(x), LayerNorm2d(6)(x), **F32)


def test_make_norm_passes_options_through():
    assert make_norm("batch", 4, eps=0.01, momentum=0.3, affine=False).momentum == 0.3
    assert make_norm("batch", 4, eps=0.01).eps == 0.01
    assert make_norm("batch", 4, affine=False).weight is None
    assert make_norm("layer", 4, elementwise_affine=False).weight is None
    assert make_norm("rms", 4, eps=1e-4).eps == 1e-4
    assert make_norm("group", 12, num_groups=3).num_groups == 3
    assert make_norm("dyt", 4, alpha_init=1.5).alpha.item() == 1.5
    assert make_norm("batch", 4, dtype=torch.float64).weight.dtype == torch.float64


def test_make_norm_calls_a_callable_kind():
    calls = []

    def my_norm(num_features, **options):
        calls.append((num_features, options))
        return nn.Dropout(0.0)

    module = make_norm(my_norm, 7, p=0.5)
    assert isinstance(module, nn.Dropout)
    assert calls == [(7, {"p": 0.5})]
    assert isinstance(make_norm(nn.BatchNorm1d, 7), nn.BatchNorm1d)
    assert make_norm(nn.BatchNorm1d, 7).num_features == 7


@pytest.mark.parametrize(
    ("channels", "groups"),
    [
        (64, 32),
        (96, 32),
        (48, 16),
        (24, 8),
        (12, 4),
        (6, 2),
        (7, 1),
        (1, 1),
        (32, 16),
        (16, 8),
        (8, 4),
        (2, 1),
    ],
)
def test_make_norm_group_defaults_to_gcd_of_32_and_channels(channels, groups):
    # gcd(32, C), halved where it would leave one channel per group.
    assert default_num_groups(channels) == groups
    assert groups == math.gcd(32, channels) or (groups * 2 == channels == math.gcd(32, channels))
    assert channels // groups >= 2 or channels == 1
    module = make_norm("group", channels)
    assert module.num_groups == groups and module.num_channels == channels


def test_make_norm_instance_defaults_to_affine():
    assert make_norm("instance", 5).affine is True
    assert make_norm("instance", 5).weight is not None
    assert make_norm("instance", 5, affine=False).weight is None
    assert InstanceNorm(5).affine is False  # the class keeps torch.nn's default


@pytest.mark.parametrize("kind", ["bach", "Batch", "", "identity", 3])
def test_make_norm_unknown_kind_lists_the_valid_ones(kind):
    with pytest.raises(ValueError) as info:
        make_norm(kind, 4)
    message = str(info.value)
    assert repr(kind) in message
    for valid in NORM_KINDS:
        assert repr(valid) in message


@pytest.mark.parametrize(
    ("kind", "option"),
    [
        ("batch", "groups"),
        ("layer", "momentum"),
        ("rms", "bias"),
        ("group", "momentum"),
        ("instance", "num_groups"),
        ("dyt", "eps"),
    ],
)
def test_make_norm_unknown_option_is_a_type_error_naming_it(kind, option):
    with pytest.raises(TypeError, match=rf"\b{option}\b"):
        make_norm(kind, 4, **{option: 1})


def test_make_norm_checks_its_own_arguments():
    with pytest.raises(ValueError, match="channel_dim"):
        make_norm("batch", 4, channel_dim=2)
    with pytest.raises(ValueError, match="num_features"):
        make_norm("batch", 0)
    with pytest.raises(TypeError, match="num_features"):
        make_norm("batch", 4.0)


# ============================================================================================
# 7. bad arguments and bad input

LAYERS = [
    pytest.param(lambda: BatchNorm(4), (3, 4, 5), id="batch"),
    pytest.param(lambda: BatchNorm(4, channel_dim=-1), (3, 5, 4), id="batch-last"),
    pytest.param(lambda: LayerNorm(4), (3, 5, 4), id="layer"),
    pytest.param(lambda: LayerNorm2d(4), (3, 4, 5), id="layer2d"),
    pytest.param(lambda: RMSNorm(4), (3, 5, 4), id="rms"),
    pytest.param(lambda: GroupNorm(2, 4), (3, 4, 5), id="group"),
    pytest.param(lambda: GroupNorm(2, 4, channel_dim=-1), (3, 5, 4), id="group-last"),
    pytest.param(lambda: InstanceNorm(4), (3, 4, 5), id="instance"),
    pytest.param(lambda: DyT(4), (3, 5, 4), id="dyt"),
    pytest.param(lambda: DyT(4, channel_dim=1), (3, 4, 5), id="dyt-first"),
]


@pytest.mark.parametrize(("make", "shape"), LAYERS)
def test_non_tensor_input_is_a_type_error(make, shape):
    module = make()
    for bad in (_data(shape, 0).tolist(), None, 3.0):
        with pytest.raises(TypeError, match="torch.Tensor"):
            module(bad)


@pytest.mark.parametrize(("make", "shape"), LAYERS)
def test_wrong_channel_count_is_a_value_error(make, shape):
    module = make()
    wrong = list(shape)
    wrong[1 if module.channel_dim == 1 else -1] = 3
    with pytest.raises(ValueError, match=r"4|\(\.\.\., 4\)") as info:
        module(torch.randn(wrong))
    assert str(tuple(wrong)) in str(info.value)


@pytest.mark.parametrize(
    ("make", "bad_shape", "pattern"),
    [
        (lambda: BatchNorm(4), (4,), r"2-D or 3-D or 4-D or 5-D.*1-D"),
        (lambda: BatchNorm(4), (2, 4, 2, 2, 2, 2), r"2-D or 3-D or 4-D or 5-D.*6-D"),
        (lambda: InstanceNorm(4), (3, 4), r"3-D or 4-D or 5-D.*2-D"),
        (lambda: GroupNorm(2, 4), (4,), r"2-D or 3-D or 4-D or 5-D.*1-D"),
        (lambda: DyT(4), (2, 2, 2, 2, 2, 4), r"6-D"),
        (lambda: LayerNorm2d(4), (4,), r"\(N, 4, \.\.\.\)"),
        (lambda: LayerNorm((3, 4)), (4,), r"\(\.\.\., 3, 4\)"),
        (lambda: RMSNorm((3, 4)), (2, 4), r"\(\.\.\., 3, 4\)"),
    ],
)
def test_wrong_rank_is_a_value_error_naming_the_accepted_ranks(make, bad_shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()(torch.randn(bad_shape))


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1), (1, 4, 1, 1, 1)], ids=str)
@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_batch_norm_training_on_one_value_per_channel_is_a_value_error(shape, convention):
    bn = BatchNorm(4, convention=convention)
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(x)
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(4))
    # the same input is fine in eval mode with running statistics...
    bn.eval()
    assert bn(x).shape == x.shape
    # ...but not without them (the batch's own statistics are used)
    nostats = BatchNorm(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than one value per channel"):
        nostats(x)
    # two values per channel are enough
    assert BatchNorm(4)(torch.randn(1, 4, 2)).shape == (1, 4, 2)


def test_bad_input_does_not_touch_the_running_stats():
    bn = BatchNorm(4)
    with pytest.raises(ValueError):
        bn(torch.randn(3, 5))
    assert int(bn.num_batches_tracked) == 0


def test_instance_norm_training_on_one_position_is_a_value_error():
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        InstanceNorm(4)(torch.randn(3, 4, 1, 1))


@pytest.mark.parametrize(("groups", "channels"), [(4, 6), (5, 12), (7, 3)])
def test_group_norm_groups_must_divide_channels(groups, channels):
    with pytest.raises(
        ValueError, match=f"num_groups={groups} must divide num_channels={channels}"
    ):
        GroupNorm(groups, channels)
    with pytest.raises(ValueError, match="must divide"):
        make_norm("group", channels, num_groups=groups)


@pytest.mark.parametrize("eps", [-1e-5, -1.0, float("nan"), "1e-5"])
@pytest.mark.parametrize(
    "build",
    [
        lambda e: BatchNorm(4, eps=e),
        lambda e: LayerNorm(4, eps=e),
        lambda e: LayerNorm2d(4, eps=e),
        lambda e: RMSNorm(4, eps=e),
        lambda e: GroupNorm(2, 4, eps=e),
        lambda e: InstanceNorm(4, eps=e),
        lambda e: make_norm("batch", 4, eps=e),
    ],
    ids=["batch", "layer", "layer2d", "rms", "group", "instance", "make_norm"],
)
def test_bad_eps_is_rejected(build, eps):
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        build(eps)


def test_zero_eps_is_accepted():
    assert BatchNorm(4, eps=0).eps == 0.0
    assert LayerNorm(4, eps=0.0).eps == 0.0


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), float("inf")])
@pytest.mark.parametrize(
    "build",
    [
        lambda m: BatchNorm(4, momentum=m),
        lambda m: BatchNorm(4, momentum=m, convention="keras"),
        lambda m: InstanceNorm(4, momentum=m),
    ],
    ids=["batch", "batch-keras", "instance"],
)
def test_momentum_outside_zero_one_is_rejected(build, momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        build(momentum)


def test_momentum_bounds_and_types():
    assert BatchNorm(4, momentum=0).momentum == 0.0
    assert BatchNorm(4, momentum=1).momentum == 1.0
    with pytest.raises(TypeError, match="momentum"):
        BatchNorm(4, momentum="0.1")
    with pytest.raises(TypeError, match="momentum"):
        InstanceNorm(4, momentum=True)


@pytest.mark.parametrize("channel_dim", [0, 2, -2, 3, None])
@pytest.mark.parametrize(
    "build",
    [
        lambda d: BatchNorm(4, channel_dim=d),
        lambda d: LayerNorm(4, channel_dim=d),
        lambda d: RMSNorm(4, channel_dim=d),
        lambda d: GroupNorm(2, 4, channel_dim=d),
        lambda d: InstanceNorm(4, channel_dim=d),
        lambda d: DyT(4, channel_dim=d),
        lambda d: make_norm("layer", 4, channel_dim=d),
    ],
    ids=["batch", "layer", "rms", "group", "instance", "dyt", "make_norm"],
)
def test_channel_dim_must_be_one_or_minus_one(build, channel_dim):
    with pytest.raises(
        ValueError,
        match=rf"channel_dim={channel_dim!r} is not supported; "
        r"accepted values: 1, -1",
    ):
        build(channel_dim)


def test_bad_feature_counts_are_rejected():
    for build in (
        lambda: BatchNorm(0),
        lambda: InstanceNorm(-1),
        lambda: DyT(0),
        lambda: GroupNorm(1, 0),
        lambda: GroupNorm(0, 4),
        lambda: LayerNorm(0),
        lambda: RMSNorm((3, 0)),
    ):
        with pytest.raises(ValueError, match=">= 1"):
            build()
    with pytest.raises(TypeError, match="num_features must be an integer"):
        BatchNorm(4.0)
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNorm(())
    with pytest.raises(ValueError, match="channel_dim=1.*channel count"):
        LayerNorm((3, 4), channel_dim=1)


# ============================================================================================
# 8. extra_repr and reset_parameters


@pytest.mark.parametrize(
    "module",
    [
        BatchNorm(7, eps=0.0123),
        LayerNorm(7, eps=0.0123),
        LayerNorm2d(7, eps=0.0123),
        RMSNorm(7, eps=0.0123),
        GroupNorm(1, 7, eps=0.0123),
        InstanceNorm(7, eps=0.0123),
    ],
    ids=lambda m: type(m).__name__,
)
def test_repr_shows_features_and_eps(module):
    text = repr(module)
    assert text.startswith(type(module).__name__ + "(")
    assert re.search(r"(?<![\d.])7(?![\d.])", text), text
    assert "eps=0.0123" in text


def test_repr_shows_non_default_settings():
    assert "momentum=0.99" in repr(BatchNorm(3, convention="keras"))
    assert "convention='keras'" in repr(BatchNorm(3, convention="keras"))
    assert "convention" not in repr(BatchNorm(3))
    assert "momentum=None" in repr(BatchNorm(3, momentum=None))
    assert "affine=False" in repr(BatchNorm(3, affine=False))
    assert "channel_dim=-1" in repr(BatchNorm(3, channel_dim=-1))
    assert "channel_dim" not in repr(BatchNorm(3))
    assert "channel_dim=1" in repr(LayerNorm2d(3))
    assert "channel_dim" not in repr(LayerNorm(3))
    assert "channel_dim=-1" in repr(GroupNorm(1, 3, channel_dim=-1))
    assert "eps=None" in repr(RMSNorm(3))
    assert "elementwise_affine=False" in repr(LayerNorm(3, elementwise_affine=False))
    text = repr(DyT(9, alpha_init=0.25))
    assert "9" in text and "alpha_init=0.25" in text and "channel_dim" not in text
    assert "channel_dim=1" in repr(DyT(9, channel_dim=1))


@pytest.mark.parametrize(
    "module",
    [
        BatchNorm(5),
        InstanceNorm(5, affine=True, track_running_stats=True),
        LayerNorm((2, 5)),
        LayerNorm(5, bias=False),
        LayerNorm2d(5),
        RMSNorm(5),
        GroupNorm(5, 5),
        DyT(5, 0.3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_reset_parameters_restores_ones_and_zeros(module):
    shape = (4, 5, 3) if module.channel_dim == 1 else (4, 2, 5)
    _randomize_affine(module, seed=3)
    with torch.no_grad():
        if isinstance(module, DyT):
            module.alpha.fill_(2.0)
        module.train()
        module(_data(shape, 0, torch.float32))
    if getattr(module, "running_mean", None) is not None:
        assert not torch.equal(module.running_mean, torch.zeros(5))
        module.num_batches_tracked.fill_(7)
    assert not torch.equal(module.weight, torch.ones_like(module.weight))
    module.reset_parameters()
    assert torch.equal(module.weight, torch.ones_like(module.weight))
    if getattr(module, "bias", None) is not None:
        assert torch.equal(module.bias, torch.zeros_like(module.bias))
    if isinstance(module, DyT):
        assert torch.equal(module.alpha, torch.tensor([0.3]))
    if getattr(module, "running_mean", None) is not None:
        assert torch.equal(module.running_mean, torch.zeros(5))
        assert torch.equal(module.running_var, torch.ones(5))
        assert int(module.num_batches_tracked) == 0


def test_no_affine_parameters_when_disabled():
    assert list(BatchNorm(3, affine=False).parameters()) == []
    assert list(LayerNorm(3, elementwise_affine=False).parameters()) == []
    assert [n for n, _ in LayerNorm(3, bias=False).named_parameters()] == ["weight"]
    assert list(RMSNorm(3, elementwise_affine=False).parameters()) == []
    assert list(GroupNorm(1, 3, affine=False).parameters()) == []
    assert sorted(n for n, _ in DyT(3).named_parameters()) == ["alpha", "bias", "weight"]


@pytest.mark.parametrize("kind", ["batch", "layer", "rms", "group", "instance", "dyt"])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_contiguous_input_gives_a_contiguous_output(kind, channel_dim):
    """A norm that moves channels to compute must move them back into the input's layout:
    channels-last strides handed to the next convolution trip a heap corruption in
    PyTorch 2.13's oneDNN backward of a strided 1x1 convolution (one thread)."""
    norm = make_norm(kind, 8, channel_dim=channel_dim)
    x = torch.randn(4, 8, 6, 6) if channel_dim == 1 else torch.randn(4, 6, 6, 8)
    assert norm(x).is_contiguous()


def test_the_norm_table_is_the_one_source_of_kinds():
    from resnorm.diagnostics.diagnose import NORM_CLASSES as DIAGNOSED
    from resnorm.norms import FUSED_KINDS, NORM_CLASSES, NORM_TABLE

    assert NORM_KINDS == (*NORM_TABLE, "none")
    assert FUSED_KINDS == tuple(k for k, row in NORM_TABLE.items() if row.fused_cls)
    for name, row in NORM_TABLE.items():
        assert type(make_norm(name, 8)) is row.cls
        if row.fused_cls is not None:
            assert type(make_norm(name, 8, fused=True)) is row.fused_cls
        assert row.cls in NORM_CLASSES and set(NORM_CLASSES) <= set(DIAGNOSED)
