"""diagnose()'s verdict from several signals, on models written the way other codebases
write them (plain torch.nn): zero-initialized designs that train, the classic failures,
recurrent layers, any model output, and the training-time signals of ``steps=``.

The expected verdicts are those of the trainability benchmark's ground truth
(bench/trainability: the same designs trained for 400 steps on MNIST-1D)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from resnorm.diagnostics import Verdict, diagnose
from resnorm.diagnostics.outputs import read_output
from resnorm.errors import UsageError, UsageTypeError
from resnorm.models import create_model, list_models


def _batch(n=64, features=40, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


class ZeroInitResNet(nn.Module):
    """torchvision's zero_init_residual: each block's last BatchNorm scale starts at 0."""

    def __init__(self, width=32, blocks=6):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(1, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU()
        )
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            block = nn.Sequential(
                nn.Conv1d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(),
                nn.Conv1d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm1d(width),
            )
            nn.init.zeros_(block[-1].weight)
            self.blocks.append(block)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x.unsqueeze(1))
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean(-1))


class ZeroHeadMixer(nn.Module):
    """MLP-Mixer's layout (timm's init: the classifier head starts at zero)."""

    def __init__(self, tokens=10, dim=32, depth=4):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.mix = nn.ModuleList()
        for _ in range(depth):
            self.mix.append(
                nn.ModuleDict(
                    {
                        "norm1": nn.LayerNorm(dim),
                        "token": nn.Sequential(
                            nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens)
                        ),
                        "norm2": nn.LayerNorm(dim),
                        "channel": nn.Sequential(
                            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
                        ),
                    }
                )
            )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        x = self.embed(x.reshape(x.shape[0], 10, 4))
        for m in self.mix:
            x = x + m["token"](m["norm1"](x).transpose(1, 2)).transpose(1, 2)
            x = x + m["channel"](m["norm2"](x))
        return self.head(self.norm(x).mean(1))


class HFStyle(nn.Module):
    """Returns a ModelOutput-like object: ``.logits``, and ``.loss`` when labels are given."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.classifier = nn.Linear(64, 10)

    def forward(self, x, labels=None):
        logits = self.classifier(self.body(x))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss, hidden_states=None)


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        out, _ = self.rnn(x.reshape(x.shape[0], 10, 4))
        return self.head(out[:, -1])


class ViTStyle(nn.Module):
    """Pre-norm Transformer encoder with a class token, as ViT."""

    def __init__(self, dim=32, depth=4):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 11, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x.reshape(x.shape[0], 10, 4))
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


def _mlp(depth, act, width=64, init=None):
    layers, features = [], 40
    for _ in range(depth):
        layers += [nn.Linear(features, width), act()]
        features = width
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    if init is not None:
        for m in model:
            if isinstance(m, nn.Linear):
                init(m)
    return model


# ----------------------------------------------------------- designs that train


@pytest.mark.parametrize("make", [ZeroInitResNet, ZeroHeadMixer, HFStyle, GRUClassifier, ViTStyle])
def test_third_party_designs_that_train_are_healthy(make):
    torch.manual_seed(0)
    model = make()
    x, y = _batch()
    d = diagnose(model, x, y)
    assert d.verdict is Verdict.HEALTHY, d.summary()
    assert d.remedies == []
    # and with a few steps of a sane optimizer
    d = diagnose(model, x, y, optimizer=torch.optim.Adam(model.parameters(), 1e-3), steps=10)
    assert d.verdict is Verdict.HEALTHY, d.summary()
    assert d.confidence == "high" and len(d.training.losses) == 11


def test_zero_parameters_are_gates_not_vanishing():
    torch.manual_seed(0)
    d = diagnose(ZeroHeadMixer(), *_batch())
    gates = [s for s in d.findings if "start at zero" in s]
    assert gates and "head.weight" in gates[0]
    assert not any(s.name == "zero_chain" and s.fired for s in d.signals)
    torch.manual_seed(0)
    d = diagnose(ZeroInitResNet(), *_batch())
    assert sum("blocks." in g for g in d.findings[1].split(", ")) >= 1
    silent = [layer.name for layer in d.layers if layer.grad_norm == 0]
    assert silent and all(n.startswith("blocks.") for n in silent)


def test_recurrent_weights_are_measured():
    torch.manual_seed(0)
    model = GRUClassifier()
    d = diagnose(model, *_batch())
    names = [layer.name for layer in d.layers]
    assert names == ["rnn", "head"]
    x, y = _batch()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    expected = (
        torch.cat([model.rnn.weight_ih_l0.grad.flatten(), model.rnn.weight_hh_l0.grad.flatten()])
        .double()
        .norm()
    )
    assert d.layers[0].grad_norm == pytest.approx(float(expected), rel=1e-9)
    assert d.grad_ratio == pytest.approx(d.layers[0].grad_norm / d.layers[1].grad_norm)


