import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from stopping import StopAt
from torch import nn

from resnorm import create_model
from resnorm.data import DataSplit
from resnorm.train import (
    CheckpointDir,
    CheckpointError,
    TrainConfig,
    augment_images,
    evaluate,
    fit,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
)


def _blobs(n=400, classes=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    cut = n * 3 // 4
    return DataSplit("blobs", x[:cut], y[:cut], x[cut:], y[cut:], classes)


def _small_model(dropout=0.0):
    torch.manual_seed(1234)
    return create_model("mlp", in_features=8, num_classes=3, depth=2, width=16, dropout=dropout)


def _metrics(history):
    """Per-epoch metrics without the wall-clock column."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# ------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"epochs": 0}, ValueError),
        ({"batch_size": 0}, ValueError),
        ({"lr": 0.0}, ValueError),
        ({"weight_decay": -1.0}, ValueError),
        ({"epochs": 1.5}, TypeError),
        ({"optimizer": "adam"}, ValueError),
        ({"schedule": "linear"}, ValueError),
        ({"warmup_epochs": 30.0}, ValueError),
        ({"milestones": (0.5, 1.5)}, ValueError),
        ({"label_smoothing": 1.0}, ValueError),
        ({"device": "tpu"}, ValueError),
        ({"threads": 0}, ValueError),
        ({"checkpoint_every": 0}, ValueError),
    ],
)
def test_config_rejects_bad_values(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        TrainConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    config = TrainConfig(epochs=3, milestones=[0.3, 0.6], optimizer="sgd", nesterov=True)
    assert config.milestones == (0.3, 0.6)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="bogus"):
        TrainConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_schedule_warmup_cosine_and_step():
    model = nn.Linear(2, 2)
    lrs = {}
    for schedule in ("cosine", "step", "constant"):
        config = TrainConfig(
            epochs=4,
            lr=1.0,
            schedule=schedule,
            warmup_epochs=1.0,
            milestones=(0.5, 0.75),
            gamma=0.1,
        )
        optimizer = make_optimizer(model, config)
        scheduler = make_scheduler(optimizer, config, steps_per_epoch=10)
        seen = []
        for _ in range(40):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        lrs[schedule] = seen
    for schedule, seen in lrs.items():  # linear warm-up over the first epoch (10 steps)
        assert seen[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    cosine = lrs["cosine"]
    assert cosine[10] == pytest.approx(1.0) and cosine[25] == pytest.approx(0.5, abs=0.06)
    assert cosine[-1] < 0.01 and all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    step = lrs["step"]
    assert step[19] == pytest.approx(1.0) and step[20] == pytest.approx(0.1)
    assert step[29] == pytest.approx(0.1) and step[30] == pytest.approx(0.01)
    assert set(lrs["constant"][10:]) == {1.0}


def test_weight_decay_skips_one_dimensional_parameters():
    model = create_model("mlp", in_features=8, num_classes=3, depth=1, width=16)
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.05))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() <= 1 for p in plain["params"]) and plain["params"]
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------------ augmentation


def test_augment_crops_windows_of_the_padded_image_and_flips():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5) + 1
    out = augment_images(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):
        windows = [padded[n, :, i : i + 5, j : j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[n], w) or torch.equal(out[n], w.flip(-1)) for w in windows)
    again = augment_images(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    flips = augment_images(x.repeat(100, 1, 1, 1), 0, torch.Generator().manual_seed(1))
    flipped = sum(not torch.equal(a, b) for a, b in zip(flips, x.repeat(100, 1, 1, 1)))
    assert 60 < flipped < 140  # about half of 200


def test_augment_refuses_non_images():
    with pytest.raises(ValueError, match="augment=True needs image batches"):
        augment_images(torch.zeros(4, 40), 4, torch.Generator())


# ------------------------------------------------------------------------ training


def test_fit_learns_and_reports_every_epoch():
    result = fit(
        _small_model(), _blobs(), TrainConfig(epochs=4, batch_size=32, lr=1e-2), progress=False
    )
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert set(result.history[0]) == {
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "seconds",
    }
    assert result.final["test_acc"] > 0.9  # well-separated blobs; chance is 1/3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert not result.diverged and result.seconds > 0 and result.out is None


def test_fit_is_deterministic_for_a_seed():
    runs = []
    for _ in range(2):
        model = _small_model(dropout=0.2)
        runs.append(
            (
                model,
                fit(model, _blobs(), TrainConfig(epochs=2, batch_size=32, seed=7), progress=False),
            )
        )
    (m1, r1), (m2, r2) = runs
    assert _metrics(r1.history) == _metrics(r2.history)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


class _Explodes(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        return self.linear(x) * float("nan")


def test_divergence_stops_cleanly_and_is_recorded(tmp_path):
    result = fit(
        _Explodes(), _blobs(), TrainConfig(epochs=3, batch_size=50), out=tmp_path, progress=False
    )
    assert result.diverged and result.diverged_at_step == 1 and result.history == []
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "diverged" and saved["diverged_at_step"] == 1


def test_evaluate_restores_mode_and_matches_manual():
    data = _blobs()
    model = _small_model().train()
    loss, acc = evaluate(model, data.x_test, data.y_test, batch_size=7)
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(data.x_test)
    assert math.isclose(loss, nn.functional.cross_entropy(logits, data.y_test).item(), rel_tol=1e-5)
    assert acc == (logits.argmax(1) == data.y_test).sum().item() / len(data.y_test)


def test_fit_rejects_wrong_types():
    with pytest.raises(TypeError, match="TrainConfig"):
        fit(nn.Linear(8, 3), _blobs(), {"epochs": 1})
    with pytest.raises(TypeError, match="DataSplit"):
        fit(nn.Linear(8, 3), (torch.zeros(2, 8), torch.zeros(2)), TrainConfig())


def test_threads_are_restored_and_monitor_is_called():
    class Counter:
        def __init__(self):
            self.losses = []

        def step(self, loss):
            self.losses.append(loss.item())

    counter, before = Counter(), torch.get_num_threads()
    result = fit(
        _small_model(),
        _blobs(),
        TrainConfig(epochs=2, batch_size=100, threads=1),
        monitor=counter,
        progress=False,
    )
    assert torch.get_num_threads() == before
    assert len(counter.losses) == 2 * 3 and all(math.isfinite(v) for v in counter.losses)
    assert result.history[-1]["train_loss"] > 0


def test_augmented_amp_training_on_images_runs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    data = DataSplit("images", x[:48], y[:48], x[48:], y[48:], 4)
    torch.manual_seed(0)
    model = create_model("resnet_cifar", depth=8, num_classes=4, widths=(4, 8, 8))
    result = fit(
        model, data, TrainConfig(epochs=2, batch_size=16, augment=True, amp=True), progress=False
    )
    assert len(result.history) == 2 and math.isfinite(result.final["train_loss"])


# ------------------------------------------------------------------------ run directory


def test_run_directory_files(tmp_path):
    result = fit(
        _small_model(),
        _blobs(),
        TrainConfig(epochs=3, batch_size=32),
        out=tmp_path,
        progress=False,
        meta={"model": "mlp"},
    )
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "metrics.jsonl",
        "metrics.csv",
        "checkpoint.pt",
        "result.json",
    } <= names and not any(n.endswith(".tmp") for n in names)
    assert "checkpoint.prev.pt" not in names  # a finished run keeps one checkpoint
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == "mlp" and config["config"]["epochs"] == 3
    assert config["identity"]["model"] == "mlp" and config["identity"]["train"]["epochs"] == 3
    assert len(config["hash"]) == 10 and config["provenance"]["torch"] == torch.__version__
    assert {"command", "resnorm", "date", "machine"} <= set(config["provenance"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.history
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [1, 2, 3]
    assert [float(r["test_acc"]) for r in table] == [r["test_acc"] for r in result.history]
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "finished"
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 3


@pytest.mark.parametrize("stop_after", [7, 19, 20])  # mid-epoch, and around an epoch's end
def test_interrupted_run_resumes_to_the_same_weights_and_metrics(tmp_path, stop_after):
    config = TrainConfig(epochs=3, batch_size=16, checkpoint_every=4, seed=3)
    data = _blobs()
    reference = _small_model(dropout=0.2)
    expected = fit(reference, data, config, out=tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(
            _small_model(dropout=0.2),
            data,
            config,
            out=tmp_path / "b",
            progress=False,
            monitor=StopAt(stop_after),
        )
    resumed_model = _small_model(dropout=0.2)
    resumed = fit(resumed_model, data, config, out=tmp_path / "b", progress=False)
    assert resumed.resumed_from_step is not None and resumed.resumed_from_step <= stop_after
    assert _metrics(resumed.history) == _metrics(expected.history)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


def test_finished_run_is_not_trained_again(tmp_path):
    config = TrainConfig(epochs=2, batch_size=32)
    first_model = _small_model()
    first = fit(first_model, _blobs(), config, out=tmp_path, progress=False)
    second_model = _small_model()
    second = fit(second_model, _blobs(), config, out=tmp_path, progress=False)
    assert _metrics(second.history) == _metrics(first.history)
    for a, b in zip(first_model.parameters(), second_model.parameters()):
        assert torch.equal(a, b)


def test_resume_refuses_a_different_configuration(tmp_path):
    fit(
        _small_model(), _blobs(), TrainConfig(epochs=1, batch_size=32), out=tmp_path, progress=False
    )
    with pytest.raises(ValueError, match="different configuration"):
        fit(
            _small_model(),
            _blobs(),
            TrainConfig(epochs=2, batch_size=32),
            out=tmp_path,
            progress=False,
        )
    restarted = fit(
        _small_model(),
        _blobs(),
        TrainConfig(epochs=2, batch_size=32),
        out=tmp_path,
        progress=False,
        resume=False,
    )
    assert len(restarted.history) == 2


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    config = TrainConfig(epochs=3, batch_size=32)
    expected = fit(_small_model(), _blobs(), config, out=tmp_path / "ref", progress=False)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(_small_model(), _blobs(), config, out=run, progress=False, monitor=StopAt(22))
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="checkpoint.pt is corrupted or truncated"):
        load_checkpoint(run / "checkpoint.pt")
    with pytest.warns(UserWarning, match="previous good checkpoint"):
        resumed = fit(_small_model(), _blobs(), config, out=run, progress=False)
    assert _metrics(resumed.history) == _metrics(expected.history)
    assert (run / "checkpoint.pt.corrupt").exists()


def test_unusable_checkpoints_give_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint is left"):
        CheckpointDir(tmp_path).load()
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a resnorm checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.target}",))


def test_checkpoint_loading_cannot_run_code(tmp_path):
    _Payload.target = tmp_path / "pwned"
    torch.save({"format": "resnorm-checkpoint", "model": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


_CHILD = textwrap.dedent("""
    import json, sys, time, torch
    from torch import nn
    from resnorm import create_model
    from resnorm.data import DataSplit
    from resnorm.train import TrainConfig, fit

    out, slow = sys.argv[1], sys.argv[2] == "slow"
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, 8, generator=g)
    y = torch.randint(0, 3, (400,), generator=g)
    x = centers[y] + torch.randn(400, 8, generator=g)
    data = DataSplit("blobs", x[:300], y[:300], x[300:], y[300:], 3)

    class Slow(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
        def forward(self, x):
            if slow and self.training:
                time.sleep(0.02)
            return self.inner(x)

    torch.manual_seed(1234)
    model = Slow(create_model("mlp", in_features=8, num_classes=3, depth=2, width=16, dropout=0.2))
    result = fit(model, data, TrainConfig(epochs=4, batch_size=16, checkpoint_every=5, seed=5),
                 out=out, progress=False)
    torch.save(model.state_dict(), f"{out}/final_weights.pt")
    print(json.dumps({"resumed_from_step": result.resumed_from_step}))
""")


def test_sigkilled_run_resumes_exactly(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)

    def run(out, mode):
        return subprocess.run(
            [sys.executable, str(script), str(out), mode],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )

    run(tmp_path / "reference", "fast")
    killed_dir = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, str(script), str(killed_dir), "slow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (killed_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere after a checkpoint
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (killed_dir / "result.json").exists()  # it really died mid-run
    resumed = run(killed_dir, "fast")
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from_step"] > 0
    reference = torch.load(tmp_path / "reference" / "final_weights.pt", weights_only=True)
    weights = torch.load(killed_dir / "final_weights.pt", weights_only=True)
    assert reference.keys() == weights.keys()
    for name in reference:
        assert torch.equal(reference[name], weights[name]), name
    metrics = [
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in (killed_dir / "metrics.jsonl").read_text().splitlines()
    ]
    expected = [
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics == expected and len(metrics) == 4


def test_compiled_training_matches_eager():
    data = _blobs(n=256)
    losses = {}
    for compiled in (False, True):
        model = _small_model()
        result = fit(
            model, data, TrainConfig(epochs=2, batch_size=64, compile=compiled), progress=False
        )
        losses[compiled] = [row["train_loss"] for row in result.history]
    # Inductor may fuse reductions in another order: equal to float32 rounding over 2 epochs.
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
