"""Tests of resnorm.diagnostics: verdicts, statistics, state restoration, any nn.Module,
torch.compile, DDP, reports, the ``diagnose`` command and thresholds (the Monitor's are
in test_monitor.py)."""

import base64
import copy
import functools
import io
import math
import os
import re
import statistics
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from diagnostics_checks import _assert_no_hooks, _dead_relu_model, _strict_json
from torch import nn

from resnorm.cli import main
from resnorm.diagnostics import (
    ActivationSummary,
    Diagnosis,
    Monitor,
    Thresholds,
    Verdict,
    channel_stats,
    diagnose,
    summarize_activation,
)
from resnorm.models import create_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- helpers


def _hand_channel_stats(t: torch.Tensor, channel_dim: int) -> tuple[float, float]:
    """Average channel squared mean and average channel population variance, in Python."""
    t = t.detach().double().movedim(channel_dim, 0)
    means, variances = [], []
    for c in range(t.shape[0]):
        values = t[c].flatten().tolist()
        means.append(statistics.fmean(values))
        variances.append(statistics.pvariance(values))
    return statistics.fmean(m * m for m in means), statistics.fmean(variances)


def _calibration_setup(seed: int, residual: bool, norm: str):
    torch.manual_seed(seed)
    model = create_model("mlp", depth=48, width=128, residual=residual, norm=norm)
    x = torch.randn(128, 40)
    y = torch.randint(0, 10, (128,))
    return model, x, y


@functools.lru_cache(maxsize=None)
def _calibration(seed: int, residual: bool, norm: str):
    model, x, y = _calibration_setup(seed, residual, norm)
    return model, x, y, diagnose(model, x, y)


