"""MomentBatch (the recorder's statistics, taken together) against the one-by-one
functions and a float64 oracle computed here from the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from resnorm.diagnostics import diagnose
from resnorm.diagnostics.stats import (
    MomentBatch,
    channel_stats,
    squared_norms,
    summarize_activation,
)


def _oracle_summary(x: torch.Tensor, rectified: bool) -> tuple:
    v = x.detach().double()
    mean, var = v.mean().item(), v.var(unbiased=False).item()
    dead = None
    if rectified and v.dim() >= 2 and v.shape[0] > 1:
        dead = (v.abs().amax(dim=0) == 0).double().mean().item()
    return mean, math.sqrt(var), dead, 0, v.numel()


def _oracle_channel(x: torch.Tensor, dim: int) -> tuple[float, float]:
    v = x.detach().double()
    v = v.unsqueeze(1) if v.dim() == 1 else v
    v = v.movedim(dim % v.dim(), 0).reshape(v.shape[dim % v.dim()], -1)
    means, variances = v.mean(1), v.var(1, unbiased=False)
    return means.square().mean().item(), variances.mean().item()


@pytest.fixture(params=["stock", "compiled"])
def kernel(request):
    """None (PyTorch ops) or the compiled kernel's statistics: both paths are tested."""
    if request.param == "stock":
        return None
    return _compiled()


def _compiled():
    from resnorm.diagnostics.norm_stats import compiled_norms

    compiled = compiled_norms(None)
    if compiled is None:
        pytest.skip("the compiled CPU kernel is unavailable here")
    return compiled


def _close(a, b, rel=1e-9):
    for u, w in zip(a, b):
        if u is None or w is None:
            assert u is w
        else:
            assert u == pytest.approx(w, rel=rel, abs=1e-12)


SHAPES = [
    ((64, 16), (1, -1)),  # (N, C): an MLP layer
    ((8, 6, 5, 3), (1, -1, 2)),  # (N, C, H, W): a conv feature map
    ((4, 7, 10), (-1, 1)),  # (N, T, C): tokens
    ((32,), (1, -1)),  # 1-D: one column
    ((5, 3), (0,)),  # the batch axis: measured by itself
    ((1, 9), (1,)),  # one sample: no dead fraction
]


@pytest.mark.parametrize("shape,dims", SHAPES)
def test_batch_matches_one_by_one_and_the_float64_oracle(shape, dims, kernel):
    g = torch.Generator().manual_seed(len(shape))
    tensors = [(torch.randn(*shape, generator=g) * 3 + 1.5).relu() for _ in range(3)]
    tensors.append(torch.randn(*shape, generator=g) + 100.0)  # large mean, small spread
    batch = MomentBatch(kernel)
    entries = [
        batch.add(t, summary=True, rectified=i % 2 == 0, channel_dims=dims)
        for i, t in enumerate(tensors)
    ]
    batch.settle()
    for i, (t, entry) in enumerate(zip(tensors, entries)):
        rectified = i % 2 == 0
        s = entry.summary
        got = (s.mean, s.std, s.dead_fraction, s.nonfinite, s.numel)
        one = summarize_activation(t, rectified=rectified)
        _close(got, _oracle_summary(t, rectified))
        _close(got, (one.mean, one.std, one.dead_fraction, one.nonfinite, one.numel))
        for dim in dims:
            _close(entry.channel[dim], _oracle_channel(t, dim), rel=1e-8)
            _close(entry.channel[dim], channel_stats(t, dim), rel=1e-8)


def test_measured_when_added_not_after_in_place_changes():
    x = torch.tensor([[-1.0, 2.0], [3.0, -4.0], [0.5, 0.0]])
    expected = summarize_activation(x, rectified=False)
    batch = MomentBatch()
    entry = batch.add(x, summary=True, channel_dims=(1,))
    channel = channel_stats(x, 1)
    x.relu_()  # what nn.ReLU(inplace=True) after the module does
    x += 1.0  # and ``out += identity``
    batch.settle()
    assert entry.summary == expected
    _close(entry.channel[1], channel)


