"""Tests of the model zoo (resnorm.models): published parameter counts, torchvision
compatibility, every registered model end to end, every normalization kind, the
registry's errors and bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from resnorm.blocks import DropPath, LayerScale, ResidualAdd, ResidualConfig, ScalarGain
from resnorm.models import (
    CifarDenseNet,
    CifarResNet,
    ImageNetResNet,
    ResidualMLP,
    TransformerClassifier,
    accepted_options,
    create_model,
    get_model_entry,
    list_models,
    register_model,
)
from resnorm.norms import NORM_KINDS, BatchNorm, DyT, GroupNorm, InstanceNorm, LayerNorm, RMSNorm

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = json.loads((FIXTURES / "torchvision_resnet.json").read_text())
IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
ALL_NORMS = list(NORM_KINDS)
NORM_CLASSES = {
    "batch": BatchNorm,
    "layer": LayerNorm,
    "rms": RMSNorm,
    "group": GroupNorm,
    "instance": InstanceNorm,
    "dyt": DyT,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def downsample_params(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".downsample." in name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A small valid input for any model of the zoo."""
    if isinstance(model, ImageNetResNet):
        return torch.randn(batch, model.in_channels, 64, 64)
    if isinstance(model, (CifarResNet, CifarDenseNet)):
        if model.dims == 1:
            return torch.randn(batch, model.in_channels, 40)
        size = 8 if getattr(model, "depth", 0) > 200 else 16
        return torch.randn(batch, model.in_channels, size, size)
    if isinstance(model, ResidualMLP):
        return torch.randn(batch, model.in_features)
    if isinstance(model, TransformerClassifier):
        return torch.randn(batch, model.seq_len)
    raise AssertionError(f"no example input for {type(model).__name__}")