def _tiny_mlp(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(depth=2, width=4, in_features=3, num_classes=3)
    options.update(kwargs)
    model = create_model("mlp", **options)
    x = torch.randn(16, options["in_features"])
    y = torch.randint(0, options["num_classes"], (16,))
    return model, x, y


def _manual_grads(ref: nn.Module, x, y) -> dict[str, float]:
    """Weight-gradient norms from a plain forward/backward of ``ref`` (a copy the caller
    made) in training mode."""
    ref.train()
    for p in ref.parameters():
        p.grad = None
    F.cross_entropy(ref(x), y).backward()
    return {
        name: float(m.weight.grad.double().norm())
        for name, m in ref.named_modules()
        if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.grad is not None
    }


# --------------------------------------------------------------- 1. verdict calibration

PLAIN_NONE, PLAIN_BATCH, RESIDUAL_BATCH = (False, "none"), (False, "batch"), (True, "batch")
EXPECTED = {
    PLAIN_NONE: Verdict.VANISHING,
    PLAIN_BATCH: Verdict.EXPLODING,
    RESIDUAL_BATCH: Verdict.HEALTHY,
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "config",
    [PLAIN_NONE, PLAIN_BATCH, RESIDUAL_BATCH],
    ids=["plain-none", "plain-batch", "residual-batch"],
)
def test_verdict_calibration_at_initialization(seed, config):
    *_, d = _calibration(seed, *config)
    assert d.verdict is EXPECTED[config]
    grads = [layer.grad_norm for layer in d.layers]
    assert len(grads) == 2 + 2 * 48 + (0 if config[1] == "none" else 2 * 48)
    assert d.layers[0].name == "stem.0" and d.layers[-1].name == "head"
    assert d.grad_ratio == pytest.approx(grads[0] / grads[-1], rel=1e-12)
    if d.verdict is Verdict.HEALTHY:
        assert d.start_layer is None
        assert d.thresholds.vanishing_ratio <= d.grad_ratio <= d.thresholds.exploding_ratio
        assert d.remedies == []
        return
    assert d.start_layer is not None
    # The start is the first layer, going back from the output, whose gradient relative
    # to the output layer's crosses the threshold: every layer after it stays inside.
    names = [layer.name for layer in d.layers]
    start = names.index(d.start_layer)
    if d.verdict is Verdict.VANISHING:
        crosses = lambda r: r < d.thresholds.vanishing_ratio  # noqa: E731
    else:
        crosses = lambda r: r > d.thresholds.exploding_ratio  # noqa: E731
    assert crosses(grads[start] / grads[-1])
    assert not any(crosses(g / grads[-1]) for g in grads[start + 1 :])
    assert 0 < start < len(grads) - 1
    assert any("skip connections" in r for r in d.remedies)
    assert any(d.start_layer in f for f in d.findings)


def test_calibration_remedies_fit_the_structure():
    *_, vanishing = _calibration(0, *PLAIN_NONE)
    *_, exploding = _calibration(0, *PLAIN_BATCH)
    *_, healthy = _calibration(0, *RESIDUAL_BATCH)
    assert vanishing.structure == {
        "has_skip": False,
        "has_norm": False,
        "post_norm": False,
        "norm_kinds": [],
        "closed_gates": 0,
        "zero_init": False,
    }
    assert exploding.structure["has_skip"] is False and exploding.structure["has_norm"]
    assert healthy.structure["has_skip"] is True and healthy.structure["post_norm"] is True
    # No normalization: suggest adding it. Plain stacks: no advice that needs a skip path
    # (pre-norm placement, residual-branch scaling).
    assert any("Add normalization" in r for r in vanishing.remedies)
    text = " ".join(exploding.remedies)
    assert "Yang et al." in text  # batch norm named as the cause
    assert "placement='pre'" not in text and "pre-norm" not in text
    assert "rezero" not in text and "residual branches" not in text
    assert "placement='pre'" not in " ".join(vanishing.remedies)
    for d in (vanishing, exploding):
        assert d.summary().startswith(
            {Verdict.VANISHING: "Gradients vanish", Verdict.EXPLODING: "Gradients explode"}[
                d.verdict
            ]
        )


def test_torch_batchnorm_plain_stack_gets_the_batch_norm_remedy():
    torch.manual_seed(0)
    layers = [nn.Linear(40, 64), nn.BatchNorm1d(64), nn.ReLU()]
    for _ in range(39):
        layers += [nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    d = diagnose(model, torch.randn(128, 40), torch.randint(0, 10, (128,)))
    assert d.verdict is Verdict.EXPLODING
    assert d.structure["norm_kinds"] == ["BatchNorm1d"] and d.structure["has_skip"] is None
    assert any("Yang et al." in r for r in d.remedies)


def test_repeated_diagnosis_is_identical():
    model, x, y, first = _calibration(0, *RESIDUAL_BATCH)
    again = diagnose(model, x, y)
    assert [layer.grad_norm for layer in again.layers] == [
        layer.grad_norm for layer in first.layers
    ]
    assert again.blocks == first.blocks and again.loss == first.loss


# ------------------------------------------------------ 2. statistics by hand computation


def test_channel_stats_known_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # channel means 2, 4; variances 1, 4
    assert channel_stats(x, 1) == pytest.approx((10.0, 2.5))
    # Channels last: (N, T, C); each channel pools over N and T.
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 6.0]], [[5.0, -2.0], [7.0, 10.0]]])
    expected = (
        statistics.fmean([4.0**2, 4.0**2]),
        statistics.fmean(
            [statistics.pvariance([1, 3, 5, 7]), statistics.pvariance([2, 6, -2, 10])]
        ),
    )
    assert channel_stats(tokens, -1) == pytest.approx(expected)
    assert channel_stats(tokens, 2) == pytest.approx(expected)
    assert channel_stats(tokens, 1) != pytest.approx(expected)
    # Conv-shaped (N, C, H, W).
    g = torch.Generator().manual_seed(0)
    conv = (
        torch.randn(3, 4, 2, 5, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
        + 1.5
    )
    expected = _hand_channel_stats(conv, 1)
    assert channel_stats(conv) == pytest.approx(expected, rel=1e-10)
    assert channel_stats(conv.permute(0, 2, 3, 1), -1) == pytest.approx(expected, rel=1e-10)
    # One-dimensional input: a single channel over the batch.
    assert channel_stats(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx((6.25, 1.25))
    # Non-finite values give NaN, not a wrong number.
    bad = conv.clone()
    bad[0, 0, 0, 0] = float("inf")
    assert all(math.isnan(v) for v in channel_stats(bad))


def test_summarize_activation_by_hand():
    x = torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 2.0], [0.0, 3.0, 0.0]])
    values = [0.0, 1.0, 0.0, 0.0, -1.0, 2.0, 0.0, 3.0, 0.0]
    s = summarize_activation(x, rectified=True)
    assert isinstance(s, ActivationSummary)
    assert s.mean == pytest.approx(statistics.fmean(values))
    assert s.std == pytest.approx(statistics.pstdev(values))
    assert s.dead_fraction == pytest.approx(1 / 3)  # only column 0 is zero for all samples
    assert s.nonfinite == 0 and s.numel == 9
    assert summarize_activation(x, rectified=False).dead_fraction is None
    assert summarize_activation(x[:1], rectified=True).dead_fraction is None  # one sample
    # Conv-shaped: a unit is one channel at one position.
    conv = torch.ones(4, 2, 3, 3)
    conv[:, 1, 0, :] = 0.0
    assert summarize_activation(conv, rectified=True).dead_fraction == pytest.approx(3 / 18)
    # Non-finite values are counted and left out of mean and std.
    bad = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0], [-float("inf"), 5.0]])
    s = summarize_activation(bad, rectified=False)
    assert s.nonfinite == 3 and s.numel == 6
    assert s.mean == pytest.approx(3.0) and s.std == pytest.approx(statistics.pstdev([1, 3, 5]))
    s = summarize_activation(torch.full((2, 2), float("nan")), rectified=False)
    assert s.nonfinite == 4 and math.isnan(s.mean) and math.isnan(s.std)


