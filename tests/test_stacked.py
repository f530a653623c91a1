"""Stacked training (resnorm.train.fit_stacked) against the same runs trained alone by fit:
the weights, running statistics, metrics and run folders agree, in float64 to 1e-12
(1e-6 with batch norm) and in float32 to 1e-4 after 24 steps; divergence, resume and the refusals."""

import dataclasses
import json
import warnings

import pytest
import torch
from stopping import StopAt
from torch import nn

from resnorm import create_model
from resnorm.data import DataSplit
from resnorm.errors import UsageError
from resnorm.lab import parse_study, run_study
from resnorm.lab import stacked as lab_stacked
from resnorm.lab.runner import plan_units, resolve_stack
from resnorm.train import (
    TrainConfig,
    fit,
    fit_stacked,
    load_checkpoint,
    stack_refusal,
    stacking_speedup,
)


def _blobs(dtype=torch.float64, n=256, classes=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (centers[y] + torch.randn(n, dim, generator=g)).to(dtype)
    cut = n * 3 // 4
    return DataSplit("blobs", x[:cut], y[:cut], x[cut:], y[cut:], classes)


def _model(seed, norm="batch", dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    options = {"in_features": 8, "num_classes": 3, "depth": 2, "width": 16, **kwargs}
    return create_model("mlp", norm=norm, **options).to(dtype)


# Three runs that differ in seed, learning rate and weight decay (and so in init and order).
CONFIGS = [
    TrainConfig(epochs=3, batch_size=32, seed=0, lr=3e-3),
    TrainConfig(epochs=3, batch_size=32, seed=1, lr=1e-2, weight_decay=0.1),
    TrainConfig(epochs=3, batch_size=32, seed=7, lr=1e-3, weight_decay=0.0),
]


def _relative_gap(a: nn.Module, b: nn.Module) -> float:
    gaps = [
        ((x - y).abs().max() / y.abs().max().clamp_min(1e-3)).item()
        for x, y in zip(a.state_dict().values(), b.state_dict().values())
        if x.is_floating_point()
    ]
    ints_equal = all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values())
        if not x.is_floating_point()
    )
    assert ints_equal  # num_batches_tracked: the same steps taken
    return max(gaps)


def _rows(result):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]


def _assert_rows_close(a, b, tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=tol, abs=tol), key


# Float64 bounds after 18 AdamW steps. Batch norm's: the gradient of a norm's shift is a
# sum over the batch that nearly cancels, and Adam divides it by its own running scale,
# so the last bits of the batched statistics grow to ~1e-7 of the shift.
@pytest.mark.parametrize("norm, tol", [("batch", 1e-6), ("layer", 1e-12), ("none", 1e-12)])
def test_stacked_runs_equal_the_runs_trained_alone_in_float64(norm, tol):
    data = _blobs()
    alone = []
    for config in CONFIGS:
        model = _model(config.seed, norm)
        alone.append((model, fit(model, data, config, progress=False)))
    models = [_model(c.seed, norm) for c in CONFIGS]
    results = fit_stacked(models, data, CONFIGS)
    for (solo, solo_result), model, result in zip(alone, models, results):
        assert _relative_gap(model, solo) < tol
        _assert_rows_close(_rows(result), _rows(solo_result), tol)
        assert not result.diverged
        assert (result.stacked_with, solo_result.stacked_with) == (3, 1)


def test_stacked_batch_norm_over_runs_equals_the_runs_trained_alone(monkeypatch):
    """With every stacked batch norm normalizing the runs as one (batch_norm_over_runs, the
    size threshold lowered to 0 for these small runs): float64 to 1e-6, as above."""
    from resnorm.norms import batch

    calls = []
    over_runs = batch.batch_norm_over_runs
    monkeypatch.setattr(batch, "OVER_RUNS_MIN_ELEMENTS", 0)
    monkeypatch.setattr(batch, "batch_norm_over_runs", lambda *a: calls.append(1) or over_runs(*a))
    data = _blobs()
    alone = []
    for config in CONFIGS:
        model = _model(config.seed, "batch")
        alone.append((model, fit(model, data, config, progress=False)))
    assert not calls  # fit does not use it
    models = [_model(c.seed, "batch") for c in CONFIGS]
    results = fit_stacked(models, data, CONFIGS)
    norms = sum(isinstance(m, batch.BatchNorm) for m in models[0].modules())
    assert norms > 0 and len(calls) == norms * 3 * 6  # each norm, 3 epochs of 6 steps
    for (solo, solo_result), model, result in zip(alone, models, results):
        assert _relative_gap(model, solo) < 1e-6
        _assert_rows_close(_rows(result), _rows(solo_result), 1e-6)