# ----------------------------------------------------------- designs that fail


def test_all_weights_at_zero_is_a_chain_of_zeros():
    torch.manual_seed(0)
    model = _mlp(6, nn.ReLU, init=lambda m: nn.init.zeros_(m.weight))
    d = diagnose(model, *_batch())
    assert d.verdict is Verdict.VANISHING
    assert any(s.name == "zero_chain" and s.fired for s in d.signals)
    assert any("Do not start every layer at zero" in r for r in d.remedies)


def test_weights_drawn_from_n01_are_exploding_by_the_loss_scale():
    torch.manual_seed(0)
    model = _mlp(8, nn.ReLU, init=lambda m: nn.init.normal_(m.weight))
    d = diagnose(model, *_batch())
    assert d.verdict is Verdict.EXPLODING and d.confidence == "high"
    fired = {s.name for s in d.fired}
    assert "loss_scale" in fired and "grad_ratio" not in fired  # uniform growth: ratio ~1
    assert any("variance-preserving" in r for r in d.remedies)
    assert not any("skip connections" in r for r in d.remedies)


def test_deep_sigmoid_stack_vanishes():
    torch.manual_seed(0)
    d = diagnose(_mlp(16, nn.Sigmoid), *_batch())
    assert d.verdict is Verdict.VANISHING and d.start_layer is not None


def test_a_stack_of_linear_layers_is_linear_and_one_layer_is_not_flagged():
    torch.manual_seed(0)
    x, y = _batch()
    stack = nn.Sequential(
        nn.Linear(40, 64), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 10)
    )
    d = diagnose(stack, x, y)
    assert d.verdict is Verdict.LINEAR
    assert next(s for s in d.signals if s.name == "affine").value < 1e-5
    assert any("nonlinearity" in r for r in d.remedies)
    assert diagnose(nn.Linear(40, 10), x, y).verdict is Verdict.HEALTHY


def test_learning_rate_far_too_large_or_small_needs_steps():
    torch.manual_seed(0)
    x, y = _batch()
    model = _mlp(4, nn.ReLU)
    assert diagnose(model, x, y).verdict is Verdict.HEALTHY  # at init nothing is wrong
    big = diagnose(model, x, y, optimizer=torch.optim.SGD(model.parameters(), lr=50.0), steps=10)
    assert big.verdict in (Verdict.NONFINITE, Verdict.EXPLODING)
    tiny = diagnose(model, x, y, optimizer=torch.optim.SGD(model.parameters(), lr=1e-8), steps=10)
    assert tiny.verdict is Verdict.STALLED
    assert any("Raise the learning rate" in r for r in tiny.remedies)


def test_steps_put_everything_back():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(40, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10)
    )
    x, y = _batch()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # the optimizer has state, the parameters have .grad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    opt_state = {
        k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
        for k, v in opt.state_dict()["state"].items()
    }
    rng = torch.get_rng_state()
    model.eval()
    d = diagnose(model, x, y, optimizer=opt, steps=5)
    assert len(d.training.losses) == 6 and d.training.losses[-1] < d.training.losses[0]
    assert not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    for k, v in opt.state_dict()["state"].items():
        assert all(
            torch.equal(vv, opt_state[k][kk]) if torch.is_tensor(vv) else vv == opt_state[k][kk]
            for kk, vv in v.items()
        )
    assert torch.equal(torch.get_rng_state(), rng)


def test_steps_arguments_are_checked():
    model = _mlp(2, nn.ReLU)
    x, y = _batch()
    with pytest.raises(UsageError, match="steps=5 needs optimizer="):
        diagnose(model, x, y, steps=5)
    with pytest.raises(UsageTypeError, match="optimizer must be a torch.optim.Optimizer"):
        diagnose(model, x, y, optimizer="adam")
    with pytest.raises(UsageError, match="steps"):
        diagnose(model, x, y, optimizer=torch.optim.SGD(model.parameters(), 0.1), steps=-1)


# ----------------------------------------------------------- any output


def test_any_output_shape_is_read():
    logits = torch.randn(4, 3)
    assert read_output(logits).logits is logits
    assert read_output((logits, torch.zeros(1))).logits is logits
    assert read_output(((logits, 1), None)).logits is logits
    assert read_output({"logits": logits}).logits is logits
    loss = torch.tensor(0.5)
    read = read_output(SimpleNamespace(logits=logits, loss=loss))
    assert read.logits is logits and read.loss is loss
    assert read_output({"loss": loss}).loss is loss
    with pytest.raises(UsageTypeError, match="loss_fn="):
        read_output("text")
    with pytest.raises(UsageTypeError, match="loss_fn="):
        read_output({"hidden": [1, 2]})