def test_tiny_residual_mlp_matches_hand_computation():
    model, x, y = _tiny_mlp()
    ref = copy.deepcopy(model).train()
    outputs, merges, acts = {}, {}, {}
    for name in ("blocks.0", "blocks.1"):
        ref.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().clone())
        )
        ref.get_submodule(name + ".merge").register_forward_hook(
            lambda m, i, o, name=name: merges.__setitem__(name, [t.detach().clone() for t in i])
        )
    ref.get_submodule("blocks.1.act").register_forward_hook(
        lambda m, i, o: acts.setdefault("blocks.1.act", []).append(o.detach().clone())
    )
    loss = F.cross_entropy(ref(x), y)
    loss.backward()

    d = diagnose(model, x, y)
    assert isinstance(d, Diagnosis)
    expected_order = (
        ["stem.0"]
        + [f"blocks.{b}.{layer}" for b in (0, 1) for layer in ("fc1", "norm1", "fc2", "norm2")]
        + ["head"]
    )
    assert [layer.name for layer in d.layers] == expected_order
    assert [layer.kind for layer in d.layers[:3]] == ["Linear", "Linear", "BatchNorm"]
    for layer in d.layers:
        module = ref.get_submodule(layer.name)
        assert layer.grad_norm == pytest.approx(float(module.weight.grad.double().norm()), rel=1e-6)
        assert layer.weight_norm == pytest.approx(
            float(module.weight.detach().double().norm()), rel=1e-9
        )
        assert layer.relative == pytest.approx(layer.grad_norm / layer.weight_norm)
    assert d.grad_ratio == pytest.approx(d.layers[0].grad_norm / d.layers[-1].grad_norm, rel=1e-12)
    assert d.loss == pytest.approx(loss.item(), rel=1e-6)

    assert [b.name for b in d.blocks] == ["blocks.0", "blocks.1"]
    for b in d.blocks:
        sq_mean, var = _hand_channel_stats(outputs[b.name], 1)
        assert b.sq_mean == pytest.approx(sq_mean, rel=1e-6)
        assert b.var == pytest.approx(var, rel=1e-6)
        branch, skip = merges[b.name]
        assert b.branch_var == pytest.approx(_hand_channel_stats(branch, 1)[1], rel=1e-6)
        assert b.skip_var == pytest.approx(_hand_channel_stats(skip, 1)[1], rel=1e-6)
        assert b.residual is True
    # The block's activation runs twice (after fc1, after the merge): both calls are kept.
    first, second = acts["blocks.1.act"]
    assert d.activations["blocks.1.act"].mean == pytest.approx(first.double().mean().item())
    assert d.activations["blocks.1.act#2"].mean == pytest.approx(second.double().mean().item())
    assert d.activations["blocks.1.act#2"].dead_fraction == pytest.approx(
        (second == 0).all(dim=0).double().mean().item()
    )
    assert d.activations["blocks.0.fc1"].dead_fraction is None


def test_plain_block_reports_branch_but_no_skip():
    model, x, y = _tiny_mlp(residual=False)
    d = diagnose(model, x, y)
    assert all(
        b.residual is False and b.skip_var is None and b.branch_var is not None for b in d.blocks
    )


def test_default_loss_without_targets_and_with_float_targets():
    model, x, _ = _tiny_mlp()
    ref = copy.deepcopy(model).train()
    out = ref(x)
    assert diagnose(model, x).loss == pytest.approx((out.double() ** 2).mean().item() / 2, rel=1e-6)
    target = torch.zeros_like(out)
    assert diagnose(model, x, target).loss == pytest.approx(
        F.mse_loss(out, target).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="loss_fn"):
        diagnose(model, x, torch.zeros(16, 7))
    with pytest.raises(TypeError):
        diagnose("not a model", x)
    with pytest.raises(ValueError, match="weight"):
        diagnose(nn.ReLU(), x)


# --------------------------------------------------------- 3. the model is left as found


def _stateful_model():
    model, x, y = _tiny_mlp(depth=3, width=8, in_features=5)
    with torch.no_grad():  # non-trivial running statistics
        model.train()(torch.randn(32, 5) * 3 + 1)
    model.train()
    model.blocks[1].eval()
    model.head.eval()
    model.blocks[2].norm2.eval()
    return model, x, y


def _snapshot(model):
    return (
        {n: m.training for n, m in model.named_modules()},
        {n: b.clone() for n, b in model.named_buffers()},
        {n: p.detach().clone() for n, p in model.named_parameters()},
    )