def test_one_tensor_asked_twice_is_measured_once_and_a_changed_one_again():
    x = torch.randn(16, 4).relu()
    batch = MomentBatch()
    first = batch.add(x, summary=True, rectified=True)
    again = batch.add(x, channel_dims=(1,))
    assert again is first
    x.mul_(2.0)  # modified in place: a new measurement
    changed = batch.add(x, summary=True)
    assert changed is not first
    batch.settle()
    assert first.summary.dead_fraction is not None
    assert first.summary_as(False).dead_fraction is None
    assert changed.summary.mean == pytest.approx(2 * first.summary.mean)
    _close(first.channel[1], _oracle_channel(x / 2, 1))


def test_inference_tensors_are_measured_each_time():
    with torch.inference_mode():
        x = torch.randn(8, 3)
    batch = MomentBatch()
    first, again = batch.add(x, summary=True), batch.add(x, summary=True)
    batch.settle()
    assert first is not again  # no version counter to tell that it is unchanged
    _close((first.summary.mean, first.summary.std), _oracle_summary(x, False)[:2])
    assert again.summary == first.summary


def test_nonfinite_values_are_counted_and_left_out(kernel):
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0], [-float("inf"), 5.0]])
    batch = MomentBatch(kernel)
    entry = batch.add(x, summary=True, rectified=True, channel_dims=(1,))
    batch.settle()
    assert entry.summary == summarize_activation(x, rectified=True)
    assert entry.summary.nonfinite == 3
    assert all(math.isnan(v) for v in entry.channel[1])


def test_large_and_empty_and_integer_tensors_are_measured_at_once(monkeypatch):
    import resnorm.diagnostics.stats as stats

    monkeypatch.setattr(stats, "COPY_LIMIT", 10)  # "large" above 10 values
    big = torch.randn(6, 5) * 2 + 1
    batch = MomentBatch()
    entries = [
        batch.add(big, summary=True, channel_dims=(1,)),
        batch.add(torch.zeros(0, 3), summary=True),
        batch.add(torch.arange(12).reshape(4, 3), summary=True),
    ]
    batch.settle()
    _close(
        (entries[0].summary.mean, entries[0].summary.std),
        _oracle_summary(big, False)[:2],
    )
    _close(entries[0].channel[1], _oracle_channel(big, 1), rel=1e-8)
    assert math.isnan(entries[1].summary.mean)
    assert entries[2].summary.mean == pytest.approx(5.5)


def test_diagnose_statistics_equal_the_one_by_one_functions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.ReLU(inplace=True), torch.nn.Linear(16, 16),
        torch.nn.GELU(), torch.nn.Linear(16, 3),
    )  # fmt: skip
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    d = diagnose(model, x, y)
    with torch.no_grad():
        h0 = model[0](x)
        h2 = model[2](h0.relu())
        expected = {
            "0": summarize_activation(h0, rectified=False),
            "1": summarize_activation(h0.relu(), rectified=True),
            "2": summarize_activation(h2, rectified=False),
            "3": summarize_activation(model[3](h2), rectified=False),
        }
    for key, want in expected.items():
        got = d.activations[key]
        _close(
            (got.mean, got.std, got.dead_fraction, got.nonfinite, got.numel),
            (want.mean, want.std, want.dead_fraction, want.nonfinite, want.numel),
        )


def test_squared_norms_match_float64():
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(4, 3, generator=g), torch.zeros(0), torch.randn(7, generator=g)]
    tensors += [torch.randn(30, generator=g) * 1e-20, torch.full((2,), float("nan"))]
    got = squared_norms(tensors)
    want = [float(t.double().square().sum()) for t in tensors]
    assert got[:4] == pytest.approx(want[:4], rel=1e-12)
    assert got[3] > 0 and got[1] == 0 and math.isnan(got[4])