def _torch_norms_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (2, 4)),
        nn.Conv1d(2, 4, 3, padding=1),
        nn.BatchNorm1d(4),  # (N, C, L): over the runs
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 8),
        nn.BatchNorm1d(8),  # (N, C): torch's own vmap rule
        nn.ReLU(),
        nn.Linear(8, 3),
    ).double()


def test_torch_nn_batch_norms_with_positions_normalize_the_stacked_runs_as_one(monkeypatch):
    """A model of torch.nn layers: fit_stacked's copy converts its batch norms, and those
    with positions go through batch_norm_over_runs (threshold lowered to 0); the runs end
    as trained alone (float64, 1e-6 as above) and the user's models keep their classes."""
    from resnorm.norms import batch

    calls = []
    over_runs = batch.batch_norm_over_runs
    monkeypatch.setattr(batch, "OVER_RUNS_MIN_ELEMENTS", 0)
    monkeypatch.setattr(batch, "batch_norm_over_runs", lambda *a: calls.append(1) or over_runs(*a))
    data = _blobs()
    alone = [_torch_norms_model(c.seed) for c in CONFIGS]
    for model, config in zip(alone, CONFIGS):
        fit(model, data, config, progress=False)
    models = [_torch_norms_model(c.seed) for c in CONFIGS]
    results = fit_stacked(models, data, CONFIGS)
    assert len(calls) == 1 * 3 * 6  # the (N, C, L) norm only, 3 epochs of 6 steps
    assert [r.stacked_with for r in results] == [3, 3, 3]
    for model, solo in zip(models, alone):
        assert [type(m) for m in model] == [type(m) for m in solo]
        assert type(model[2]) is nn.BatchNorm1d
        assert _relative_gap(model, solo) < 1e-6


def _trained_float32(norm, configs, data, stacked):
    models = [_model(c.seed, norm, dtype=torch.float32) for c in configs]
    if stacked:
        fit_stacked(models, data, configs)
    else:
        for model, config in zip(models, configs):
            fit(model, data, config, progress=False)
    return models