def _assert_unchanged(model, snapshot):
    modes, buffers, params = snapshot
    assert {n: m.training for n, m in model.named_modules()} == modes
    now = dict(model.named_buffers())
    assert set(now) == set(buffers)
    for name, value in buffers.items():
        assert torch.equal(now[name], value), name
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name]), name


def test_diagnose_restores_modes_buffers_and_grads():
    model, x, y = _stateful_model()
    assert any(name.endswith("num_batches_tracked") for name, _ in model.named_buffers())
    grads = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if i % 2 == 0:
            p.grad = torch.randn_like(p)
            grads[name] = (p.grad, p.grad.clone())
    snapshot = _snapshot(model)
    d = diagnose(model, x, y)
    assert d.verdict in set(Verdict)
    _assert_unchanged(model, snapshot)
    for name, p in model.named_parameters():
        if name in grads:
            assert p.grad is grads[name][0] and torch.equal(p.grad, grads[name][1])
        else:
            assert p.grad is None
    _assert_no_hooks(model)


class _RaisesAfterFirstLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        self.act(self.bn(self.fc1(x)))
        raise RuntimeError("boom after the first layer")


def _bad_loss(output, targets):
    raise ArithmeticError("loss failed")


@pytest.mark.parametrize("case", ["forward", "loss_fn", "default_loss"])
def test_no_hooks_and_state_restored_when_something_raises(case):
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    if case == "forward":
        model, kwargs, error = _RaisesAfterFirstLayer().eval(), {}, RuntimeError
    elif case == "loss_fn":
        model, kwargs, error = (
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
            {"loss_fn": _bad_loss},
            ArithmeticError,
        )
    else:
        model, kwargs, error = (
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
            {},
            ValueError,
        )
        y = torch.zeros(8, 3, 3, dtype=torch.long)
    first = model.fc1 if case == "forward" else model[0]
    first.weight.grad = torch.ones_like(first.weight)
    saved_grad = first.weight.grad
    snapshot = _snapshot(model)
    with pytest.raises(error):
        diagnose(model, x, y, **kwargs)
    _assert_no_hooks(model)
    _assert_unchanged(model, snapshot)
    assert first.weight.grad is saved_grad and torch.equal(saved_grad, torch.ones_like(saved_grad))
    # The model still works, hook-free.
    if case != "forward":
        model(x)


# ------------------------------------------------------------------- 4. any nn.Module


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, inplace=True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )
        self.inplace = inplace

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        if self.inplace:
            out += identity
        else:
            out = out + identity
        return self.relu(out)


class _TinyResNet(nn.Module):
    def __init__(self, inplace=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=inplace)
        self.layer1 = nn.Sequential(_BasicBlock(4, 4, 1, inplace), _BasicBlock(4, 4, 1, inplace))
        self.layer2 = nn.Sequential(_BasicBlock(4, 8, 2, inplace), _BasicBlock(8, 8, 1, inplace))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


RESNET_BLOCKS = ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]


def test_torchvision_style_resnet_with_inplace_ops():
    torch.manual_seed(0)
    inplace = _TinyResNet(inplace=True)
    plain = _TinyResNet(inplace=False)
    plain.load_state_dict(inplace.state_dict())
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))

    outputs = {}
    ref = copy.deepcopy(plain).train()
    for name in RESNET_BLOCKS:
        ref.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().clone())
        )
    manual = _manual_grads(ref, x, y)
    d_in, d_out = diagnose(inplace, x, y), diagnose(plain, x, y)

    assert [b.name for b in d_in.blocks] == RESNET_BLOCKS
    assert all(b.residual is None and b.branch_var is None for b in d_in.blocks)
    names = [layer.name for layer in d_in.layers]
    assert names == [layer.name for layer in d_out.layers] and names[-1] == "fc"
    assert names.index("layer2.0.downsample.0") > names.index("layer2.0.bn2")
    assert set(names) == set(manual)
    for a, b in zip(d_in.layers, d_out.layers):
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6)
        assert a.grad_norm == pytest.approx(manual[a.name], rel=1e-6)
    for a, b in zip(d_in.blocks, d_out.blocks):
        sq_mean, var = _hand_channel_stats(outputs[a.name], 1)
        assert (a.sq_mean, a.var) == pytest.approx((b.sq_mean, b.var), rel=1e-6)
        assert (a.sq_mean, a.var) == pytest.approx((sq_mean, var), rel=1e-6)
    # bn1's output is rectified in place, bn2's gets the identity added in place: what was
    # measured is what the layer returned.
    assert set(d_in.activations) == set(d_out.activations)
    for key, summary in d_out.activations.items():
        other = d_in.activations[key]
        assert other.mean == pytest.approx(summary.mean, rel=1e-6, abs=1e-9), key
        assert other.std == pytest.approx(summary.std, rel=1e-6, abs=1e-9), key
        assert other.dead_fraction == summary.dead_fraction, key
    assert abs(d_in.activations["layer1.0.bn2"].mean) < 1e-5  # not bn2 + identity (> 0)
    _assert_no_hooks(inplace)


