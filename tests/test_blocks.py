"""Tests of the residual merge and of the residual blocks (resnorm.blocks).

Every numerical check compares a block with the same computation written out by hand
from its own weights, so a change of formula, order of operations or wiring fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnorm.blocks import (
    BasicBlock,
    Bottleneck,
    DenseBlock,
    DenseLayer,
    DropPath,
    FeedForward,
    LayerScale,
    PadShortcut,
    PreActBasicBlock,
    PreActBottleneck,
    Residual,
    ResidualAdd,
    ResidualConfig,
    ResidualMLPBlock,
    ScalarGain,
    SelfAttention,
    TransformerBlock,
    Transition,
    deepnorm_constants,
    make_branch_scale,
    make_shortcut,
)
from resnorm.errors import UsageTypeError
from resnorm.norms import NORM_KINDS, BatchNorm

ALL_NORMS = list(NORM_KINDS)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def bn_train(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Batch norm in training mode, by hand: per channel (dim 1), biased variance."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=False)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(shape) + norm.bias.view(shape)


# --------------------------------------------------------------------------------------
# ResidualAdd / Residual
# --------------------------------------------------------------------------------------


def test_residual_add_is_branch_plus_skip():
    branch, skip = torch.randn(4, 5), torch.randn(4, 5)
    y = ResidualAdd()(branch, skip)
    torch.testing.assert_close(y, branch + skip, rtol=0, atol=0)


def test_residual_identity_shortcut_by_default():
    lin = nn.Linear(6, 6)
    x = torch.randn(3, 6)
    y = Residual(lin)(x)
    torch.testing.assert_close(y, x + x @ lin.weight.T + lin.bias)


def test_residual_with_shortcut_and_post():
    branch, short = nn.Linear(4, 3), nn.Linear(4, 3, bias=False)
    x = torch.randn(5, 4)
    y = Residual(branch, short, post=nn.ReLU())(x)
    expected = torch.relu(x @ short.weight.T + x @ branch.weight.T + branch.bias)
    torch.testing.assert_close(y, expected)


def test_residual_rejects_non_module():
    with pytest.raises(TypeError, match="branch must be an nn.Module"):
        Residual(lambda x: x)


def test_residual_false_returns_branch_only():
    branch, skip = torch.randn(4, 5), torch.randn(4, 5)
    y = ResidualAdd(residual=False)(branch, skip)
    torch.testing.assert_close(y, branch, rtol=0, atol=0)
    lin = nn.Linear(5, 5)
    x = torch.randn(2, 5)
    torch.testing.assert_close(Residual(lin, residual=False)(x), lin(x))


@pytest.mark.parametrize("scale", ["rezero", "skipinit"])
def test_rezero_starts_as_identity_and_learns(scale):
    lin = nn.Linear(8, 8)
    block = Residual(lin, scale=scale)
    assert isinstance(block.merge.scale, ScalarGain)
    gain = block.merge.scale.gain
    assert gain.shape == () and gain.item() == 0.0 and gain.requires_grad
    x = torch.randn(4, 8)
    y = block(x)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    y.pow(2).sum().backward()
    # d/dg sum((x + g f(x))^2) at g=0 = 2 sum(x f(x)), nonzero in general.
    expected_grad = 2 * (x * lin(x)).sum()
    torch.testing.assert_close(gain.grad, expected_grad.detach())
    assert gain.grad.abs().item() > 0
    # after a step of the scalar the branch is switched on
    with torch.no_grad():
        gain.fill_(0.5)
    torch.testing.assert_close(block(x), x + 0.5 * lin(x))


def test_layerscale_per_channel_at_init_value():
    merge = ResidualAdd(scale="layerscale", channels=6, layerscale_init=1e-3)
    assert isinstance(merge.scale, LayerScale)
    gamma = merge.scale.gamma
    assert gamma.shape == (6,) and gamma.requires_grad
    torch.testing.assert_close(gamma.detach(), torch.full((6,), 1e-3))
    branch, skip = torch.randn(3, 6), torch.randn(3, 6)
    torch.testing.assert_close(merge(branch, skip), skip + 1e-3 * branch)


def test_layerscale_channel_dim_1_broadcasts_over_channels_first():
    merge = ResidualAdd(scale="layerscale", channels=3, channel_dim=1)
    with torch.no_grad():
        merge.scale.gamma.copy_(torch.tensor([1.0, 2.0, 3.0]))
    branch, skip = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    expected = skip + branch * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(merge(branch, skip), expected)


def test_layerscale_channel_dim_minus1_broadcasts_over_last_dim():
    merge = ResidualAdd(scale="layerscale", channels=4, channel_dim=-1)
    with torch.no_grad():
        merge.scale.gamma.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
    branch, skip = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = skip + branch * torch.tensor([1.0, -1.0, 0.5, 0.0])
    torch.testing.assert_close(merge(branch, skip), expected)


def test_layerscale_needs_channels():
    with pytest.raises(ValueError, match="channel count"):
        make_branch_scale("layerscale")


def test_fixed_float_scale_multiplies_branch():
    merge = ResidualAdd(scale=0.25)
    assert n_params(merge) == 0
    branch, skip = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(merge(branch, skip), skip + 0.25 * branch)
    # an integer is a fixed factor too
    torch.testing.assert_close(ResidualAdd(scale=2)(branch, skip), skip + 2 * branch)


def test_skip_weight_weights_the_skip_only():
    merge = ResidualAdd(skip_weight=1.7)
    branch, skip = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(merge(branch, skip), 1.7 * skip + branch)
    # the skip weight does not apply to a plain twin's output
    plain = ResidualAdd(skip_weight=1.7, residual=False)
    torch.testing.assert_close(plain(branch, skip), branch)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        ResidualAdd()(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="differ"):
        Residual(nn.Linear(4, 3))(torch.randn(2, 4))


@pytest.mark.parametrize("scale", ["rezeroo", "LayerScale", True])
def test_unknown_scale_raises(scale):
    with pytest.raises(ValueError, match="scale"):
        ResidualAdd(scale=scale, channels=4)


# --------------------------------------------------------------------------------------
# ResidualConfig: one configuration of the merge, passed from model to block to merge
# --------------------------------------------------------------------------------------


def test_residual_config_defaults_are_the_plain_residual_add():
    config = ResidualConfig()
    assert (
        config.residual,
        config.scale,
        config.layerscale_init,
        config.skip_weight,
        config.drop_path,
    ) == (True, None, 1e-5, 1.0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.residual = False
    branch, skip = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(ResidualAdd(config)(branch, skip), skip + branch)


@pytest.mark.parametrize(
    "fields,error,message",
    [
        ({"residual": 1}, UsageTypeError, r"residual must be True or False, got 1 \(int\)"),
        ({"scale": "rezeroo"}, ValueError, r"scale='rezeroo'.*accepted.*'rezero'.*a number"),
        ({"scale": float("nan")}, ValueError, "scale"),
        ({"layerscale_init": "small"}, UsageTypeError, "layerscale_init must be a number"),
        ({"skip_weight": float("inf")}, ValueError, "skip_weight must be a finite number"),
        ({"drop_path": 1.0}, ValueError, r"drop_path must be in \[0, 1\), got 1"),
    ],
)
def test_residual_config_checks_each_field(fields, error, message):
    with pytest.raises(error, match=message):
        ResidualConfig(**fields)
    with pytest.raises(error, match=message):  # and through resolve(), as blocks get them
        ResidualConfig.resolve(ResidualConfig(), **fields)


def test_resolve_puts_the_keyword_fields_on_top_of_the_config():
    base = ResidualConfig(scale="rezero", drop_path=0.1)
    assert ResidualConfig.resolve() == ResidualConfig()
    assert ResidualConfig.resolve(base) is base
    assert ResidualConfig.resolve(base, residual=False) == ResidualConfig(
        residual=False, scale="rezero", drop_path=0.1
    )
    with pytest.raises(UsageTypeError, match="merge must be a ResidualConfig, got"):
        ResidualConfig.resolve({"residual": False})


def test_unknown_merge_field_names_the_class_and_what_it_accepts():
    with pytest.raises(
        UsageTypeError,
        match=r"ResidualConfig got unexpected option\(s\) alpha; "
        r"accepted: residual, scale, layerscale_init, "
        r"skip_weight, drop_path",
    ):
        ResidualConfig.resolve(alpha=1.7)
    with pytest.raises(
        UsageTypeError,
        match=r"BasicBlock\(\) got unexpected option\(s\) "
        r"nrom; accepted: in_channels, .*norm, .*drop_path",
    ):
        BasicBlock(4, 4, nrom="batch")


@pytest.mark.parametrize(
    "cls",
    [
        ResidualAdd,
        Residual,
        BasicBlock,
        Bottleneck,
        PreActBasicBlock,
        PreActBottleneck,
        ResidualMLPBlock,
        TransformerBlock,
    ],
)
def test_blocks_list_the_config_fields_in_their_signature(cls):
    parameters = inspect.signature(cls).parameters
    for field in dataclasses.fields(ResidualConfig):
        assert parameters[field.name].default == field.default, field.name
        assert parameters[field.name].kind is inspect.Parameter.KEYWORD_ONLY
    assert parameters["merge"].default is None
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_a_block_takes_the_config_or_its_fields_alike():
    torch.manual_seed(0)
    by_config = BasicBlock(4, 8, 2, merge=ResidualConfig(scale="layerscale", layerscale_init=0.5))
    torch.manual_seed(0)
    by_fields = BasicBlock(4, 8, 2, scale="layerscale", layerscale_init=0.5)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(by_config.eval()(x), by_fields.eval()(x), rtol=0, atol=0)
    # a field given beside the config wins over the config's value
    plain = BasicBlock(4, 8, 2, merge=ResidualConfig(scale="layerscale"), residual=False)
    assert plain.downsample is None and not plain.merge.residual


def test_deepnorm_sets_the_skip_weight_and_refuses_another():
    block = TransformerBlock(8, 2, placement="post", deepnorm_layers=3, scale="rezero")
    assert block.merge1.skip_weight == pytest.approx(6**0.25)
    assert isinstance(block.merge2.scale, ScalarGain)
    with pytest.raises(ValueError, match="deepnorm_layers sets the skip weight.*got skip_weight=2"):
        TransformerBlock(8, 2, placement="post", deepnorm_layers=3, skip_weight=2.0)


def test_drop_path_identity_in_eval_and_at_zero():
    x = torch.randn(64, 5)
    dp = DropPath(0.5).eval()
    torch.testing.assert_close(dp(x), x, rtol=0, atol=0)
    torch.testing.assert_close(DropPath(0.0).train()(x), x, rtol=0, atol=0)
    merge = ResidualAdd(drop_path=0.5).eval()
    skip = torch.randn(64, 5)
    torch.testing.assert_close(merge(x, skip), x + skip)


def test_drop_path_rejects_bad_rate():
    with pytest.raises(ValueError):
        DropPath(1.0)
    with pytest.raises(ValueError):
        DropPath(-0.1)


def test_drop_path_drops_whole_samples_at_rate():
    torch.manual_seed(1234)
    p, n = 0.3, 20000
    dp = DropPath(p, scale_by_keep=False).train()
    x = torch.rand(n, 3, 2) + 1.0  # strictly positive: a zero means dropped
    y = dp(x)
    dropped = (y == 0).flatten(1)
    # whole samples: each sample is either all zeros or all kept
    assert torch.all(dropped.all(1) | (~dropped).all(1))
    kept = ~dropped.all(1)
    torch.testing.assert_close(y[kept], x[kept], rtol=0, atol=0)
    rate = dropped.all(1).float().mean().item()
    # 5 standard errors: sqrt(p(1-p)/n) = 0.0032
    assert abs(rate - p) < 0.016, rate


def test_drop_path_scale_by_keep_preserves_expectation():
    torch.manual_seed(4321)
    p, n = 0.4, 20000
    dp = DropPath(p).train()
    x = torch.ones(n, 4)
    y = dp(x)
    values = torch.unique(y)
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / (1 - p)]))
    # mean of n samples: SE = sqrt(p/(1-p)/n) = 0.0058
    assert abs(y.mean().item() - 1.0) < 0.03
    # through the merge: per sample either the skip alone or skip + branch / keep
    merge = ResidualAdd(drop_path=p).train()
    branch, skip = torch.randn(n, 3), torch.randn(n, 3)
    diff = merge(branch, skip) - skip
    dropped = (diff == 0).all(1)
    torch.testing.assert_close(diff[~dropped], branch[~dropped] / (1 - p))
    assert abs(dropped.float().mean().item() - p) < 0.02


# --------------------------------------------------------------------------------------
# ResidualMLPBlock
# --------------------------------------------------------------------------------------


def test_mlp_block_default_is_the_keras_seed_block():
    torch.manual_seed(1)
    block = ResidualMLPBlock(16)
    assert block.placement == "post"
    assert isinstance(block.norm1, BatchNorm) and isinstance(block.norm2, BatchNorm)
    assert isinstance(block.act, nn.ReLU)
    x = torch.randn(8, 16)
    # Dense(units, activation='relu') -> BN -> Dense -> BN -> Add(x) -> ReLU
    h = torch.relu(x @ block.fc1.weight.T + block.fc1.bias)
    h = bn_train(h, block.norm1)
    h = h @ block.fc2.weight.T + block.fc2.bias
    h = bn_train(h, block.norm2)
    expected = torch.relu(h + x)
    torch.testing.assert_close(block.train()(x), expected, rtol=1e-5, atol=1e-5)


def _randomize_batch_norms(*norms):
    """Running statistics and affine parameters away from their 0/1 defaults."""
    with torch.no_grad():
        for norm in norms:
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)


def test_mlp_block_default_eval_uses_running_stats():
    block = ResidualMLPBlock(8)
    _randomize_batch_norms(block.norm1, block.norm2)
    block.eval()

    def bn_eval(h, norm):
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        return (h - norm.running_mean) * scale + norm.bias

    x = torch.randn(5, 8)
    h = bn_eval(torch.relu(block.fc1(x)), block.norm1)
    expected = torch.relu(bn_eval(block.fc2(h), block.norm2) + x)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_mlp_block_pre_placement_by_hand():
    block = ResidualMLPBlock(12, norm="layer", placement="pre")
    with torch.no_grad():
        block.norm1.weight.uniform_(0.5, 1.5)
        block.norm2.bias.uniform_(-0.5, 0.5)
    x = torch.randn(6, 12)

    def ln(h, norm):
        return F.layer_norm(h, (12,), norm.weight, norm.bias, norm.eps)

    h = block.fc1(torch.relu(ln(x, block.norm1)))
    expected = x + block.fc2(torch.relu(ln(h, block.norm2)))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_mlp_block_plain_twin_same_params_differs_by_skip(placement):
    res = ResidualMLPBlock(10, placement=placement)
    plain = ResidualMLPBlock(10, placement=placement, residual=False)
    assert n_params(res) == n_params(plain) == 2 * (10 * 10 + 10) + 2 * 2 * 10
    plain.load_state_dict(res.state_dict())
    x = torch.randn(7, 10)
    y_res, y_plain = res(x), plain(x)
    if placement == "pre":
        torch.testing.assert_close(y_res - y_plain, x)
    else:
        # post: the same branch h, then ReLU(h + x) vs ReLU(h)
        h = bn_train(res.fc2(res.norm1(torch.relu(res.fc1(x)))), res.norm2)
        torch.testing.assert_close(y_res, torch.relu(h + x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_plain, torch.relu(h), rtol=1e-5, atol=1e-5)


def test_mlp_block_input_checks():
    block = ResidualMLPBlock(8)
    with pytest.raises(ValueError, match="8 channels"):
        block(torch.randn(4, 9))
    with pytest.raises(ValueError, match="2-D"):
        block(torch.randn(4, 8, 1))
    with pytest.raises(ValueError, match="placement"):
        ResidualMLPBlock(8, placement="middle")


@pytest.mark.parametrize("norm", ["batch", "layer", "rms", "group", "dyt", "none"])
@pytest.mark.parametrize("placement", ["post", "pre"])
def test_mlp_block_every_norm(norm, placement):
    block = ResidualMLPBlock(64, norm=norm, placement=placement)
    x = torch.randn(4, 64, requires_grad=True)
    y = block(x)
    assert y.shape == (4, 64) and torch.isfinite(y).all()
    y.sum().backward()
    assert block.fc1.weight.grad is not None and block.fc1.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------
# Shortcuts
# --------------------------------------------------------------------------------------


def test_shortcut_a_subsamples_and_zero_pads_2d():
    sc = make_shortcut("A", 3, 5, 2)
    assert isinstance(sc, PadShortcut) and n_params(sc) == 0
    x = torch.randn(2, 3, 6, 6)
    y = sc(x)
    assert y.shape == (2, 5, 3, 3)
    torch.testing.assert_close(y[:, :3], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(y[:, 3:]) == 0


def test_shortcut_a_1d_and_stride_only():
    sc = make_shortcut("A", 4, 8, 2, dims=1)
    x = torch.randn(2, 4, 9)
    y = sc(x)
    assert y.shape == (2, 8, 5)
    torch.testing.assert_close(y[:, :4], x[:, :, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(y[:, 4:]) == 0
    # stride only, same channels
    y2 = make_shortcut("A", 4, 4, 2, dims=1)(x)
    torch.testing.assert_close(y2, x[:, :, ::2], rtol=0, atol=0)
    # channels only, stride 1
    y3 = make_shortcut("A", 4, 6, 1, dims=1)(x)
    torch.testing.assert_close(y3[:, :4], x, rtol=0, atol=0)
    assert torch.count_nonzero(y3[:, 4:]) == 0


def test_shortcut_identity_when_shape_kept():
    assert make_shortcut("A", 8, 8, 1) is None
    assert make_shortcut("B", 8, 8, 1) is None


def test_shortcut_a_cannot_reduce_channels():
    with pytest.raises(ValueError, match="cannot reduce channels"):
        make_shortcut("A", 8, 4, 1)
    with pytest.raises(ValueError, match="cannot reduce"):
        BasicBlock(8, 4, shortcut="A")


@pytest.mark.parametrize("dims", [1, 2])
def test_shortcut_b_projects_only_on_shape_change(dims):
    for cin, cout, stride in [(4, 8, 1), (4, 4, 2), (8, 4, 2)]:
        sc = make_shortcut("B", cin, cout, stride, dims=dims)
        assert isinstance(sc, nn.Sequential) and len(sc) == 2
        conv = sc[0]
        assert isinstance(conv, nn.Conv1d if dims == 1 else nn.Conv2d)
        assert conv.kernel_size == (1,) * dims and conv.stride == (stride,) * dims
        assert conv.bias is None
        assert isinstance(sc[1], BatchNorm)
        assert n_params(sc) == cin * cout + 2 * cout
        x = torch.randn(2, cin, *([6] * dims))
        assert sc(x).shape == (2, cout, *([6 // stride] * dims))


def test_shortcut_c_always_projects():
    sc = make_shortcut("C", 8, 8, 1)
    assert isinstance(sc, nn.Sequential) and n_params(sc) == 8 * 8 + 2 * 8
    bare = make_shortcut("C", 8, 8, 1, norm=None)
    assert len(bare) == 1 and n_params(bare) == 64


def test_shortcut_unknown_option():
    with pytest.raises(ValueError, match="shortcut"):
        make_shortcut("D", 4, 8, 2)


# --------------------------------------------------------------------------------------
# Convolutional blocks
# --------------------------------------------------------------------------------------

BLOCK_CASES = [
    # (class, in_channels, width argument, stride, expected out channels)
    (BasicBlock, 8, 8, 1, 8),
    (BasicBlock, 4, 8, 2, 8),
    (Bottleneck, 16, 4, 1, 16),
    (Bottleneck, 8, 4, 2, 16),
    (PreActBasicBlock, 8, 8, 1, 8),
    (PreActBasicBlock, 4, 8, 2, 8),
    (PreActBottleneck, 16, 4, 1, 16),
    (PreActBottleneck, 8, 4, 2, 16),
]
BLOCK_IDS = [f"{c.__name__}-{i}to{o}-s{s}" for c, i, _, s, o in BLOCK_CASES]


def spatial(dims: int, size: int = 8) -> tuple[int, ...]:
    return (size,) * dims if dims == 2 else (2 * size,)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("cls,cin,width,stride,cout", BLOCK_CASES, ids=BLOCK_IDS)
@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
def test_conv_block_output_shapes(cls, cin, width, stride, cout, dims, shortcut):
    block = cls(cin, width, stride, dims=dims, shortcut=shortcut)
    assert block.out_channels == cout
    size = spatial(dims)
    y = block(torch.randn(2, cin, *size))
    assert y.shape == (2, cout, *[s // stride for s in size])


@pytest.mark.parametrize("norm", ALL_NORMS)
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("cls,cin,width,stride,cout", BLOCK_CASES, ids=BLOCK_IDS)
def test_conv_block_every_norm_forward_backward(cls, cin, width, stride, cout, dims, norm):
    block = cls(cin, width, stride, dims=dims, norm=norm)
    for name in ("bn1", "bn2"):
        module = getattr(block, name)
        if norm == "none":
            assert isinstance(module, nn.Identity)
        else:
            # conv blocks put channels at dim 1
            assert getattr(module, "channel_dim", 1) == 1
    size = spatial(dims)
    x = torch.randn(2, cin, *size, requires_grad=True)
    y = block(x)
    assert y.shape == (2, cout, *[s // stride for s in size])
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert block.conv1.weight.grad is not None and block.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("cls,cin,width,stride,cout", BLOCK_CASES, ids=BLOCK_IDS)
def test_conv_block_plain_twin_option_a_same_params(cls, cin, width, stride, cout, dims):
    res = cls(cin, width, stride, dims=dims, shortcut="A")
    plain = cls(cin, width, stride, dims=dims, shortcut="A", residual=False)
    assert n_params(res) == n_params(plain)
    assert plain.downsample is None
    plain.load_state_dict(res.state_dict())
    x = torch.randn(2, cin, *spatial(dims))
    y_res, y_plain = res(x), plain(x)
    assert y_res.shape == y_plain.shape
    if cls in (PreActBasicBlock, PreActBottleneck):
        # the pre-activation merge has no activation after it: exactly the skip apart
        skip = x if res.downsample is None else res.downsample(x)
        torch.testing.assert_close(y_res - y_plain, skip, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(y_res, y_plain)


@pytest.mark.parametrize("shortcut", ["B", "C"])
@pytest.mark.parametrize("cls,cin,width,stride,cout", BLOCK_CASES, ids=BLOCK_IDS)
def test_conv_block_plain_twin_with_projection_drops_only_the_projection(
    cls, cin, width, stride, cout, shortcut
):
    res = cls(cin, width, stride, shortcut=shortcut)
    plain = cls(cin, width, stride, shortcut=shortcut, residual=False)
    projection = 0 if res.downsample is None else n_params(res.downsample)
    if shortcut == "C" or cin != cout or stride != 1:
        assert projection > 0
    assert plain.downsample is None
    assert n_params(plain) == n_params(res) - projection
    # the branch parameters are identical: the plain twin loads them
    branch_state = {k: v for k, v in res.state_dict().items() if not k.startswith("downsample.")}
    plain.load_state_dict(branch_state, strict=True)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize(
    "cls,cin,width,stride",
    [(BasicBlock, 8, 8, 1), (BasicBlock, 4, 8, 2), (Bottleneck, 16, 4, 1), (Bottleneck, 8, 4, 2)],
)
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_zero_init_last_starts_as_act_of_shortcut(cls, cin, width, stride, dims, shortcut):
    block = cls(cin, width, stride, dims=dims, shortcut=shortcut, zero_init_last=True)
    last = block.bn2 if cls is BasicBlock else block.bn3
    assert torch.count_nonzero(last.weight) == 0
    x = torch.randn(2, cin, *spatial(dims))
    skip = x if block.downsample is None else block.downsample(x)
    torch.testing.assert_close(block(x), torch.relu(skip), rtol=0, atol=1e-6)
    # without it the block is not the identity
    other = cls(cin, width, stride, dims=dims, shortcut=shortcut)
    assert not torch.allclose(other(x), torch.relu(skip), atol=1e-3)


def test_zero_init_last_needs_a_scale():
    with pytest.raises(ValueError, match="zero_init_last"):
        BasicBlock(4, 4, norm="none", zero_init_last=True)


def test_basic_block_by_hand_projection_train_mode():
    torch.manual_seed(2)
    block = BasicBlock(3, 6, 2, shortcut="B").double()
    with torch.no_grad():
        for norm in (block.bn1, block.bn2, block.downsample[1]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    out = F.conv2d(x, block.conv1.weight, stride=2, padding=1)
    out = torch.relu(bn_train(out, block.bn1))
    out = bn_train(F.conv2d(out, block.conv2.weight, stride=1, padding=1), block.bn2)
    skip = bn_train(F.conv2d(x, block.downsample[0].weight, stride=2), block.downsample[1])
    expected = torch.relu(out + skip)
    torch.testing.assert_close(block(x), expected)


def test_basic_block_by_hand_identity_eval_mode():
    block = BasicBlock(4, 4).double()
    assert block.downsample is None
    _randomize_batch_norms(block.bn1, block.bn2)
    block.eval()

    def bn_eval(h, norm):
        view = (1, -1, 1, 1)
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        return (h - norm.running_mean.view(view)) * scale.view(view) + norm.bias.view(view)

    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    out = torch.relu(bn_eval(F.conv2d(x, block.conv1.weight, padding=1), block.bn1))
    out = bn_eval(F.conv2d(out, block.conv2.weight, padding=1), block.bn2)
    torch.testing.assert_close(block(x), torch.relu(out + x))


def test_bottleneck_by_hand_option_a_1d():
    block = Bottleneck(8, 4, 2, dims=1, shortcut="A").double()
    x = torch.randn(3, 8, 10, dtype=torch.float64)
    out = torch.relu(bn_train(F.conv1d(x, block.conv1.weight), block.bn1))
    out = torch.relu(bn_train(F.conv1d(out, block.conv2.weight, stride=2, padding=1), block.bn2))
    out = bn_train(F.conv1d(out, block.conv3.weight), block.bn3)
    skip = F.pad(x[:, :, ::2], (0, 0, 0, 8))
    torch.testing.assert_close(block(x), torch.relu(out + skip))


def test_preact_basic_block_by_hand_projection_takes_preactivated_input():
    block = PreActBasicBlock(3, 6, 2, shortcut="B").double()
    assert len(block.downsample) == 1  # a bare 1x1 conv, no norm
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    pre = torch.relu(bn_train(x, block.bn1))
    out = F.conv2d(pre, block.conv1.weight, stride=2, padding=1)
    out = F.conv2d(torch.relu(bn_train(out, block.bn2)), block.conv2.weight, padding=1)
    skip = F.conv2d(pre, block.downsample[0].weight, stride=2)
    torch.testing.assert_close(block(x), out + skip)


def test_preact_basic_block_option_a_takes_raw_input():
    block = PreActBasicBlock(3, 6, 2, shortcut="A").double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    pre = torch.relu(bn_train(x, block.bn1))
    out = F.conv2d(pre, block.conv1.weight, stride=2, padding=1)
    out = F.conv2d(torch.relu(bn_train(out, block.bn2)), block.conv2.weight, padding=1)
    skip = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 3))
    torch.testing.assert_close(block(x), out + skip)


def test_preact_bottleneck_identity_skip_by_hand():
    block = PreActBottleneck(16, 4, 1, dims=1).double()
    assert block.downsample is None
    x = torch.randn(2, 16, 7, dtype=torch.float64)
    h = F.conv1d(torch.relu(bn_train(x, block.bn1)), block.conv1.weight)
    h = F.conv1d(torch.relu(bn_train(h, block.bn2)), block.conv2.weight, padding=1)
    h = F.conv1d(torch.relu(bn_train(h, block.bn3)), block.conv3.weight)
    torch.testing.assert_close(block(x), x + h)


def test_conv_block_input_checks():
    block = BasicBlock(4, 4)
    with pytest.raises(ValueError, match="4 channels"):
        block(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="dims"):
        BasicBlock(4, 4, dims=3)


def test_conv_block_layerscale_and_drop_path_options():
    block = BasicBlock(4, 4, scale="layerscale", layerscale_init=0.0, drop_path=0.2)
    x = torch.randn(2, 4, 6, 6)
    # gamma = 0: the branch is switched off, in train and eval mode
    torch.testing.assert_close(block.train()(x), torch.relu(x))
    torch.testing.assert_close(block.eval()(x), torch.relu(x))


# --------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------


def _randomize_norm(norm: nn.Module) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(norm, name, None)
            if isinstance(p, nn.Parameter):
                p.uniform_(0.5, 1.5) if name == "weight" else p.uniform_(-0.3, 0.3)


def test_transformer_pre_placement_by_hand():
    block = TransformerBlock(16, 4, placement="pre").double().eval()
    _randomize_norm(block.norm1)
    _randomize_norm(block.norm2)
    x = torch.randn(3, 5, 16, dtype=torch.float64)

    def ln(h, norm):
        return F.layer_norm(h, (16,), norm.weight, norm.bias, norm.eps)

    x1 = x + block.attn(ln(x, block.norm1))
    expected = x1 + block.mlp(ln(x1, block.norm2))
    torch.testing.assert_close(block(x), expected)


def test_transformer_post_placement_by_hand():
    block = TransformerBlock(16, 2, placement="post").double().eval()
    _randomize_norm(block.norm1)
    _randomize_norm(block.norm2)
    x = torch.randn(3, 5, 16, dtype=torch.float64)

    def ln(h, norm):
        return F.layer_norm(h, (16,), norm.weight, norm.bias, norm.eps)

    x1 = ln(x + block.attn(x), block.norm1)
    expected = ln(x1 + block.mlp(x1), block.norm2)
    torch.testing.assert_close(block(x), expected)


def test_transformer_plain_twin_drops_both_skips():
    res = TransformerBlock(8, 2, placement="pre").eval()
    plain = TransformerBlock(8, 2, placement="pre", residual=False).eval()
    assert n_params(res) == n_params(plain)
    plain.load_state_dict(res.state_dict())
    x = torch.randn(2, 4, 8)
    expected = plain.mlp(plain.norm2(plain.attn(plain.norm1(x))))
    torch.testing.assert_close(plain(x), expected)


def test_feedforward_by_hand():
    ff = FeedForward(6, 10)
    x = torch.randn(2, 3, 6)
    expected = F.gelu(x @ ff.fc1.weight.T + ff.fc1.bias) @ ff.fc2.weight.T + ff.fc2.bias
    torch.testing.assert_close(ff(x), expected)


@pytest.mark.parametrize("norm", ALL_NORMS)
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_transformer_every_norm(norm, placement):
    block = TransformerBlock(8, 2, norm=norm, placement=placement)
    x = torch.randn(3, 5, 8, requires_grad=True)
    y = block(x)
    assert y.shape == (3, 5, 8) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert block.attn.qkv.weight.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


def test_transformer_batch_norm_normalizes_each_channel_over_batch_and_tokens():
    block = TransformerBlock(8, 2, norm="batch").train()
    assert block.norm1.channel_dim == -1
    x = torch.randn(4, 6, 8) * torch.arange(1.0, 9.0) + torch.arange(8.0)
    h = block.norm1(x)
    torch.testing.assert_close(h.mean((0, 1)), torch.zeros(8), rtol=0, atol=1e-5)
    torch.testing.assert_close(h.var((0, 1), unbiased=False), torch.ones(8), rtol=0, atol=1e-3)
    assert block.norm1.running_mean.shape == (8,)


def test_deepnorm_alpha_and_init():
    dim, layers = 128, 6
    alpha, beta = deepnorm_constants(layers)
    assert alpha == pytest.approx((2 * layers) ** 0.25)
    assert beta == pytest.approx((8 * layers) ** -0.25)
    torch.manual_seed(3)
    block = TransformerBlock(dim, 4, placement="post", deepnorm_layers=layers)
    assert block.merge1.skip_weight == pytest.approx(alpha)
    assert block.merge2.skip_weight == pytest.approx(alpha)

    def xavier_std(weight, gain):
        fan_out, fan_in = weight.shape
        return gain * math.sqrt(2.0 / (fan_in + fan_out))

    qkv = block.attn.qkv.weight.detach()
    q, k, v = qkv[:dim], qkv[dim : 2 * dim], qkv[2 * dim :]
    cases = [
        (q, 1.0),
        (k, 1.0),
        (v, beta),
        (block.attn.proj.weight.detach(), beta),
        (block.mlp.fc1.weight.detach(), beta),
        (block.mlp.fc2.weight.detach(), beta),
    ]
    for weight, gain in cases:
        expected = xavier_std(weight, gain)
        # >= 16k samples: the std's relative standard error is below 0.6%
        assert weight.std().item() == pytest.approx(expected, rel=0.05)
        assert abs(weight.mean().item()) < 0.1 * expected


def test_deepnorm_forward_uses_alpha():
    block = TransformerBlock(8, 2, placement="post", deepnorm_layers=3).double().eval()
    alpha = (2 * 3) ** 0.25
    x = torch.randn(2, 4, 8, dtype=torch.float64)

    def ln(h, norm):
        return F.layer_norm(h, (8,), norm.weight, norm.bias, norm.eps)

    x1 = ln(alpha * x + block.attn(x), block.norm1)
    expected = ln(alpha * x1 + block.mlp(x1), block.norm2)
    torch.testing.assert_close(block(x), expected)


def test_deepnorm_with_pre_placement_raises():
    with pytest.raises(ValueError, match="placement='post'"):
        TransformerBlock(8, 2, placement="pre", deepnorm_layers=4)


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="heads=3 must divide dim=10"):
        TransformerBlock(10, 3)
    with pytest.raises(ValueError, match="divide"):
        SelfAttention(10, 4)


def test_transformer_input_checks():
    block = TransformerBlock(8, 2)
    with pytest.raises(ValueError, match="8 channels"):
        block(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="3-D"):
        block(torch.randn(2, 8))


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_equals_torch_multihead_attention(heads, causal):
    dim, t = 16, 7
    ours = SelfAttention(dim, heads, causal=causal).double().eval()
    ref = nn.MultiheadAttention(dim, heads, batch_first=True).double().eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(3, t, dim, dtype=torch.float64)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1) if causal else None
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(ours(x), expected)


# --------------------------------------------------------------------------------------
# DenseNet blocks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2])
def test_dense_block_channels_and_passthrough(dims):
    block = DenseBlock(3, 4, 5, dims=dims)
    assert block.out_channels == 4 + 3 * 5
    x = torch.randn(2, 4, *spatial(dims, 6))
    y = block(x)
    assert y.shape == (2, 19, *spatial(dims, 6))
    torch.testing.assert_close(y[:, :4], x, rtol=0, atol=0)
    # each layer sees everything before it
    layers = list(block.layers.values())
    assert [layer.in_channels for layer in layers] == [4, 9, 14]
    f1 = layers[0](x)
    f2 = layers[1](torch.cat([x, f1], 1))
    f3 = layers[2](torch.cat([x, f1, f2], 1))
    torch.testing.assert_close(y, torch.cat([x, f1, f2, f3], 1))
    # every layer is trained through the concatenation
    y.square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dense_block_plain_twin():
    res = DenseBlock(3, 4, 5)
    plain = DenseBlock(3, 4, 5, residual=False)
    assert n_params(res) == n_params(plain)
    plain.load_state_dict(res.state_dict())
    x = torch.randn(2, 4, 6, 6)
    y = plain(x)
    assert y.shape == res(x).shape == (2, 19, 6, 6)
    assert torch.count_nonzero(y[:, :14]) == 0
    assert torch.count_nonzero(y[:, 14:]) > 0
    # a chain: each layer sees only its predecessor's output (zeros before it)
    layers = list(plain.layers.values())
    h = layers[0](x)
    h = layers[1](F.pad(h, (0, 0, 0, 0, 4, 0)))
    h = layers[2](F.pad(h, (0, 0, 0, 0, 9, 0)))
    torch.testing.assert_close(y[:, 14:], h)


def test_dense_layer_bottleneck_and_bn_size_zero():
    layer = DenseLayer(6, 4, bn_size=4)
    assert n_params(layer) == 2 * 6 + 6 * 16 + 2 * 16 + 9 * 16 * 4
    plain = DenseLayer(6, 4, bn_size=0)
    assert plain.norm1 is None and plain.conv1 is None
    assert plain.conv2.in_channels == 6
    assert n_params(plain) == 2 * 6 + 9 * 6 * 4
    x = torch.randn(2, 6, 5, 5)
    assert layer(x).shape == plain(x).shape == (2, 4, 5, 5)
    expected = F.conv2d(torch.relu(bn_train(x, plain.norm2)), plain.conv2.weight, padding=1)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_dense_block_input_check_and_transition():
    block = DenseBlock(2, 4, 3)
    with pytest.raises(ValueError, match="4 channels"):
        block(torch.randn(2, 5, 6, 6))
    trans = Transition(10, 5)
    y = trans(torch.randn(2, 10, 8, 8))
    assert y.shape == (2, 5, 4, 4)
    assert n_params(trans) == 2 * 10 + 10 * 5


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_dense_block_every_norm(norm):
    block = DenseBlock(2, 4, 3, norm=norm)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    y = block(x)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
