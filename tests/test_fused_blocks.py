"""Fused add+norm modules, blocks and models: same parameters and results as unfused."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnorm import create_model
from resnorm.blocks import ResidualMLPBlock, TransformerBlock
from resnorm.kernels import ops
from resnorm.norms import FusedAddLayerNorm, FusedAddRMSNorm, LayerNorm, make_norm


@pytest.fixture
def always_fused(monkeypatch):
    """Send every size through the custom operator (small inputs otherwise run stock ops)."""
    monkeypatch.setattr(ops, "STOCK_BELOW", 0)


@pytest.mark.parametrize(
    "cls,twin", [(FusedAddLayerNorm, nn.LayerNorm), (FusedAddRMSNorm, nn.RMSNorm)]
)
def test_fused_modules_match_torch_twin_and_load_its_state(always_fused, cls, twin):
    torch.manual_seed(0)
    ref = twin(48)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    fused = cls(48, eps=ref.eps if ref.eps is not None else None)
    fused.load_state_dict(ref.state_dict())  # same keys, weights move both ways
    x, r = torch.randn(5, 7, 48), torch.randn(5, 7, 48)
    y, h = fused(x, r, prenorm=True)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, ref(x + r), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_fused_layer_norm_channels_first_falls_back_to_separate_ops(always_fused):
    fused = FusedAddLayerNorm(6, channel_dim=1)
    plain = LayerNorm(6, channel_dim=1)
    x, r = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    torch.testing.assert_close(fused(x, r), plain(x + r))


def test_fused_module_rejects_residual_of_another_shape():
    with pytest.raises(ValueError, match="residual must have x's shape"):
        FusedAddLayerNorm(8)(torch.randn(2, 8), torch.randn(3, 8))


def test_make_norm_fused_only_for_layer_and_rms():
    assert isinstance(make_norm("layer", 8, fused=True), FusedAddLayerNorm)
    assert isinstance(make_norm("rms", 8, fused=True), FusedAddRMSNorm)
    with pytest.raises(ValueError, match="fused=True supports norm kinds"):
        make_norm("batch", 8, fused=True)


@pytest.mark.parametrize("block", ["mlp", "transformer"])
def test_fused_block_needs_pre_norm_residual_layer_or_rms(block):
    with pytest.raises(ValueError, match="fused=True needs"):
        if block == "mlp":
            ResidualMLPBlock(8, "layer", "post", fused=True)
        else:
            TransformerBlock(8, 2, "batch", "pre", fused=True)


@pytest.mark.parametrize(
    "name,options,shape",
    [
        ("mlp", {"depth": 3, "width": 32, "norm": "layer", "placement": "pre"}, (6, 40)),
        (
            "mlp",
            {
                "depth": 3,
                "width": 32,
                "norm": "rms",
                "placement": "pre",
                "scale": "layerscale",
                "layerscale_init": 0.5,
            },
            (6, 40),
        ),
        ("transformer", {"depth": 2, "dim": 32, "heads": 4, "norm": "layer"}, (3, 40)),
        ("transformer", {"depth": 2, "dim": 32, "heads": 4, "norm": "rms"}, (3, 40)),
    ],
)
def test_fused_models_equal_unfused_forward_and_gradients(always_fused, name, options, shape):
    torch.manual_seed(0)
    plain = create_model(name, **options)
    fused = create_model(name, fused=True, **options)
    fused.load_state_dict(plain.state_dict())
    assert not plain.fused and fused.fused
    x = torch.randn(*shape)
    y_plain, y_fused = plain(x), fused(x)
    torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-5)
    F.cross_entropy(y_plain, torch.arange(shape[0]) % 10).backward()
    F.cross_entropy(y_fused, torch.arange(shape[0]) % 10).backward()
    for (pname, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=pname)


@pytest.mark.parametrize("block", ["mlp", "transformer"])
def test_standalone_fused_block_equals_unfused(always_fused, block):
    torch.manual_seed(0)
    if block == "mlp":
        a, b = (
            ResidualMLPBlock(16, "layer", "pre"),
            ResidualMLPBlock(16, "layer", "pre", fused=True),
        )
        x = torch.randn(4, 16)
    else:
        a, b = TransformerBlock(16, 2), TransformerBlock(16, 2, fused=True)
        x = torch.randn(2, 5, 16)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


def test_bench_cli_quick_writes_json_with_every_peer(tmp_path):
    import json

    from resnorm.cli import main

    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--quick",
            "--no-compile",
            "--repeats",
            "1",
            "--regimes",
            "reuse",
            "--kinds",
            "layer",
            "--shapes",
            "64x32",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    impls = {(row["impl"], row["pass"]) for row in result["kernels"]}
    assert {
        ("copy", "-"),
        ("resnorm", "fwd"),
        ("eager", "fwd"),
        ("resnorm", "fwd+bwd"),
        ("eager", "fwd+bwd"),
    } <= impls
    fused = [row for row in result["kernels"] if row["impl"] == "resnorm"]
    assert all(row["ms"] > 0 and row["x_vs_eager"] > 0 for row in fused)
    # 64 x 32 is tiny: --repeats 1 becomes the most rounds a small shape gets
    assert {row["rounds"] for row in result["kernels"]} == {8}
    assert {row["model"].split("(")[0] for row in result["end_to_end"]} == {"mlp", "transformer"}
    assert all(row["fused_ms"] > 0 and row["unfused_ms"] > 0 for row in result["end_to_end"])


def test_bench_parse_shapes():
    from resnorm.bench import parse_shapes

    assert parse_shapes("4096x768, 16384X1024") == ((4096, 768), (16384, 1024))
    for bad in ("12x", "0x5", "3x4x5", "axb", ""):
        with pytest.raises(ValueError, match="is not ROWSxHIDDEN with positive integers"):
            parse_shapes(bad)


def test_bench_rounds_scale_with_shape():
    from resnorm.bench import rounds_for

    assert rounds_for(9, 16384 * 1024) == 9  # 16M elements: as asked
    assert rounds_for(9, 8192 * 4096) == 9  # larger: never fewer
    assert rounds_for(9, 4096 * 768) == 45  # 3.1M: five times as many
    assert rounds_for(9, 64 * 32) == 72  # capped at 8x
    assert rounds_for(1, 0) == 8


@pytest.mark.parametrize(
    "args,message",
    [
        (["--shapes", "12x"], "ROWSxHIDDEN"),
        (["--kinds", "batch"], "not one of layer, rms"),
        (["--regimes", "warm"], "not one of fresh, reuse"),
    ],
)
def test_bench_cli_bad_arguments_exit_2(capsys, args, message):
    from resnorm.cli import main

    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_fused_channels_first_stream_summed_in_float32_like_the_kernel():
    # Not fusable (channels first): the separate add must still sum in float32 and keep
    # the stream in float32 with residual_in_fp32, as add_norm does.
    norm = FusedAddLayerNorm(4, channel_dim=1, residual_in_fp32=True)
    x = torch.full((1, 4, 3), 256.0, dtype=torch.bfloat16)
    r = torch.ones(1, 4, 3, dtype=torch.bfloat16)  # 257 is not a bfloat16 number
    y, h = norm(x, r, prenorm=True)
    assert h.dtype == torch.float32 and torch.equal(h, torch.full((1, 4, 3), 257.0))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "cls,twin", [(FusedAddLayerNorm, nn.LayerNorm), (FusedAddRMSNorm, nn.RMSNorm)]
)
def test_fused_modules_with_relu_match_twin_then_relu(always_fused, cls, twin):
    torch.manual_seed(1)
    ref = twin(48)
    fused = cls(48, activation="relu")
    fused.load_state_dict(ref.state_dict())
    assert "activation='relu'" in repr(fused)
    x, r = torch.randn(5, 7, 48), torch.randn(5, 7, 48)
    y, h = fused(x, r, prenorm=True)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, torch.relu(ref(x + r)), rtol=1e-5, atol=1e-5)
    assert bool((y == 0).any())


def test_fused_relu_channels_first_falls_back_to_separate_ops(always_fused):
    fused = FusedAddLayerNorm(6, channel_dim=1, activation="relu")
    plain = LayerNorm(6, channel_dim=1)
    x, r = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    torch.testing.assert_close(fused(x, r), torch.relu(plain(x + r)))


def test_fused_module_rejects_unknown_activation():
    with pytest.raises(
        ValueError,
        match=r"activation='gelu' is not supported; accepted values: "
        r"None, 'identity', 'relu'",
    ):
        FusedAddLayerNorm(8, activation="gelu")
    assert FusedAddLayerNorm(8, activation="identity").activation is None


@pytest.mark.parametrize("activation,in_norm", [("relu", True), ("gelu", False)])
def test_fused_mlp_puts_relu_in_its_norms_only(always_fused, activation, in_norm):
    """The fused MLP fuses its ReLUs into the norms; other activations stay modules. Either
    way it equals the unfused model."""
    torch.manual_seed(0)
    options = {
        "depth": 2,
        "width": 24,
        "norm": "layer",
        "placement": "pre",
        "activation": activation,
    }
    plain = create_model("mlp", **options)
    fused = create_model("mlp", fused=True, **options)
    fused.load_state_dict(plain.state_dict())
    norms = [fused.final_norm] + [n for b in fused.blocks for n in (b.norm1, b.norm2)]
    assert all(n.activation == ("relu" if in_norm else None) for n in norms)
    assert all(b.act_in_norm == in_norm for b in fused.blocks)
    calls = []
    hooks = [
        m.register_forward_hook(lambda *a: calls.append(1))
        for m in fused.modules()
        if isinstance(m, (nn.ReLU, nn.GELU))
    ]
    x = torch.randn(6, 40)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    assert (len(calls) == 0) == in_norm  # the activation modules ran only when not fused
    for h in hooks:
        h.remove()