def test_explicit_blocks_and_unknown_block_names():
    torch.manual_seed(0)
    model = _TinyResNet()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    d = diagnose(model, x, y, blocks=["layer1.1", "fc"])
    assert [b.name for b in d.blocks] == ["layer1.1", "fc"]
    assert all(math.isfinite(b.var) for b in d.blocks)
    with pytest.raises(ValueError) as info:
        diagnose(model, x, y, blocks=["layer1.1", "layer9.0"])
    message = str(info.value)
    assert "'layer9.0'" in message and "conv1" in message and "layer1" in message
    _assert_no_hooks(model)


class _TokenClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def test_transformer_encoder_classifier():
    torch.manual_seed(0)
    model = _TokenClassifier()
    x, y = torch.randn(4, 5, 6), torch.randint(0, 3, (4,))
    outputs = {}
    ref = copy.deepcopy(model)
    for name in ("encoder.layers.0", "encoder.layers.1"):
        ref.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().clone())
        )
    manual = _manual_grads(ref, x, y)
    d = diagnose(model, x, y)

    assert [b.name for b in d.blocks] == ["encoder.layers.0", "encoder.layers.1"]
    for b in d.blocks:
        assert (b.sq_mean, b.var) == pytest.approx(
            _hand_channel_stats(outputs[b.name], -1), rel=1e-6
        )
        assert b.var != pytest.approx(_hand_channel_stats(outputs[b.name], 1)[1], rel=1e-3)
    # out_proj's weight is used functionally by MultiheadAttention (no forward hook fires),
    # yet it gets a gradient: it is measured, in its place, and the head stays last.
    names = [layer.name for layer in d.layers]
    assert set(names) == set(manual)
    assert names[0] == "embed" and names[-1] == "head"
    for i in (0, 1):
        assert names.index(f"encoder.layers.{i}.self_attn.out_proj") < names.index(
            f"encoder.layers.{i}.linear1"
        )
    assert d.grad_ratio == pytest.approx(manual["embed"] / manual["head"], rel=1e-6)
    for layer in d.layers:
        assert layer.grad_norm == pytest.approx(manual[layer.name], rel=1e-6)
    assert d.structure["has_skip"] is True and d.structure["post_norm"] is True
    # An explicit channel_dim wins over the default.
    d1 = diagnose(model, x, y, channel_dim=1)
    assert d1.blocks[0].var == pytest.approx(
        _hand_channel_stats(outputs["encoder.layers.0"], 1)[1], rel=1e-6
    )
    _assert_no_hooks(model)


# ------------------------------------------------------------------------ 5. non-finite


class _InfNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x) * 1e38 * 1e38)


@pytest.mark.parametrize("case", ["nan-input", "inf-model"])
def test_nonfinite_is_a_verdict_not_an_exception(case):
    if case == "nan-input":
        model, x, y = _tiny_mlp()
        x = x.clone()
        x[3, 1] = float("nan")
    else:
        torch.manual_seed(0)
        model, x, y = _InfNet(), torch.randn(8, 4), torch.randint(0, 2, (8,))
    d = diagnose(model, x, y)
    assert d.verdict is Verdict.NONFINITE
    assert d.findings and d.remedies and d.start_layer is not None
    assert any("loss is nan" in f for f in d.findings)
    assert d.summary().startswith("NaN or Inf values appear")
    data = _strict_json(d.to_json())
    assert data["verdict"] == "non-finite" and data["loss"] is None
    assert data["start_layer"] == d.start_layer
    if case == "nan-input":
        assert data["start_layer"] == "stem.0"
        # One NaN input feature spreads to every stem output of that sample (width 4).
        assert data["activations"]["stem.0"]["nonfinite"] == 4
        assert all(layer["grad_norm"] is None for layer in data["layers"])
    _assert_no_hooks(model)