def test_model_loss_is_used_and_unreadable_output_names_loss_fn():
    torch.manual_seed(0)
    model = HFStyle()
    x, y = _batch()
    own = diagnose(model, (x, y))  # the model computes its loss from its labels
    ref = diagnose(model, x, y)
    assert own.loss == pytest.approx(ref.loss, rel=1e-6)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(40, 10)

        def forward(self, x):
            return {"embedding": [self.fc(x)]}

    with pytest.raises(UsageTypeError, match="loss_fn="):
        diagnose(Odd(), x, y)
    d = diagnose(
        Odd(), x, y, loss_fn=lambda out, t: nn.functional.cross_entropy(out["embedding"][0], t)
    )
    assert d.verdict is Verdict.HEALTHY


# ----------------------------------------------------------- the zoo

# The largest models of the zoo (ImageNet ResNets beyond 18 layers at 224x224, the
# 1000-layer CIFAR nets) take seconds each; resnet18 stands for the ImageNet family.
HEAVY = {
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet_imagenet",
    "plain18",
    "plain34",
    "resnet1202",
    "preact_resnet1001",
    "densenet_bc100",
}


@pytest.mark.parametrize("name", [n for n in list_models() if n not in HEAVY])
def test_diagnose_runs_on_the_zoo(name):
    torch.manual_seed(0)
    model = create_model(name)
    shape = model.example_input_shape
    if shape[-1] == 224:
        shape = (3, 64, 64)
    x = torch.randn(8, *shape)
    d = diagnose(model, x, torch.randint(0, 10, (8,)))
    assert d.verdict in set(Verdict) and d.layers and d.signals
    assert d.to_json()


# ----------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "lr, verdicts", [("1e-3", {"healthy"}), ("100", {"exploding", "non-finite"})]
)
def test_cli_steps_train_on_the_batch(capsys, lr, verdicts):
    import json

    from resnorm.cli import main

    argv = ["diagnose", "mlp", "--depth", "4", "--width", "32", "--steps", "10"]
    code = main([*argv, "--optimizer", "sgd", "--lr", lr, "--json", "--fail-on", "exploding"])
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["verdict"] in verdicts and len(data["training"]["losses"]) >= 2
    assert code == (1 if data["verdict"] == "exploding" else 0)
    assert main([*argv, "--optimizer", "rmsprop"]) == 2
    assert "--optimizer" in capsys.readouterr().err


# ----------------------------------------------------------- a run's Monitor records


def _records(losses, updates, dead=None):
    return [
        {
            "step": 5 * i,
            "loss": loss,
            "nonfinite": loss is None,
            "grad_norm": {"fc1": 1.0, "fc2": 1.0},
            "update_ratio": None if i == 0 else {"fc1": updates[0], "fc2": updates[1]},
            "dead_fraction": None if dead is None else {"relu": dead[i]},
        }
        for i, loss in enumerate(losses)
    ]


def test_analyze_judges_a_run_from_its_monitor_records(tmp_path):
    from resnorm.diagnostics import analyze

    healthy = analyze(_records([2.3, 1.9, 1.5, 1.2], (5e-3, 5e-3)))
    assert healthy.verdict is Verdict.HEALTHY and healthy.confidence == "high"
    # the Monitor's ratio covers the 5 steps between records: read per step
    assert healthy.training.updates[0] == [pytest.approx(1e-3)] * 3
    assert analyze(_records([2.3, 5.0, None, None], (1e-2, 1e-2))).verdict is Verdict.NONFINITE
    assert analyze(_records([2.3, 4.0, 9.0, 20.0], (0.2, 0.2))).verdict is Verdict.EXPLODING
    assert analyze(_records([2.3, 2.3, 2.3, 2.3], (1e-8, 1e-8))).verdict is Verdict.STALLED
    frozen = analyze(_records([2.3, 2.2, 2.1, 2.0], (1e-9, 5e-3)))
    assert frozen.verdict is Verdict.VANISHING
    dying = analyze(_records([2.3, 2.0, 1.8, 1.7], (5e-3, 5e-3), dead=[0.1, 0.4, 0.8, 0.9]))
    assert dying.verdict is Verdict.VANISHING
    assert any("Dead ReLU units rise from 10% to 90%" in f for f in dying.findings)

    spike = analyze(_records([2.3, 5e7, 2.3, 2.3, 2.3], (1e-8, 1e-8)))  # blew up, collapsed
    assert spike.verdict is Verdict.EXPLODING and any("peaking at" in f for f in spike.findings)
    nan = analyze(_records([2.3, None, None], (1e-2, 1e-2)))
    assert nan.verdict is Verdict.NONFINITE and any(
        "Lower the learning rate" in r for r in nan.remedies
    )
    unknown = _records([2.3, 2.0, 1.8], (1e-3, 1e-3))
    for record in unknown:
        record["loss"] = None  # a loop that did not hand the Monitor its loss
    assert analyze(unknown).verdict is Verdict.HEALTHY

    path = tmp_path / "monitor.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records([2.3, 2.0, 1.7], (1e-3, 1e-3))))
    assert analyze(tmp_path).verdict is Verdict.HEALTHY  # the run folder
    page = tmp_path / "page.html"
    analyze(path).write_html(page)
    assert page.read_text().count("data:image/png") == 1  # the loss and update heat map
    import matplotlib.pyplot as plt

    plt.close(analyze(path).figure(tmp_path / "run.png"))  # the same heat map, as a file
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")
    path.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(UsageError, match=r"monitor.jsonl:2: not a JSON record"):
        analyze(path)
    with pytest.raises(UsageError, match="2 Monitor records or more"):
        analyze(_records([2.3], (1e-3, 1e-3)))