def _logit_gap(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval(), b.eval()
    with torch.no_grad():
        return ((a(x) - b(x)).abs().max() / b(x).abs().max()).item()


@pytest.mark.parametrize("norm", ["layer", "none"])
def test_stacked_float32_agrees_to_1e_5_after_24_steps(norm):
    data = _blobs(torch.float32)
    configs = [dataclasses.replace(c, epochs=4) for c in CONFIGS]  # 6 steps an epoch
    alone = _trained_float32(norm, configs, data, stacked=False)
    for model, solo in zip(_trained_float32(norm, configs, data, stacked=True), alone):
        assert _relative_gap(model, solo) < 1e-5


def test_stacked_float32_batch_norm_differs_no_more_than_rounding_does():
    """With batch norm, float32 rounding alone moves a run: a norm's shift gets a gradient
    that nearly cancels, which Adam scales up. Training alone on inputs changed by one ulp
    gives the yardstick; the stacked runs stay within 10x of it (measured: about 1x)."""
    data = _blobs(torch.float32)
    configs = [dataclasses.replace(c, epochs=4) for c in CONFIGS]
    alone = _trained_float32("batch", configs, data, stacked=False)
    nudged = dataclasses.replace(data, x_train=data.x_train * (1 + 2**-23))
    yardstick = _trained_float32("batch", configs, nudged, stacked=False)
    stacked = _trained_float32("batch", configs, data, stacked=True)
    x = data.x_test
    for model, solo, other in zip(stacked, alone, yardstick):
        assert _logit_gap(model, solo, x) < 10 * max(_logit_gap(other, solo, x), 1e-6)


def test_a_diverging_run_stops_and_the_others_go_on(tmp_path):
    data = _blobs(torch.float32)
    too_large = TrainConfig(epochs=3, batch_size=32, seed=1, optimizer="sgd", lr=1e12)
    configs = [dataclasses.replace(too_large, seed=0, lr=1e-2), too_large]
    solo = [_model(c.seed, "none", torch.float32) for c in configs]
    solo_results = [fit(m, data, c, progress=False) for m, c in zip(solo, configs)]
    assert solo_results[1].diverged and not solo_results[0].diverged
    models = [_model(c.seed, "none", torch.float32) for c in configs]
    results = fit_stacked(models, data, configs, outs=[tmp_path / "a", tmp_path / "b"])
    assert results[1].diverged_at_step == solo_results[1].diverged_at_step
    assert results[1].diverged_in == solo_results[1].diverged_in
    assert not results[0].diverged
    assert _relative_gap(models[0], solo[0]) < 1e-5
    assert _relative_gap(models[1], solo[1]) < 1e-5  # the last finite weights
    assert json.loads((tmp_path / "b" / "result.json").read_text())["status"] == "diverged"


class _Stop(Exception):
    pass


def test_an_interrupted_stack_resumes_to_the_uninterrupted_result(tmp_path):
    data = _blobs()
    outs = [tmp_path / str(i) for i in range(3)]
    whole = [_model(c.seed) for c in CONFIGS]
    whole_results = fit_stacked(whole, data, CONFIGS)

    finished = []

    def stop_after_first_epoch_of_the_second_run(i, row):
        finished.append(i)
        if len(finished) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        fit_stacked(
            [_model(c.seed) for c in CONFIGS],
            data,
            CONFIGS,
            outs=outs,
            on_epoch=stop_after_first_epoch_of_the_second_run,
        )
    # Two runs checkpointed epoch 1 and the third did not: they resume from two positions.
    epochs = [
        load_checkpoint(out / "checkpoint.pt")["epoch"] if (out / "checkpoint.pt").exists() else 0
        for out in outs
    ]
    assert sorted(epochs) == [0, 1, 1] and epochs[finished[0]] == epochs[finished[1]] == 1
    resumed = [_model(c.seed) for c in CONFIGS]  # weights replaced by the checkpoints
    results = fit_stacked(resumed, data, CONFIGS, outs=outs)
    for model, result, reference, ref_result in zip(resumed, results, whole, whole_results):
        assert _relative_gap(model, reference) < 1e-6
        _assert_rows_close(_rows(result), _rows(ref_result), 1e-6)


def test_a_run_checkpointed_stacked_resumes_alone(tmp_path):
    data = _blobs()
    outs = [tmp_path / "a", tmp_path / "b"]

    def stop_after_first_epoch(i, row):
        if i == 1:
            raise _Stop

    with pytest.raises(_Stop):
        fit_stacked(
            [_model(c.seed) for c in CONFIGS[:2]],
            data,
            CONFIGS[:2],
            outs=outs,
            on_epoch=stop_after_first_epoch,
        )
    resumed = _model(CONFIGS[0].seed)
    result = fit(resumed, data, CONFIGS[0], out=outs[0], progress=False)
    assert result.resumed_from_step == 6  # 192 samples in batches of 32: one epoch
    alone = _model(CONFIGS[0].seed)
    alone_result = fit(alone, data, CONFIGS[0], progress=False)
    assert _relative_gap(resumed, alone) < 1e-6
    _assert_rows_close(_rows(result), _rows(alone_result), 1e-6)


def test_stack_refusal_names_what_differs():
    models = [_model(0), _model(1)]
    assert stack_refusal(models, CONFIGS[:2]) is None
    other_batch = [CONFIGS[0], dataclasses.replace(CONFIGS[1], batch_size=16)]
    assert "batch_size" in stack_refusal(models, other_batch)
    assert "structure" in stack_refusal([_model(0), _model(1, width=8)], CONFIGS[:2])
    dropout = [_model(0, dropout=0.5), _model(1, dropout=0.5)]
    assert "random" in stack_refusal(dropout, CONFIGS[:2])
    with pytest.raises(UsageError, match="batch_size"):
        fit_stacked(models, _blobs(), other_batch)
    with pytest.raises(UsageError, match="one config per model"):
        fit_stacked(models, _blobs(), CONFIGS)


def test_a_model_with_forward_hooks_is_not_stacked():
    """The stacked forward calls a skeleton of the model, so a hook on the model would see
    nothing: such runs are refused (and train alone in the lab), never silently unhooked."""
    models = [_model(0), _model(1)]
    handle = models[1].blocks[0].register_forward_hook(lambda *args: None)
    assert "forward hooks" in stack_refusal(models, CONFIGS[:2])
    handle.remove()
    models[0].register_forward_pre_hook(lambda *args: None)
    assert "forward hooks" in stack_refusal(models, CONFIGS[:2])


class _NormsMonitor:
    """Records the global gradient norm, and the loss, after every step."""

    def __init__(self, model):
        self.model, self.norms, self.losses = model, [], []

    def step(self, loss):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))
        self.losses.append(float(loss.detach()))