def test_to_json_is_complete():
    model, x, y = _tiny_mlp()
    d = diagnose(model, x, y, name="tiny")
    data = _strict_json(d.to_json(indent=2))
    assert data["model"] == "tiny" and data["verdict"] == d.verdict.value
    assert [layer["name"] for layer in data["layers"]] == [layer.name for layer in d.layers]
    assert data["layers"][0]["relative"] == pytest.approx(d.layers[0].relative)
    assert [b["var"] for b in data["blocks"]] == [b.var for b in d.blocks]
    assert data["thresholds"] == {
        "vanishing_ratio": 1e-3,
        "exploding_ratio": 100.0,
        "min_relative_grad": 1e-7,
        "dead_fraction": 0.7,
        "signal_growth": 1e3,
        "signal_decay": 1e-3,
        "loss_scale": 4.0,
        "affine_tolerance": 1e-3,
        "loss_rise": 2.0,
        "loss_spike": 20.0,
        "loss_progress": 0.02,
        "frozen_ratio": 1e-3,
        "max_update": 0.1,
        "min_update": 1e-4,
    }
    assert data["confidence"] == d.confidence and data["training"] is None
    assert [s["name"] for s in data["signals"]] == [s.name for s in d.signals]
    assert all(
        set(s) == {"name", "value", "limit", "fired", "verdict", "strength", "text"}
        for s in data["signals"]
    )
    assert str(Verdict.NONFINITE) == "non-finite"
    assert diagnose(nn.Sequential(nn.Linear(3, 3)), x, y).model_name == "Sequential"


# ---------------------------------------------------------------------- 6. torch.compile


def _compile_unavailable() -> str | None:
    try:
        import torch._dynamo
    except ImportError as exc:
        return f"torch._dynamo cannot be imported: {exc}"
    if not torch._dynamo.is_dynamo_supported():
        return "torch._dynamo does not support this Python/platform"
    try:
        probe = torch.compile(nn.Linear(2, 2))
        probe(torch.randn(3, 2)).sum().backward()
    except Exception as exc:  # noqa: BLE001 - any failure of the toolchain itself
        return f"torch.compile fails on this machine: {type(exc).__name__}: {exc}"
    return None


def test_torch_compile_matches_eager():
    reason = _compile_unavailable()
    if reason:
        pytest.skip(reason)
    import torch._dynamo

    try:
        model, x, y = _tiny_mlp(width=8, in_features=6)
        eager = diagnose(model, x, y)
        model.eval()
        compiled = torch.compile(model)
        d = diagnose(compiled, x, y)
        assert [layer.name for layer in d.layers] == [layer.name for layer in eager.layers]
        for a, b in zip(d.layers, eager.layers):
            assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
        assert [b.name for b in d.blocks] == [b.name for b in eager.blocks]
        for a, b in zip(d.blocks, eager.blocks):
            assert (a.sq_mean, a.var, a.branch_var) == pytest.approx(
                (b.sq_mean, b.var, b.branch_var), rel=1e-5
            )
        assert d.verdict is eager.verdict and d.model_name == "ResidualMLP"
        assert set(d.activations) == set(eager.activations)
        assert not model.training and not compiled.training
        assert all(p.grad is None for p in model.parameters())
        _assert_no_hooks(model)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------ 7. DDP