def test_cli_judges_a_training_run(tmp_path, capsys):
    from resnorm.cli import main

    run = tmp_path / "run"
    argv = ["train", "--model", "mlp", "--depth", "2", "--width", "16", "--epochs", "1"]
    assert main([*argv, "--out", str(run), "--monitor-every", "5", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["diagnose", "--run", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] in {v.value for v in Verdict} and data["training"]["losses"]
    assert main(["diagnose", "mlp", "--run", str(run)]) == 2
    assert "give no MODEL" in capsys.readouterr().err
    assert main(["diagnose", "--run", str(tmp_path / "missing")]) != 0


class FixedBatchNet(nn.Module):
    """A model written for one batch size (``view(256, ...)``), with a zero head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)
        nn.init.zeros_(self.head.weight)

    def forward(self, x):
        return self.head(self.body(x).view(256, 32))


@pytest.mark.parametrize(
    "build",
    [
        lambda: ZeroHeadMixer(),
        lambda: _mlp(6, nn.ReLU, init=lambda m: nn.init.zeros_(m.weight)),
        lambda: FixedBatchNet(),
    ],
    ids=["zero-head", "all-zero", "fixed-batch"],
)
def test_gate_probe_on_part_of_the_batch_agrees_with_the_whole(monkeypatch, build):
    """The gate probe runs on the first PROBE_BATCH samples (the whole batch for a model
    that runs at its batch size only): the same layers stay silent as with all of them."""
    import resnorm.diagnostics.evidence as evidence

    x, y = _batch(n=256)
    found = []
    for probe in (evidence.PROBE_BATCH, 10**9):
        monkeypatch.setattr(evidence, "PROBE_BATCH", probe)
        torch.manual_seed(0)
        d = diagnose(build(), x, y)
        found.append((d.verdict, [s.name for s in d.fired], d.findings))
    assert found[0] == found[1]
    assert any("start at zero" in f for f in found[0][2])


def _growth(blocks):
    from resnorm.diagnostics.signals import Evidence, forward_signals
    from resnorm.diagnostics.verdict import Thresholds

    signals = forward_signals(blocks, 2.3, Thresholds(), Evidence())
    return next((s for s in signals if s.name == "activation_growth"), None)


def test_a_variance_at_the_rounding_level_is_reported_as_a_bound_not_a_number():
    from resnorm.diagnostics.diagnose import BlockStat
    from resnorm.diagnostics.stats import VARIANCE_RESOLUTION

    def block(sq_mean, var):
        return BlockStat("b", sq_mean, var, None, None, None)

    measured = _growth([block(1.0, 2e-3), block(1.0, 1e-6)])  # resolved: the ratio itself
    assert measured.value == pytest.approx(5e-4) and "(1.00e-06)" in measured.text
    # The last block's samples agree to rounding: its variance is rounding noise.
    collapsed = _growth([block(1.0, 2e-3), block(4.0, 3e-17)])
    bound = VARIANCE_RESOLUTION * (4.0 + 3e-17) / 2e-3
    assert collapsed.value == pytest.approx(bound) and not collapsed.fired
    assert "below" in collapsed.text and "3.00e-17" not in collapsed.text
    # A first block at the rounding level says nothing about growth.
    assert _growth([block(1.0, 1e-16), block(1.0, 1e-3)]) is None


def test_a_collapsed_plain_network_reads_the_same_with_and_without_the_kernel(monkeypatch):
    import importlib

    diagnose_module = importlib.import_module("resnorm.diagnostics.diagnose")
    torch.manual_seed(0)
    model = create_model("mlp", depth=48, residual=False, norm="none")
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    with_kernel = diagnose(model, x, y)
    monkeypatch.setattr(diagnose_module, "compiled_norms", lambda compiled: None)
    without = diagnose(model, x, y)
    assert with_kernel.verdict == without.verdict == Verdict.VANISHING
    assert with_kernel.findings == without.findings
