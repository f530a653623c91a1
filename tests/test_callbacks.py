"""The Monitor's training-framework callbacks, run with the real Lightning and transformers
Trainers where those install (they are optional extras: the tests skip without them), and
the error that names the package to install when one is missing (always runs)."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from resnorm.diagnostics import Verdict, hf_callback, lightning_callback
from resnorm.diagnostics import callbacks as callbacks_module
from resnorm.diagnostics.callbacks import _scalar_loss
from resnorm.errors import MissingExtraError

STEPS = 20


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _data(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return x, y


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


# --- Lightning ---------------------------------------------------------------------------


def _lightning_run(package, tmp_path, lr, capsys=None, **options):
    pl = pytest.importorskip(package if package == "pytorch_lightning" else "lightning.pytorch")

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=16)
    callback = lightning_callback(package=package, **options)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(Classifier(), loader)
    return callback


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_lightning_healthy_run(package, tmp_path, capsys):
    callback = _lightning_run(package, tmp_path, lr=0.1, every=2)
    records = _records(tmp_path / "monitor.jsonl")  # the default: the trainer's log_dir
    assert [r["step"] for r in records] == list(range(2, STEPS + 1, 2))
    assert all(isinstance(r["loss"], float) for r in records)
    assert callback.diagnosis.verdict == "healthy"
    assert callback.monitor.records == records
    err = capsys.readouterr().err
    assert f"resnorm Monitor, step {STEPS}: healthy" in err and "remedy" not in err


def test_lightning_absurd_lr_is_not_healthy(tmp_path, capsys):
    path = tmp_path / "run" / "m.jsonl"
    callback = _lightning_run("lightning", tmp_path, lr=1e3, path=path, analyze_every=10)
    assert len(_records(path)) == STEPS
    assert callback.diagnosis.verdict in ("exploding", "non-finite")
    err = capsys.readouterr().err
    assert "resnorm Monitor, step 10:" in err  # analyze_every
    assert f"resnorm Monitor, step {STEPS}: {callback.diagnosis.verdict}" in err
    _assert_remedies_reported(callback, err)


def _assert_remedies_reported(callback, err):
    # A verdict that is not healthy comes with its remedies, one a line.
    for remedy in callback.diagnosis.remedies:
        assert f"\n  remedy: {remedy}" in err
    callback.diagnosis.remedies = ["Lower the learning rate."]
    report = callback._report(STEPS).splitlines()
    assert report[1:] == ["  remedy: Lower the learning rate."]


def test_lightning_accumulated_batches_record_per_optimizer_step(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return {"loss": nn.functional.cross_entropy(self.net(x), y)}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=16)
    callback = lightning_callback(verbose=False)
    pl.Trainer(
        max_steps=5,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    ).fit(Classifier(), loader)
    records = _records(tmp_path / "monitor.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["grad_norm"]["net.0"] > 0 for r in records)  # read before zero_grad


# --- Hugging Face transformers ---------------------------------------------------------


class _HFModel(nn.Module):
    """A model as the Trainer takes one: keyword inputs, a dict output with "loss"."""

    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class _Dataset(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_run(tmp_path, lr, optim="sgd", accumulate=1, **options):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulate,
        learning_rate=lr,
        optim=optim,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    callback = hf_callback(**options)
    trainer = transformers.Trainer(
        model=_HFModel(), args=args, train_dataset=_Dataset(), callbacks=[callback]
    )
    trainer.train()
    return callback, trainer


def test_hf_healthy_run(tmp_path, capsys):
    callback, trainer = _hf_run(tmp_path, lr=0.1, every=2)
    records = _records(tmp_path / "monitor.jsonl")  # the default: args.output_dir
    assert [r["step"] for r in records] == list(range(2, STEPS + 1, 2))
    # The loss recorded is the one the Trainer logged for that step.
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    for r in records:
        assert r["loss"] == pytest.approx(logged[r["step"]], rel=1e-3, abs=1e-4)
        assert r["grad_norm"]["net.0"] > 0  # read before the Trainer zeroes the gradients
    assert callback.diagnosis.verdict == "healthy"
    err = capsys.readouterr().err
    assert f"resnorm Monitor, step {STEPS}: healthy" in err and "remedy" not in err


def test_hf_absurd_lr_is_not_healthy(tmp_path, capsys):
    callback, _ = _hf_run(tmp_path, lr=1e3, analyze_every=10)
    assert len(_records(tmp_path / "monitor.jsonl")) == STEPS
    assert callback.diagnosis.verdict in ("exploding", "non-finite")
    err = capsys.readouterr().err
    assert "resnorm Monitor, step 10:" in err
    _assert_remedies_reported(callback, err)


def test_hf_accumulated_micro_batches_average_the_loss(tmp_path):
    callback, trainer = _hf_run(tmp_path, lr=0.1, accumulate=2, verbose=False)
    records = callback.monitor.records
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    for r in records:
        assert r["loss"] == pytest.approx(logged[r["step"]], rel=1e-3, abs=1e-4)


def test_hf_loss_computed_by_the_trainer_is_not_read_as_non_finite(tmp_path, capsys):
    """With compute_loss_func the model returns no loss: the records hold none, and no
    verdict is made from them (a missing loss is not a non-finite one)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=8,
        learning_rate=0.1,
        optim="sgd",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    callback = hf_callback()
    transformers.Trainer(
        model=_HFModel(),
        args=args,
        train_dataset=_Dataset(),
        compute_loss_func=lambda out, labels, **_: nn.functional.cross_entropy(
            out["logits"], labels
        ),
        callbacks=[callback],
    ).train()
    records = _records(tmp_path / "monitor.jsonl")
    assert len(records) == 5 and all(r["loss"] is None and not r["nonfinite"] for r in records)
    # judged from the update ratios alone: no loss is not a NaN loss
    assert callback.diagnosis.verdict is Verdict.HEALTHY
    assert callback.diagnosis.training.losses == []
    assert not any(s.name == "loss_rise" for s in callback.diagnosis.signals)
    assert "resnorm Monitor, step 5: healthy" in capsys.readouterr().err