# (256, 64): an MLP layer; 4-D and 3-D; one axis and none (one unit); one sample; one
# unit per sample; 2,500 units (three chunks of the kernel's 1,024).
UNIT_SHAPES = [(256, 64), (8, 6, 5, 3), (4, 7, 10), (33,), (), (1, 9), (300, 1), (3, 2500)]


@pytest.mark.parametrize("shape", UNIT_SHAPES)
def test_compiled_unit_moments_match_float64(shape):
    compiled = _compiled()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 3 + 1.5
    sums, squares = compiled.unit_moments(x)
    values = x.double()
    rows = values.reshape(-1, 1) if values.dim() <= 1 else values
    assert sums.dtype == torch.float64 and sums.shape == rows.shape[1:]
    torch.testing.assert_close(sums, rows.sum(0), rtol=1e-12, atol=1e-12)
    assert squares == pytest.approx(values.square().sum().item(), rel=1e-13)


def test_compiled_unit_moments_are_the_same_on_any_number_of_threads():
    compiled = _compiled()
    x = torch.randn(64, 3000, generator=torch.Generator().manual_seed(8))  # split: 3 chunks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compiled.unit_moments(x)
        torch.set_num_threads(2)
        two = compiled.unit_moments(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and one[1] == two[1]


def test_compiled_unit_moments_refuse_what_they_do_not_take():
    compiled = _compiled()
    for x in (torch.ones(4, 3).t(), torch.ones(4, 3, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="contiguous float32"):
            compiled.unit_moments(x)


def test_squared_norms_with_the_kernel_match_float64():
    compiled = _compiled()
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(40, 30, generator=g), torch.randn(5, 6, generator=g).t()]
    tensors += [torch.randn(9, generator=g, dtype=torch.float64), torch.zeros(0)]
    tensors += [torch.randn(30, generator=g) * 1e-20, torch.full((2,), float("nan"))]
    got = squared_norms(tensors, compiled)  # kernel: 0, 3, 4, 5; PyTorch: 1 (strided), 2
    want = [float(t.double().square().sum()) for t in tensors]
    assert got[:5] == pytest.approx(want[:5], rel=1e-12)
    assert got[3] == 0 and got[4] > 0 and math.isnan(got[5])


def test_diagnose_gives_the_same_with_and_without_the_compiled_kernel(monkeypatch):
    """A residual model with a zero-initialized head (so the gate probe runs): every
    statistic with the kernel equals the PyTorch ops' to rounding, the verdict is the same."""
    _compiled()
    import importlib

    from resnorm import create_model

    diagnose_module = importlib.import_module("resnorm.diagnostics.diagnose")
    torch.manual_seed(0)
    model = create_model("mlp", depth=6, width=32, in_features=10, num_classes=4)
    torch.nn.init.zeros_(model.head.weight)
    x, y = torch.randn(96, 10), torch.randint(0, 4, (96,))
    with_kernel = diagnose(model, x, y)
    monkeypatch.setattr(diagnose_module, "compiled_norms", lambda compiled: None)
    without = diagnose(model, x, y)
    assert with_kernel.verdict == without.verdict and with_kernel.findings == without.findings
    assert [s.name for s in with_kernel.fired] == [s.name for s in without.fired]
    assert with_kernel.structure == without.structure
    assert with_kernel.activations.keys() == without.activations.keys()
    for key, got in with_kernel.activations.items():
        want = without.activations[key]
        _close(
            (got.mean, got.std, got.dead_fraction, got.nonfinite, got.numel),
            (want.mean, want.std, want.dead_fraction, want.nonfinite, want.numel),
            rel=1e-12,
        )
    for got, want in zip(with_kernel.layers, without.layers, strict=True):
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-12, abs=0)
        assert got.weight_norm == pytest.approx(want.weight_norm, rel=1e-12)