def test_distributed_data_parallel_single_rank(tmp_path):
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this build")
    model, x, y = _tiny_mlp(width=8, in_features=6)
    eager = diagnose(model, x, y)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp.eval()
        d = diagnose(ddp, x, y)
        assert [layer.name for layer in d.layers] == [layer.name for layer in eager.layers]
        for a, b in zip(d.layers, eager.layers):
            assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6)
        assert d.model_name == "ResidualMLP"
        assert ddp.training is False and not any(m.training for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
        _assert_no_hooks(model)
        # DDP still trains afterwards (its reducer is not left mid-iteration).
        ddp.train()
        F.cross_entropy(ddp(x), y).backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- 8. report


def _render(table) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(table)
    return console.file.getvalue()


def test_table_elides_rows_and_keeps_the_start_layer():
    from rich.table import Table

    *_, d = _calibration(0, *PLAIN_NONE)
    table = d.table()
    assert isinstance(table, Table)
    assert len(d.layers) == 98 and 16 <= table.row_count < 98
    assert table.caption == f"{table.row_count} of 98 layers shown; to_json() has them all"
    text = _render(table)
    assert d.start_layer in text and "vanishing" in text
    assert "stem.0" in text and "head" in text
    # The start layer is not one of the evenly spread rows: it was added.
    start = [layer.name for layer in d.layers].index(d.start_layer)
    spread = {round(i * 97 / 15) for i in range(16)}
    assert start not in spread
    small = diagnose(*_tiny_mlp()).table()
    assert small.caption is None and small.row_count == 10


def test_figure_png_and_svg(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    *_, d = _calibration(0, *PLAIN_NONE)
    fig = d.figure(tmp_path / "diag.png")
    try:
        assert isinstance(fig, Figure)
    finally:
        plt.close(fig)
    assert (tmp_path / "diag.png").read_bytes()[:8] == PNG_MAGIC
    model, x, y = _tiny_mlp()
    x = x.clone()
    x[0, 0] = float("nan")
    nonfinite = diagnose(model, x, y)
    plt.close(nonfinite.figure(tmp_path / "out" / "diag.svg"))
    svg = (tmp_path / "out" / "diag.svg").read_text()
    assert "<svg" in svg and PNG_MAGIC not in svg.encode()
    assert sorted(os.listdir(tmp_path)) == ["diag.png", "out"]
    assert os.listdir(tmp_path / "out") == ["diag.svg"]


def test_html_escapes_user_strings_and_writes_atomically(tmp_path):
    from resnorm.diagnostics.report import diagnosis_html_section

    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict([("<b>in</b>", nn.Linear(4, 8)), ("act", nn.ReLU()), ("out", nn.Linear(8, 3))])
    )
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    d = diagnose(model, x, y, name="<script>alert(1)</script>")
    html = diagnosis_html_section(d)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>in</b>" not in html and "&lt;b&gt;in&lt;/b&gt;" in html
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert match and base64.b64decode(match.group(1))[:8] == PNG_MAGIC
    assert html.lstrip().startswith("<section") and html.rstrip().endswith("</section>")

    path = tmp_path / "reports" / "page.html"
    d.write_html(path)
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "data:image/png;base64," in page and "<section" in page
    assert os.listdir(path.parent) == ["page.html"]  # no *.tmp left behind


# ------------------------------------------------------------------------------- 9. CLI


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_diagnose_json(capsys):
    code, out, err = _run(capsys, "diagnose", "mlp", "--depth", "8", "--width", "16", "--json")
    assert code == 0 and err == ""
    data = _strict_json(out)
    assert data["verdict"] == "healthy" and data["model"] == "mlp depth=8 width=16"
    assert len(data["layers"]) == 2 + 4 * 8


@pytest.mark.parametrize("fail_on, code", [("vanishing", 1), ("exploding,non-finite", 0)])
def test_cli_fail_on(capsys, fail_on, code):
    got, out, _ = _run(
        capsys,
        "diagnose",
        "mlp",
        "--plain",
        "--norm",
        "none",
        "--depth",
        "48",
        "--fail-on",
        fail_on,
    )
    assert got == code
    text = " ".join(out.split())  # rich wraps long lines
    assert "vanishing" in text and "skip connections" in text


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["diagnose", "no-such-model"], "unknown model"),
        (["diagnose", "mlp", "--fail-on", "foo"], "--fail-on"),
        (["diagnose"], "--factory"),
        (["diagnose", "mlp", "--factory", "pkg.mod:fn"], "--factory"),
        (["diagnose", "--factory", "nope:fn"], "cannot import"),
        (["diagnose", "--factory", "bad-spec"], "package.module:function"),
        (["diagnose", "resnet56", "--depth", "20"], "depth=56"),
        (["diagnose", "mlp", "--input-shape", "3,x"], "--input-shape"),
        (["diagnose", "mlp", "--input-shape", "0"], "--input-shape"),
        (["diagnose", "--factory", "os:getcwd"], "not an nn.Module"),
    ],
)
def test_cli_diagnose_bad_input_exits_2(capsys, argv, fragment):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("resnorm: error:") and fragment in err