def first_layer(model: nn.Module) -> nn.Module:
    """The first convolution or linear layer the input meets."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            return module
    raise AssertionError("no layer")


def classifier(model: nn.Module) -> nn.Linear:
    head = getattr(model, "fc", None) or getattr(model, "head", None)
    assert isinstance(head, nn.Linear)
    return head


def check_forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    num_classes = classifier(model).out_features
    y = model(x)
    assert y.shape == (x.shape[0], num_classes)
    assert torch.isfinite(y).all()
    # a loss that depends on every logit differently (a plain sum can cancel through a norm)
    (y * torch.linspace(-1, 1, num_classes)).sum().add(y.square().mean()).backward()
    grad = first_layer(model).weight.grad
    assert grad is not None, "no gradient at the first layer"
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------

CIFAR_COUNTS = {
    20: 269_722,
    32: 464_154,
    44: 658_586,
    56: 853_018,
    110: 1_727_962,
    1202: 19_421_274,
}


@pytest.mark.parametrize("depth", list(CIFAR_COUNTS))
def test_cifar_resnet_published_counts(depth):
    model = create_model(f"resnet{depth}")
    assert n_params(model) == CIFAR_COUNTS[depth]
    if depth < 1000:
        assert n_params(create_model("resnet_cifar", depth=depth)) == CIFAR_COUNTS[depth]
    # option A: no shortcut parameters at all
    assert downsample_params(model) == 0


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_twins_have_their_resnets_count(depth):
    plain, res = create_model(f"plain{depth}"), create_model(f"resnet{depth}")
    assert n_params(plain) == n_params(res) == CIFAR_COUNTS[depth]
    assert list(plain.state_dict()) == list(res.state_dict())
    merges = [m for m in plain.modules() if isinstance(m, ResidualAdd)]
    assert len(merges) == 3 * (depth - 2) // 6
    assert not any(m.residual for m in merges)
    assert all(m.residual for m in res.modules() if isinstance(m, ResidualAdd))
    plain1d, res1d = create_model(f"plain1d_{depth}"), create_model(f"resnet1d_{depth}")
    assert n_params(plain1d) == n_params(res1d)


def test_resnet1d_20_count_by_formula():
    # 1-D convs of kernel 3: every 3x3 weight becomes 3 taps, one input channel
    stem = 1 * 16 * 3 + 2 * 16
    blocks = 0
    for cin, c in [(16, 16), (16, 32), (32, 64)]:
        blocks += (cin * c * 3 + 2 * c + c * c * 3 + 2 * c) + 2 * (2 * (c * c * 3 + 2 * c))
    fc = 64 * 10 + 10
    assert n_params(create_model("resnet1d_20")) == stem + blocks + fc == 91_162


def test_seed_mlp_keras_counts():
    model = create_model("seed_mlp")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == n_params(model) == 34_826
    moving = sum(
        b.numel()
        for name, b in model.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    )
    assert moving == 512
    assert trainable + moving == 35_338
    # Input(128) -> residual block (two Dense 128 + two BN) -> Dense(10)
    assert isinstance(model.stem, nn.Identity) and len(model.blocks) == 1
    assert model(torch.randn(3, 128)).shape == (3, 10)


def test_reference_torchvision_counts():
    assert FIXTURE["resnet18"]["num_parameters"] == 11_689_512
    assert FIXTURE["resnet50"]["num_parameters"] == 25_557_032


@pytest.mark.parametrize("depth", [18, 34])
def test_imagenet_plain_twins_drop_only_the_projections(depth):
    res, plain = create_model(f"resnet{depth}"), create_model(f"plain{depth}")
    projections = downsample_params(res)
    # layer2..4 each open with a projection: conv1x1 + BN
    assert projections == sum(
        cin * cout + 2 * cout for cin, cout in [(64, 128), (128, 256), (256, 512)]
    )
    assert n_params(plain) == FIXTURE[f"resnet{depth}"]["num_parameters"] - projections
    assert downsample_params(plain) == 0


def densenet_bc_count(depth: int, k: int, num_classes: int = 10, in_channels: int = 3) -> int:
    """DenseNet-BC (Huang et al. 2017) by the paper's description: a 3x3 stem to 2k
    channels, 3 blocks of (depth - 4) / 6 bottleneck layers BN-ReLU-Conv1x1(4k)-BN-ReLU-
    Conv3x3(k), transitions BN-ReLU-Conv1x1 halving the channels, final BN, linear."""
    layers = (depth - 4) // 6
    c = 2 * k
    total = in_channels * c * 9
    for block in range(3):
        for _ in range(layers):
            total += 2 * c + c * 4 * k + 2 * 4 * k + 4 * k * k * 9
            c += k
        if block < 2:
            out = c // 2
            total += 2 * c + c * out
            c = out
    return total + 2 * c + c * num_classes + num_classes


def test_densenet_bc100_count():
    expected = densenet_bc_count(100, 12)
    assert expected == 769_162
    assert n_params(create_model("densenet_bc100")) == expected
    assert n_params(create_model("densenet_cifar", depth=40, growth_rate=24)) == densenet_bc_count(
        40, 24
    )
    # an odd channel count before a transition: compression rounds down (floor(0.5 m))
    assert n_params(create_model("densenet_cifar", depth=10, growth_rate=5)) == densenet_bc_count(
        10, 5
    )
    # the plain twin keeps every parameter
    assert n_params(create_model("densenet_bc100", residual=False)) == expected


def preact_bottleneck_count(depth: int, num_classes: int = 10) -> int:
    """Pre-activation bottleneck CIFAR ResNet (He et al. 2016): bare 3x3 stem to 16, 3
    stages of (depth - 2) / 9 blocks BN-ReLU-1x1(p)-BN-ReLU-3x3(p)-BN-ReLU-1x1(4p) with
    p = 16, 32, 64, a bare 1x1 projection opening each stage, final BN, linear."""
    n = (depth - 2) // 9
    total = 3 * 16 * 9
    cin = 16
    for p in (16, 32, 64):
        for i in range(n):
            total += 2 * cin + cin * p + 2 * p + 9 * p * p + 2 * p + p * 4 * p
            if i == 0:
                total += cin * 4 * p
            cin = 4 * p
    return total + 2 * cin + cin * num_classes + num_classes


@pytest.mark.parametrize("depth,published", [(164, 1_703_258), (1001, 10_327_706)])
def test_preact_resnet_counts(depth, published):
    assert preact_bottleneck_count(depth) == published
    assert n_params(create_model(f"preact_resnet{depth}")) == published


def test_mlp_and_transformer_default_counts():
    # Linear(40, 128) + 48 blocks of (2 Linear(128, 128) + 2 BN(128)) + Linear(128, 10)
    block = 2 * (128 * 128 + 128) + 2 * 2 * 128
    assert n_params(create_model("mlp")) == (40 * 128 + 128) + 48 * block + (128 * 10 + 10)
    assert n_params(create_model("plain_mlp")) == n_params(create_model("mlp"))
    dim, hidden, depth = 64, 128, 4
    block = (
        2 * 2 * dim
        + (3 * dim * dim + 3 * dim)
        + (dim * dim + dim)
        + (dim * hidden + hidden)
        + (hidden * dim + dim)
    )
    expected = (dim + dim) + 40 * dim + depth * block + 2 * dim + dim * 10 + 10
    assert n_params(create_model("transformer")) == expected == 137_354


# --------------------------------------------------------------------------------------
# The models' forward, by hand from their parts
# --------------------------------------------------------------------------------------


def _bn(h, norm):
    dims = [0, *range(2, h.dim())]
    shape = [1, -1] + [1] * (h.dim() - 2)
    mean, var = h.mean(dims, keepdim=True), h.var(dims, keepdim=True, unbiased=False)
    return (h - mean) / torch.sqrt(var + 1e-5) * norm.weight.view(shape) + norm.bias.view(shape)


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_mlp_forward_by_hand(placement):
    model = create_model("mlp", depth=2, width=16, placement=placement)
    x = torch.randn(5, 2, 20)  # (N, ...) inputs are flattened
    # post: Linear -> ReLU input layer; pre: a bare Linear (the first block normalizes)
    stem = model.stem[0] if placement == "post" else model.stem
    assert isinstance(stem, nn.Linear) and stem.in_features == 40
    h = x.flatten(1) @ stem.weight.T + stem.bias
    if placement == "post":
        h = torch.relu(h)
    h = model.blocks[1](model.blocks[0](h))
    if placement == "pre":
        h = torch.relu(_bn(h, model.final_norm))
    torch.testing.assert_close(model(x), model.head(h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_transformer_forward_by_hand(pool):
    model = create_model("transformer", depth=2, pool=pool).eval()
    x = torch.randn(3, 40)
    h = model.embed(x.unsqueeze(-1))
    if pool == "cls":
        h = torch.cat([model.cls.expand(3, -1, -1), h], 1)
    h = model.blocks(h + model.pos)
    h = torch.nn.functional.layer_norm(h, (64,), model.final_norm.weight, model.final_norm.bias)
    expected = model.head(h[:, 0] if pool == "cls" else h.mean(1))
    torch.testing.assert_close(model(x), expected)
    # the learned positions make the output depend on the order of the tokens
    perm = torch.randperm(40)
    assert not torch.allclose(model(x[:, perm]), model(x), atol=1e-4)


def test_cifar_resnet_forward_by_hand():
    model = create_model("resnet20")
    x = torch.randn(2, 3, 16, 16)
    h = torch.relu(_bn(model.conv1(x), model.bn1))
    h = model.layer3(model.layer2(model.layer1(h)))
    assert h.shape == (2, 64, 4, 4)
    torch.testing.assert_close(model(x), model.fc(h.mean((2, 3))), rtol=1e-5, atol=1e-5)
    widths = [
        (s[0].in_channels, s[-1].out_channels, s[0].stride)
        for s in (model.layer1, model.layer2, model.layer3)
    ]
    assert widths == [(16, 16, 1), (16, 32, 2), (32, 64, 2)]


def test_preact_resnet_forward_by_hand():
    model = create_model("preact_resnet", depth=11)
    assert not hasattr(model, "bn1")
    x = torch.randn(2, 3, 16, 16)
    h = model.layer3(model.layer2(model.layer1(model.conv1(x))))
    h = torch.relu(_bn(h, model.final_norm))
    torch.testing.assert_close(model(x), model.fc(h.mean((2, 3))), rtol=1e-5, atol=1e-5)


def test_cifar_resnet_placement_pre_is_the_preact_resnet():
    """One vocabulary: CifarResNet's placement is the word of the MLP and Transformer
    blocks; "pre" builds the pre-activation network the preact_* names register."""
    assert "placement" in accepted_options("resnet_cifar")
    assert "placement" not in accepted_options("preact_resnet")  # fixed at "pre"
    torch.manual_seed(0)
    generic = create_model(
        "resnet_cifar", depth=11, block="bottleneck", placement="pre", shortcut="B"
    )
    torch.manual_seed(0)
    named = create_model("preact_resnet", depth=11)
    assert generic.placement == named.placement == "pre"
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(generic.eval()(x), named.eval()(x), rtol=0, atol=0)
    assert create_model("resnet20").placement == "post"
    with pytest.raises(ValueError, match="placement='middle' is not supported.*'post', 'pre'"):
        create_model("resnet_cifar", placement="middle")
    with pytest.raises(TypeError, match="unexpected option.*preact"):
        create_model("resnet_cifar", preact=True)


def test_imagenet_resnet_forward_by_hand():
    model = create_model("resnet18", num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    h = torch.relu(_bn(model.conv1(x), model.bn1))
    h = torch.nn.functional.max_pool2d(h, 3, 2, 1)
    assert h.shape == (2, 64, 16, 16)
    h = model.layer4(model.layer3(model.layer2(model.layer1(h))))
    assert h.shape == (2, 512, 2, 2)
    torch.testing.assert_close(model(x), model.fc(h.mean((2, 3))), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# torchvision compatibility
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_state_dict_equals_torchvision(name):
    model = create_model(name)
    assert n_params(model) == FIXTURE[name]["num_parameters"]
    ours = model.state_dict()
    theirs = FIXTURE[name]["state_dict"]
    assert list(ours) == list(theirs)
    for key, tensor in ours.items():
        assert list(tensor.shape) == theirs[key], key
    # a torchvision-shaped state dict loads strictly (a distinct value per key, so a key
    # landing in the wrong tensor shows)
    fake = {
        k: (
            torch.tensor(i, dtype=torch.long)
            if k.endswith("num_batches_tracked")
            else torch.full(s, float(i))
        )
        for i, (k, s) in enumerate(theirs.items())
    }
    model.load_state_dict(fake, strict=True)
    torch.testing.assert_close(model.conv1.weight.detach(), fake["conv1.weight"], rtol=0, atol=0)
    # a state dict saved from ours loads strictly into a fresh one, values and all
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = create_model(name)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, fake[key]), key


def test_imagenet_loaded_weights_give_the_same_outputs():
    a, b = create_model("resnet18").eval(), create_model("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict(), strict=True)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Every registered model, end to end
# --------------------------------------------------------------------------------------


# The biggest (resnet1202, preact_resnet1001, resnet152, resnet101) take under a second
# each here on two idle cores (CIFAR nets deeper than 200 layers get 8x8 inputs), so none
# is marked slow; with the cores shared with another busy process they take 10-30 s.
@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_backward(name):
    model = create_model(name)
    # A plain stack of 96 batch-normalized layers explodes gradients at initialization, to
    # inf at batch 2 (a feature equal in both samples is scaled by 1/(2 sqrt(eps)) = 158 in
    # the backward pass); see test_plain_mlp_gradient_explodes.
    batch = 16 if name == "plain_mlp" else 2
    x = example_input(model, batch)
    check_forward_backward(model, x)
    if isinstance(model, CifarResNet) and model.dims == 1:
        model.zero_grad()
        check_forward_backward(model, x.squeeze(1))  # (N, L) as well as (N, 1, L)


def test_plain_mlp_gradient_explodes():
    norms = {}
    for name in ("mlp", "plain_mlp"):
        torch.manual_seed(0)
        model = create_model(name)
        y = model(torch.randn(16, 40))
        (y * torch.linspace(-1, 1, 10)).sum().backward()
        norms[name] = first_layer(model).weight.grad.norm().item()
    assert norms["plain_mlp"] > 1e4 * norms["mlp"]


@pytest.mark.parametrize("name", ["resnet1d_20", "plain1d_20", "resnet1d"])
def test_1d_models_take_n_l_and_n_1_l(name):
    model = create_model(name).eval()
    x = torch.randn(2, 40)
    torch.testing.assert_close(model(x), model(x.unsqueeze(1)), rtol=0, atol=0)
    check_forward_backward(model.train(), x)


def test_transformer_takes_n_l_and_n_l_1():
    model = create_model("transformer").eval()
    x = torch.randn(2, 40)
    torch.testing.assert_close(model(x), model(x.unsqueeze(-1)), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# norm= and residual= on every family
# --------------------------------------------------------------------------------------

# (registry name, overrides that keep it small)
FAMILIES = [
    ("mlp", {"depth": 3, "width": 64}),
    ("resnet20", {}),
    ("resnet1d_20", {}),
    ("preact_resnet", {"depth": 11}),
    ("densenet_cifar", {"depth": 10}),
    ("resnet_imagenet", {"depth": 18}),
    ("transformer", {"depth": 2}),
]


@pytest.mark.parametrize("norm", ALL_NORMS)
@pytest.mark.parametrize("name,options", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_norm_kind(name, options, norm):
    model = create_model(name, norm=norm, **options)
    x = example_input(model)
    if name == "mlp" and norm == "instance":
        # instance norm needs positions to normalize over; features (N, C) have none
        with pytest.raises(ValueError, match="3-D"):
            model(x)
        return
    check_forward_backward(model, x)
    # the kind asked for is the only normalization in the model
    kinds = {type(m) for m in model.modules() if isinstance(m, tuple(NORM_CLASSES.values()))}
    assert kinds == ({NORM_CLASSES[norm]} if norm != "none" else set())


def test_norm_kind_reaches_every_layer():
    model = create_model("resnet20", norm="group")
    norms = [m for m in model.modules() if isinstance(m, GroupNorm)]
    # stem + two per basic block
    assert len(norms) == 1 + 2 * 9
    assert not any(hasattr(m, "running_mean") for m in model.modules())


def test_instance_norm_in_conv_nets_needs_more_than_one_position():
    model = create_model("resnet20", norm="instance")
    check_forward_backward(model, torch.randn(2, 3, 32, 32))
    # 4x4 inputs leave one position per channel in the last stage: nothing to normalize
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        model(torch.randn(2, 3, 4, 4))
    check_forward_backward(create_model("resnet1d_20", norm="instance"), torch.randn(2, 40))


@pytest.mark.parametrize("name,options", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_residual_false_builds_the_plain_twin(name, options):
    res = create_model(name, **options)
    plain = create_model(name, residual=False, **options)
    check_forward_backward(plain, example_input(plain))
    merges = [m for m in plain.modules() if isinstance(m, ResidualAdd)]
    if name.startswith("densenet"):
        blocks = [m for m in plain.modules() if hasattr(m, "growth_rate")]
        assert blocks and not any(b.residual for b in blocks)
    else:
        assert merges and not any(m.residual for m in merges)
    # projection shortcuts exist only to make the addition possible: the plain twin drops them
    assert n_params(plain) == n_params(res) - downsample_params(res)
    if name in ("resnet_imagenet", "preact_resnet"):
        assert downsample_params(res) > 0
    else:
        assert n_params(plain) == n_params(res)


def test_residual_false_changes_the_function_not_the_weights():
    res = create_model("resnet20").eval()
    plain = create_model("resnet20", residual=False).eval()
    plain.load_state_dict(res.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(res(x), plain(x))


@settings(max_examples=20, deadline=None, database=None)
@given(
    depth=st.integers(0, 4),
    width=st.integers(1, 32),
    norm=st.sampled_from(ALL_NORMS),
    placement=st.sampled_from(["post", "pre"]),
    batch=st.integers(2, 6),
    in_features=st.integers(1, 48),
    num_classes=st.integers(1, 12),
)
def test_mlp_property(depth, width, norm, placement, batch, in_features, num_classes):
    torch.manual_seed(depth * 1000 + width)
    model = create_model(
        "mlp",
        depth=depth,
        width=width,
        norm=norm,
        placement=placement,
        in_features=in_features,
        num_classes=num_classes,
    )
    x = torch.randn(batch, in_features)
    uses_norm = depth > 0 or placement == "pre"
    if norm == "instance" and uses_norm:
        with pytest.raises(ValueError, match="3-D"):
            model(x)
        return
    y = model(x)
    assert y.shape == (batch, num_classes)
    assert torch.isfinite(y).all()


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet57'.*did you mean.*resnet56"):
        create_model("resnet57")
    with pytest.raises(ValueError, match="list_models"):
        create_model("zzzz")


def test_unknown_override_names_it():
    with pytest.raises(TypeError, match=r"nrom.*accepted: .*norm"):
        create_model("resnet20", nrom="batch")


def test_overriding_a_fixed_argument_names_its_value():
    with pytest.raises(TypeError, match="fixes depth=56"):
        create_model("resnet56", depth=20)
    with pytest.raises(TypeError, match="fixes residual=False"):
        create_model("plain20", residual=True)
    # the family entry takes the argument
    assert create_model("resnet_cifar", depth=20).depth == 20


def test_list_models_pattern():
    names = list_models()
    assert len(names) == len(set(names)) >= 40
    for expected in [
        "resnet20",
        "resnet1202",
        "plain56",
        "resnet1d_20",
        "preact_resnet1001",
        "resnet50",
        "plain34",
        "densenet_bc100",
        "mlp",
        "seed_mlp",
        "transformer",
    ]:
        assert expected in names
    assert list_models("resnet1d_*") == [
        "resnet1d_20",
        "resnet1d_32",
        "resnet1d_44",
        "resnet1d_56",
        "resnet1d_110",
    ]
    assert list_models("plain?0") == ["plain20"]
    assert set(list_models("*mlp")) == {"mlp", "plain_mlp", "seed_mlp"}
    assert list_models("no_such_*") == []
    assert set(list_models("resnet*")) < set(names)


def test_accepted_options():
    options = accepted_options("resnet56")
    assert "depth" not in options
    assert {"norm", "residual", "num_classes", "shortcut"} <= set(options)
    assert "depth" in accepted_options("resnet_cifar")
    assert "residual" not in accepted_options("plain20")
    assert {"norm", "residual", "placement", "width"} <= set(accepted_options("mlp"))
    assert {"depth", "placement"}.isdisjoint(accepted_options("seed_mlp"))
    for name in list_models():
        assert "norm" in accepted_options(name), name
    entry = get_model_entry("resnet56")
    assert entry.fixed == {"depth": 56} and entry.builder is CifarResNet
    with pytest.raises(ValueError, match="unknown model"):
        accepted_options("resnet57")


def test_register_model_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20", CifarResNet)


def test_defaults_apply_and_can_be_overridden():
    model = create_model("resnet1d_20")
    assert model.in_channels == 1 and model.dims == 1
    assert create_model("resnet1d_20", in_channels=2).in_channels == 2
    assert create_model("resnet20", num_classes=100).fc.out_features == 100


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [21, 2, 9])
def test_cifar_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match=rf"depth={depth} is not of the form 6n\+2"):
        create_model("resnet_cifar", depth=depth)


@pytest.mark.parametrize("depth", [20 + 1, 56 + 6, 2])
def test_preact_bottleneck_depth_must_be_9n_plus_2(depth):
    with pytest.raises(ValueError, match=r"9n\+2"):
        create_model("preact_resnet", depth=depth)
    with pytest.raises(ValueError, match=r"9n\+2"):
        create_model("resnet_cifar", depth=depth, block="bottleneck")


def test_other_depth_errors():
    with pytest.raises(ValueError, match=r"6n\+4"):
        create_model("densenet_cifar", depth=99)
    with pytest.raises(ValueError, match="18, 34, 50, 101, 152"):
        create_model("resnet_imagenet", depth=20)


@pytest.mark.parametrize(
    "name,bad,pattern",
    [
        ("resnet20", (2, 1, 32, 32), r"\(N, C, H, W\) must have 3 channels"),
        ("resnet20", (3, 32, 32), r"\(N, C, H, W\) must be 4-D"),
        ("resnet18", (2, 1, 64, 64), r"\(N, C, H, W\) must have 3 channels"),
        ("resnet18", (2, 3, 64), r"\(N, C, H, W\) must be 4-D"),
        ("densenet_bc100", (2, 4, 16, 16), r"\(N, C, H, W\) must have 3 channels"),
        ("resnet1d_20", (2, 3, 40), r"\(N, C, L\) must have 1 channels"),
        ("resnet1d_20", (2, 1, 1, 40), r"\(N, C, L\) must be 3-D"),
        ("mlp", (2, 39), r"\(N, 40\)"),
        ("seed_mlp", (2, 40), r"\(N, 128\)"),
        ("transformer", (2, 39), r"\(N, 40, 1\)"),
        ("transformer", (2, 40, 2), r"\(N, 40, 1\)"),
    ],
)
def test_bad_input_names_the_layout(name, bad, pattern):
    model = create_model(name)
    with pytest.raises(ValueError, match=pattern):
        model(torch.randn(*bad))


def test_unknown_norm_lists_the_kinds():
    for name in ("resnet20", "mlp", "transformer", "densenet_bc100", "resnet18"):
        with pytest.raises(
            ValueError,
            match=r"norm='batchnorm'.*'batch', 'layer', 'rms', "
            r"'group', 'instance', 'dyt', 'none'",
        ):
            create_model(name, norm="batchnorm")


def test_deepnorm_transformer():
    model = create_model("transformer", deepnorm=True, placement="post", depth=3)
    alphas = [m.skip_weight for m in model.modules() if isinstance(m, ResidualAdd)]
    assert alphas == [pytest.approx((2 * 3) ** 0.25)] * 6
    check_forward_backward(model, torch.randn(2, 40))
    with pytest.raises(ValueError, match="placement='post'"):
        create_model("transformer", deepnorm=True)


# --------------------------------------------------------------------------------------
# Options passed through to every block
# --------------------------------------------------------------------------------------


def test_drop_path_follows_the_linear_rule():
    model = create_model("resnet20", drop_path=0.3)
    rates = [m.p for m in model.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.3 * (i + 1) / 9 for i in range(9)])
    model = create_model("transformer", depth=4, drop_path=0.2)
    rates = [m.p for m in model.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.2 * (i + 1) / 4 for i in range(4) for _ in range(2)])
    # identity in eval mode
    model = create_model("mlp", depth=3, drop_path=0.5).eval()
    plain = create_model("mlp", depth=3).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 40)
    torch.testing.assert_close(model(x), plain(x))


def test_norm_options_and_scale_reach_the_blocks():
    model = create_model("resnet20", norm="group", norm_options={"num_groups": 4})
    groups = {m.num_groups for m in model.modules() if isinstance(m, GroupNorm)}
    assert groups == {4}
    model = create_model("resnet1d_20", scale="layerscale", layerscale_init=1e-3)
    gammas = [m.gamma for m in model.modules() if isinstance(m, LayerScale)]
    assert len(gammas) == 9 and all(torch.all(g == 1e-3) for g in gammas)


def test_one_merge_config_reaches_every_block():
    """``merge=ResidualConfig(...)`` and its fields as keyword arguments are one option:
    the fields win over the config's, and each block gets the config with its own
    stochastic-depth rate."""
    plain = create_model("resnet20", merge=ResidualConfig(residual=False))
    assert list(plain.state_dict()) == list(create_model("plain20").state_dict())
    model = create_model(
        "mlp", depth=4, merge=ResidualConfig(scale="rezero", drop_path=0.9), drop_path=0.4
    )
    merges = [m for m in model.modules() if isinstance(m, ResidualAdd)]
    assert len(merges) == 4 and all(isinstance(m.scale, ScalarGain) for m in merges)
    assert [m.drop_path.p for m in merges] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    for name in ("mlp", "resnet56", "resnet18", "transformer"):
        assert {"merge", "residual", "scale", "layerscale_init", "skip_weight", "drop_path"} <= set(
            accepted_options(name)
        ), name
    with pytest.raises(TypeError, match="merge must be a ResidualConfig"):
        create_model("mlp", merge={"residual": False})


@pytest.mark.parametrize("name", ["mlp", "transformer", "preact_resnet", "resnet1d"])
def test_state_dict_keys_of_scaled_merges_are_those_of_before(name):
    """Weights saved before blocks and models took one ResidualConfig load now: the same
    keys in the same order (the ImageNet ResNets are checked against torchvision's)."""
    case = json.loads((FIXTURES / "merge_state_dict_keys.json").read_text())["models"][name]
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in case["options"].items()}
    model = create_model(name, **options)
    assert list(model.state_dict()) == case["keys"]
    model.load_state_dict(create_model(name, **options).state_dict(), strict=True)