def test_each_stacked_run_s_monitor_sees_its_own_gradients_after_each_step():
    """fit_stacked calls run i's monitor as fit calls its monitor: after every step, with
    the run's loss and its parameters holding its gradients (float64: equal to 1e-10)."""
    data = _blobs()
    alone = []
    for config in CONFIGS:
        model = _model(config.seed, "layer")
        monitor = _NormsMonitor(model)
        fit(model, data, config, progress=False, monitor=monitor)
        alone.append(monitor)
    models = [_model(c.seed, "layer") for c in CONFIGS]
    monitors = [_NormsMonitor(m) for m in models]
    fit_stacked(models, data, CONFIGS, monitors=monitors)
    for stacked, solo in zip(monitors, alone):
        assert len(stacked.norms) == len(solo.norms) == 3 * 6
        assert stacked.norms == pytest.approx(solo.norms, rel=1e-10)
        assert stacked.losses == pytest.approx(solo.losses, rel=1e-10)
    assert len({id(m.norms) for m in monitors}) == 3
    with pytest.raises(UsageError, match="one out, meta and monitor per model"):
        fit_stacked(models, data, CONFIGS, monitors=monitors[:2])


class _Cube(torch.autograd.Function):
    """A custom autograd function without a vmap rule: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class _CubeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(_Cube.apply(self.fc1(x) / 4))


def _cube(seed):
    torch.manual_seed(seed)
    return _CubeNet().double()


def _cumulative_bn(seed):
    """torch's batch norm with momentum=None (a cumulative average): it reads its batch
    count as a Python number, which vmap cannot, after counting the batch in place."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=None), nn.ReLU(), nn.Linear(16, 3)
    ).double()


@pytest.mark.parametrize("build", [_cube, _cumulative_bn])
def test_a_model_vmap_cannot_batch_trains_alone_with_a_warning(build):
    """Found on the first step; the runs then train alone, as fit trains them. The failed
    step leaves no trace: with momentum=None it had counted a batch in every run's
    num_batches_tracked, which the runs trained alone must not start from."""
    data = _blobs()
    solo = [build(c.seed) for c in CONFIGS]
    for model, config in zip(solo, CONFIGS):
        fit(model, data, config, progress=False)
    models = [build(c.seed) for c in CONFIGS]
    with pytest.warns(UserWarning, match="not stacked"):
        results = fit_stacked(models, data, CONFIGS)
    assert [r.stacked_with for r in results] == [1, 1, 1]
    for model, alone in zip(models, solo):
        for (name, a), b in zip(model.state_dict().items(), alone.state_dict().values()):
            assert torch.equal(a, b), name


STUDY = """
name = "tiny"
dataset = "mnist1d"
seeds = 2
[dataset_options]
num_samples = 300
[train]
epochs = 1
[[grid]]
models = ["mlp"]
depths = [2]
norms = ["batch", "none"]
options = { width = 16 }
"""


def test_stacking_speedup_measures_and_is_zero_when_vmap_cannot_batch():
    data = _blobs()
    speedup = stacking_speedup([_model(c.seed) for c in CONFIGS], data, CONFIGS)
    assert 0.0 < speedup < 1e3
    assert stacking_speedup([_cube(c.seed) for c in CONFIGS], data, CONFIGS) == 0.0