# --- without the libraries ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make, module, install",
    [
        (lightning_callback, "lightning", "pip install lightning"),
        (
            lambda: lightning_callback(package="pytorch_lightning"),
            "pytorch_lightning",
            "pip install pytorch_lightning",
        ),
        (hf_callback, "transformers", "pip install transformers accelerate"),
    ],
)
def test_missing_library_names_the_install(make, module, install, monkeypatch):
    # None in sys.modules makes an import fail, as when the package is not installed.
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)
    for cached in (callbacks_module._lightning_class, callbacks_module._hf_class):
        cached.cache_clear()
    try:
        with pytest.raises(MissingExtraError, match=install):
            make()
    finally:
        monkeypatch.undo()
        for cached in (callbacks_module._lightning_class, callbacks_module._hf_class):
            cached.cache_clear()


def test_bad_options():
    with pytest.raises(ValueError, match="package"):
        lightning_callback(package="keras")


@pytest.mark.parametrize(
    "output, expected",
    [
        (torch.tensor(2.0), 2.0),
        ({"loss": torch.tensor(3.0), "logits": torch.zeros(2, 3)}, 3.0),
        ((torch.tensor(4.0), torch.zeros(2, 3)), 4.0),
        ({"logits": torch.zeros(2, 3)}, None),
        ((torch.zeros(2, 3),), None),
        (None, None),
    ],
)
def test_scalar_loss(output, expected):
    loss = _scalar_loss(output)
    assert (None if loss is None else float(loss)) == expected


def test_import_resnorm_needs_neither_library():
    code = (
        "import sys, resnorm, resnorm.diagnostics.callbacks\n"
        "loaded = {'lightning', 'pytorch_lightning', 'transformers', 'accelerate'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