def test_zero_init_last_reaches_the_blocks():
    model = create_model("resnet18", zero_init_last=True)
    last = [
        b.bn2.weight
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
        for b in stage
    ]
    assert len(last) == 8 and all(torch.count_nonzero(w) == 0 for w in last)
    assert torch.count_nonzero(model.layer1[0].bn1.weight) == 64
    model = create_model("resnet20", zero_init_last=True)
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    assert len(blocks) == 9 and all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    assert all(
        torch.count_nonzero(b.bn2.weight) == b.out_channels
        for stage in (create_model("resnet20").layer1,)
        for b in stage
    )


def test_convolutions_get_kaiming_fan_out_init():
    model = create_model("resnet_cifar", depth=20, widths=(32, 128, 256))
    weight = model.layer2[0].conv1.weight.detach()  # 32 -> 128, 3x3: 36,864 samples
    fan_out = weight.shape[0] * 9
    assert fan_out == 4 * weight.shape[1] * 9  # fan-in would give twice the std
    assert weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.03)
    assert abs(weight.mean().item()) < 0.05 * (2 / fan_out) ** 0.5


def test_post_norm_transformer_has_no_final_norm():
    post = create_model("transformer", placement="post")
    assert isinstance(post.final_norm, nn.Identity)
    assert not isinstance(create_model("transformer").final_norm, nn.Identity)


@pytest.mark.parametrize("name", list_models())
def test_a_variant_function_builds_what_its_registered_fixed_options_say(name):
    """``@register_model(fixed=...)`` next to the function's own body: the two must agree
    (same structure: names, shapes, dtypes; built on the meta device, no memory)."""
    entry = get_model_entry(name)
    with torch.device("meta"):
        built = entry.build()
        declared = entry.builder(**{**entry.defaults, **entry.fixed})
    assert type(built) is type(declared)
    assert [(k, v.shape, v.dtype) for k, v in built.state_dict().items()] == [
        (k, v.shape, v.dtype) for k, v in declared.state_dict().items()
    ]