def test_the_lab_stacks_the_seeds_of_a_grid_point_and_agrees_with_no_stack(tmp_path, monkeypatch):
    study = parse_study(STUDY)
    units = plan_units(study.runs(), study)
    assert [[s.seed for s in unit] for unit in units] == [[0, 1], [0, 1]]
    assert all(len(u) == 1 for u in plan_units(study.runs(), study, stack=False))
    trained_stacked = []
    monkeypatch.setattr(
        lab_stacked,
        "_train_stacked",
        lambda *a, _real=lab_stacked._train_stacked: trained_stacked.append(1) or _real(*a),
    )
    stacked = run_study(study, tmp_path / "s", workers=1, progress=False, stack=True)
    assert len(trained_stacked) == 2
    assert [r["stacked_with"] for r in stacked] == [2, 2, 2, 2]
    alone = run_study(study, tmp_path / "a", workers=1, progress=False, stack=False)
    for s, a in zip(stacked, alone):
        assert (s["run_id"], s["status"]) == (a["run_id"], "finished")
        assert s["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-4)
    again = run_study(study, tmp_path / "s", workers=1, progress=False, stack=True)
    assert all(r["reused"] for r in again)


def test_the_lab_stacks_on_cuda_and_not_on_the_cpu_unless_asked(tmp_path, monkeypatch):
    assert resolve_stack(None, "cpu") is False
    assert resolve_stack(True, "cpu") is True and resolve_stack(False, "cpu") is False
    if torch.cuda.is_available():
        assert resolve_stack(None, "cuda") is True
    study = parse_study(STUDY)
    monkeypatch.setattr(lab_stacked, "_train_stacked", None)  # would raise if called
    default = run_study(study, tmp_path / "d", workers=1, progress=False)
    alone = run_study(study, tmp_path / "a", workers=1, progress=False, stack=False)
    for d, a in zip(default, alone):
        assert d["status"] == "finished" and d["stacked_with"] == a["stacked_with"] == 1
        assert d["final_train_loss"] == a["final_train_loss"]  # the same code, alone


def test_the_cli_no_stack_flag_trains_alone_and_says_so(tmp_path, monkeypatch):
    from resnorm.cli import main

    study = tmp_path / "tiny.toml"
    study.write_text(STUDY)
    monkeypatch.setattr(lab_stacked, "_train_stacked", None)  # would raise if called
    out = tmp_path / "lab"
    code = main(["lab", str(study), "--no-stack", "--workers", "1", "-q", "--out", str(out)])
    assert code == 0
    made = json.loads((tmp_path / "lab" / "lab.json").read_text())["provenance"]
    assert made["stack"] is False
    assert len(list((tmp_path / "lab" / "runs").iterdir())) == 4


# ---------------------------------------------------------------- the stacked optimizer
OPTIMIZER_CASES = {
    "adamw": {},
    "adamw, clipped": {"grad_clip": 0.5},
    "sgd, nesterov": {"optimizer": "sgd", "lr": 0.05, "nesterov": True},
    "sgd, no momentum": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0},
}