FACTORY_SOURCE = """\
from torch import nn


def build(width=16):
    return nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, 3))
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    name = "resnorm_test_diag_factory"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_cli_factory(capsys, factory_module):
    spec = f"{factory_module}:build"
    code, out, err = _run(
        capsys, "diagnose", "--factory", spec, "--input-shape", "10", "--width", "12", "--json"
    )
    assert code == 0, err
    data = _strict_json(out)
    assert data["model"] == spec and [layer["name"] for layer in data["layers"]] == ["0", "2"]
    assert data["activations"]["0"]["numel"] == 128 * 12  # --width reached the factory
    code, out, err = _run(capsys, "diagnose", "--factory", spec)
    assert code == 2 and out == "" and "--input-shape" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_writes_figure_and_html(capsys, tmp_path):
    figure, html = tmp_path / "d.png", tmp_path / "sub" / "d.html"
    code, out, _ = _run(
        capsys,
        "diagnose",
        "mlp",
        "--depth",
        "2",
        "--width",
        "8",
        "--figure",
        str(figure),
        "--html",
        str(html),
    )
    assert code == 0
    assert figure.read_bytes()[:8] == PNG_MAGIC
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert out.count("wrote") == 2


# ------------------------------------------------------------------------ 10. thresholds


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vanishing_ratio": 0},
        {"vanishing_ratio": -1e-3},
        {"exploding_ratio": 0},
        {"exploding_ratio": -5.0},
        {"min_relative_grad": 0.0},
        {"dead_fraction": -0.1},
        {"signal_growth": 0},
        {"signal_decay": -1},
        {"vanishing_ratio": float("nan")},
        {"vanishing_ratio": 1.0, "exploding_ratio": 1.0},
        {"vanishing_ratio": 10.0, "exploding_ratio": 5.0},
        {"vanishing_ratio": 200.0},
    ],
)
def test_thresholds_reject_invalid_values(kwargs):
    with pytest.raises(ValueError):
        Thresholds(**kwargs)


def test_thresholds_reject_wrong_types():
    with pytest.raises(TypeError):
        Thresholds(vanishing_ratio="0.001")
    model, x, y = _tiny_mlp()
    with pytest.raises(TypeError, match="Thresholds"):
        diagnose(model, x, y, thresholds={"exploding_ratio": 10})


def test_custom_thresholds_change_the_verdict():
    model, x, y, healthy = _calibration(0, *RESIDUAL_BATCH)
    ratio = healthy.grad_ratio
    assert healthy.verdict is Verdict.HEALTHY and ratio > 1
    exploding = diagnose(model, x, y, thresholds=Thresholds(exploding_ratio=ratio / 2))
    assert exploding.verdict is Verdict.EXPLODING and exploding.start_layer is not None
    assert exploding.grad_ratio == ratio
    assert exploding.to_dict()["thresholds"]["exploding_ratio"] == ratio / 2
    # Residual post-norm stack: pre-norm and branch scaling are fitting advice here.
    assert any("placement='pre'" in r for r in exploding.remedies)
    assert any("rezero" in r for r in exploding.remedies)
    vanishing = diagnose(
        model, x, y, thresholds=Thresholds(vanishing_ratio=ratio * 2, exploding_ratio=ratio * 4)
    )
    assert vanishing.verdict is Verdict.VANISHING and vanishing.start_layer is not None
    assert any("placement='pre'" in r for r in vanishing.remedies)


def test_custom_dead_fraction_threshold_adds_a_finding():
    model = _dead_relu_model()
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    default = diagnose(model, x, y)
    dead = default.activations["1"].dead_fraction
    assert 0.5 <= dead < 0.7
    assert not any("dead units" in f for f in default.findings)
    strict = diagnose(model, x, y, thresholds=Thresholds(dead_fraction=0.4))
    assert any("dead units" in f and "worst: 1" in f for f in strict.findings)
    assert any("dead" in r for r in strict.remedies)


def test_zero_initialized_gates_are_not_vanishing_gradients():
    # ReZero: every branch is multiplied by a gate at 0, so the branch weights get exactly no
    # gradient at initialization, by design; the verdict must not call that vanishing.
    torch.manual_seed(0)
    model = create_model("transformer", depth=2, norm="none", scale="rezero")
    d = diagnose(model, torch.randn(32, 40), torch.randint(0, 10, (32,)))
    silent = [layer.name for layer in d.layers if layer.grad_norm == 0]
    assert silent and all(".attn." in n or ".mlp." in n for n in silent)
    assert d.verdict is Verdict.HEALTHY
    assert any("start at zero" in f and f"{len(silent)} layer(s)" in f for f in d.findings)
    assert d.structure["closed_gates"] == 4


def test_fused_relu_norms_count_as_rectifiers(monkeypatch):
    """A fused pre-norm MLP applies its ReLUs inside the norms (activation="relu"): the
    Monitor counts their dead units and diagnose() summarizes them as rectified, with the
    same values as the ReLU modules of the unfused twin."""
    from resnorm.kernels import ops

    monkeypatch.setattr(ops, "STOCK_BELOW", 0)  # the kernel, not stock ops, at this size
    torch.manual_seed(0)
    options = {"depth": 2, "width": 16, "norm": "layer", "placement": "pre"}
    plain = create_model("mlp", **options)
    fused = create_model("mlp", fused=True, **options)
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():  # kill a few units: biases far below zero in the first norm
        for model in (plain, fused):
            model.blocks[0].norm1.bias[:5] = -50.0
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    fractions = []
    for model in (plain, fused):
        with Monitor(model, dead_units_every=1) as monitor:
            F.cross_entropy(model(x), y).backward()
            fractions.append(monitor.step()["dead_fraction"])
    # Unfused: the block's ReLU module runs twice (after norm1, after norm2), then final_act.
    names = {
        "blocks.0.act": "blocks.0.norm1",
        "blocks.0.act#2": "blocks.0.norm2",
        "blocks.1.act": "blocks.1.norm1",
        "blocks.1.act#2": "blocks.1.norm2",
        "final_act": "final_norm",
    }
    assert set(fractions[0]) == set(names) and set(fractions[1]) == set(names.values())
    for old, new in names.items():
        assert fractions[1][new] == pytest.approx(fractions[0][old]), (old, new)
    assert fractions[1]["blocks.0.norm1"] >= 5 / 16
    report = diagnose(fused, x, y)
    assert report.activations["blocks.0.norm1"].dead_fraction == pytest.approx(
        fractions[1]["blocks.0.norm1"]
    )
    assert diagnose(plain, x, y).activations["blocks.0.norm1"].dead_fraction is None