def _trained_runs(configs, data, tmp_path, tag):
    models = [_model(c.seed, "layer", torch.float32) for c in configs]
    outs = [tmp_path / tag / str(i) for i in range(len(configs))]
    results = fit_stacked(models, data, configs, outs=outs)
    states = [load_checkpoint(out / "checkpoint.pt") for out in outs]
    return models, results, states


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in _tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_the_stacked_optimizer_steps_bitwise_as_each_run_s_own(case, tmp_path, monkeypatch):
    """Runs of two learning rates, interleaved (four runs): their optimizers stepped as one
    (StackedOptimizer, one call per learning rate) give, in float32, bitwise the weights,
    metrics and checkpointed optimizer and scheduler states of the same runs whose
    optimizers are stepped one by one, through warm-up and cosine decay."""
    from resnorm.train import stacked_optim

    data = _blobs(torch.float32)
    base = TrainConfig(epochs=2, batch_size=32, weight_decay=0.05, **OPTIMIZER_CASES[case])
    configs = [
        dataclasses.replace(base, seed=seed, lr=base.lr * factor)
        for seed, factor in [(0, 1.0), (1, 3.0), (2, 1.0), (3, 3.0)]
    ]
    calls = []
    step = stacked_optim.StackedOptimizer.step
    monkeypatch.setattr(
        stacked_optim.StackedOptimizer, "step", lambda self: calls.append(self.rows) or step(self)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the schedulers' order check does not fire
        together = _trained_runs(configs, data, tmp_path, "together")
    assert len(calls) == 2 * 6  # every step, of the two groups of rows
    assert calls[0] == [slice(0, 2), slice(2, 4)]
    monkeypatch.setattr(stacked_optim.StackedOptimizer, "build", lambda *args: None)
    one_by_one = _trained_runs(configs, data, tmp_path, "one by one")
    for a, b in zip(together[0], one_by_one[0]):
        assert all(
            torch.equal(x, y) for x, y in zip(_tensors(a.state_dict()), _tensors(b.state_dict()))
        )
    for a, b in zip(together[1], one_by_one[1]):
        assert _rows(a) == _rows(b)
    for a, b in zip(together[2], one_by_one[2]):
        for key in ("optimizer", "scheduler"):
            x, y = _tensors(a[key]), _tensors(b[key])
            assert len(x) == len(y)
            assert x or key == "scheduler" or base.momentum == 0  # states to compare
            assert all(torch.equal(u, v) for u, v in zip(x, y))
        assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 12
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def test_the_stacked_optimizer_takes_only_what_it_steps_exactly():
    """build() says None (the runs are stepped one by one) for optimizers make_optimizer
    does not build, and for runs whose states are at different steps."""
    from resnorm.train.stacked_optim import StackedOptimizer

    models = [_model(s, "none", torch.float32) for s in range(2)]
    params = [dict(m.named_parameters()) for m in models]
    stacked = {n: torch.stack([p[n].detach() for p in params]) for n in params[0]}
    adam = [torch.optim.Adam(m.parameters(), fused=True) for m in models]
    assert StackedOptimizer.build(adam, params, stacked) is None
    unfused = [torch.optim.AdamW(m.parameters()) for m in models]
    assert StackedOptimizer.build(unfused, params, stacked) is None
    fused = [torch.optim.AdamW(m.parameters(), fused=True) for m in models]
    assert StackedOptimizer.build(fused, params, stacked) is not None
    loss = models[0](torch.randn(4, 8)).sum()
    loss.backward()
    fused[0].step()  # run 0 one step ahead of run 1
    assert StackedOptimizer.build(fused, params, stacked) is None


class _TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_stacked_runs_crop_and_flip_each_its_own_images_as_alone():
    """With augmentation, each stacked run crops and flips its batch with its own draws
    (its seed and step), as fit does: float64 weights equal to 1e-12."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (96,), generator=g)
    data = DataSplit("images", x[:64], y[:64], x[64:], y[64:], 3)
    configs = [dataclasses.replace(c, epochs=2, augment=True, crop_padding=2) for c in CONFIGS]

    def models():
        out = []
        for c in configs:
            torch.manual_seed(c.seed)
            out.append(_TinyConvNet().double())
        return out

    alone = models()
    for model, config in zip(alone, configs):
        fit(model, data, config, progress=False)
    stacked = models()
    fit_stacked(stacked, data, configs)
    plain = models()  # without augmentation the runs would end elsewhere
    fit_stacked(plain, data, [dataclasses.replace(c, augment=False) for c in configs])
    for a, s, p in zip(alone, stacked, plain):
        assert _relative_gap(s, a) < 1e-12
        assert _relative_gap(p, a) > 1e-3


def test_mid_epoch_checkpoints_of_the_stacked_optimizer_resume_bitwise(tmp_path):
    """checkpoint_every hands the stacked optimizer's state back to each run's optimizer,
    saves it and stacks it again: training with checkpoints every 4 steps gives bitwise
    the weights of training without, and a stack stopped at step 9 resumes from its
    step-8 checkpoint to them too (float32, AdamW, two learning rates)."""
    data = _blobs(torch.float32)
    configs = [dataclasses.replace(c, epochs=2, weight_decay=0.05) for c in CONFIGS[:2]]
    configs.append(dataclasses.replace(configs[0], seed=5))  # two runs share a rate

    def models():
        return [_model(c.seed, "layer", torch.float32) for c in configs]

    plain = models()
    fit_stacked(plain, data, configs)
    every = [dataclasses.replace(c, checkpoint_every=4) for c in configs]
    checkpointed = models()
    outs = [tmp_path / "whole" / str(i) for i in range(3)]
    fit_stacked(checkpointed, data, every, outs=outs)
    outs = [tmp_path / "stopped" / str(i) for i in range(3)]
    with pytest.raises(_Stop):
        fit_stacked(models(), data, every, outs=outs, monitors=[None, StopAt(9, _Stop), None])
    assert load_checkpoint(outs[0] / "checkpoint.pt")["global_step"] == 8
    resumed = models()
    results = fit_stacked(resumed, data, every, outs=outs)
    assert all(r.resumed_from_step == 8 for r in results)
    for a, b, c in zip(plain, checkpointed, resumed):
        for x, y, z in zip(
            _tensors(a.state_dict()), _tensors(b.state_dict()), _tensors(c.state_dict())
        ):
            assert torch.equal(x, y) and torch.equal(x, z)
