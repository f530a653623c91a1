"""A run is its whole configuration, and every fault ends in one line with nothing lost:
run identity and folders, checkpoints that are empty, foreign or corrupted, a kill between
the last checkpoint and its metrics, NaN at evaluation, a full disk, the lab's reuse rules
and exit status, and the CLI's usage-error/bug split."""

import errno
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from resnorm import UsageError
from resnorm.cli import main
from resnorm.data import DataSplit
from resnorm.lab import parse_study, run_lab, run_study
from resnorm.lab.study import StudyError
from resnorm.train import (
    CheckpointError,
    RunMismatchError,
    TrainConfig,
    fit,
    load_checkpoint,
    prepare_run,
    train_named,
)
from resnorm.train.loop import RunFiles


def _blobs(n=240, classes=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    cut = n * 3 // 4
    return DataSplit("blobs", x[:cut], y[:cut], x[cut:], y[cut:], classes)


def _model():
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _rows(path):
    return [
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in path.read_text().splitlines()
    ]


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


CONFIG = TrainConfig(epochs=3, batch_size=30, seed=2, checkpoint_every=2)


# ------------------------------------------------------------------ a run is its configuration


def test_another_model_in_the_same_folder_is_refused_naming_what_differs(tmp_path):
    data = _blobs()
    train_named(
        "mlp",
        "synthetic",
        model_options={"depth": 2, "width": 8},
        dataset_options={"shape": 8, "train_samples": 64, "test_samples": 32},
        config=TrainConfig(epochs=1, batch_size=16),
        out=tmp_path,
    )
    # The plain twin has the very same parameters: only the recorded options tell them apart.
    with pytest.raises(RunMismatchError, match=r"model_options.residual: true -> false.*--restart"):
        train_named(
            "mlp",
            "synthetic",
            model_options={"depth": 2, "width": 8, "residual": False},
            dataset_options={"shape": 8, "train_samples": 64, "test_samples": 32},
            config=TrainConfig(epochs=1, batch_size=16),
            out=tmp_path,
        )
    with pytest.raises(RunMismatchError, match=r"train.epochs: 1 -> 2"):
        train_named(
            "mlp",
            "synthetic",
            model_options={"depth": 2, "width": 8},
            dataset_options={"shape": 8, "train_samples": 64, "test_samples": 32},
            config=TrainConfig(epochs=2, batch_size=16),
            out=tmp_path,
        )
    with pytest.raises(RunMismatchError, match=r"dataset_options.train_samples: 64 -> 80"):
        train_named(
            "mlp",
            "synthetic",
            model_options={"depth": 2, "width": 8},
            dataset_options={"shape": 8, "train_samples": 80, "test_samples": 32},
            config=TrainConfig(epochs=1, batch_size=16),
            out=tmp_path,
        )
    # A raw fit of another model: only its structure differs.
    fit(_model(), data, TrainConfig(epochs=1, batch_size=16), out=tmp_path / "raw", progress=False)
    with pytest.raises(RunMismatchError, match=r"\(model_structure: \S+ -> \S+\)"):
        fit(
            nn.Linear(8, 3),
            data,
            TrainConfig(epochs=1, batch_size=16),
            out=tmp_path / "raw",
            progress=False,
        )


def test_cli_rerun_with_plain_into_the_same_folder_is_one_line_exit_2(tmp_path, capsys):
    common = [
        "train",
        "--model",
        "mlp",
        "--dataset",
        "digits",
        "--depth",
        "1",
        "--width",
        "8",
        "--epochs",
        "1",
        "--quiet",
        "--out",
        tmp_path / "run",
    ]
    code, out, err = _cli(capsys, *common)
    assert code == 0, err
    code, out, err = _cli(capsys, *common, "--plain")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "model_options.residual: true -> false" in err
    assert "--restart" in err and "another --out" in err and "Traceback" not in err
    code, out, err = _cli(capsys, *common, "--plain", "--restart")
    assert code == 0 and "final test accuracy" in out


def test_default_folders_differ_by_configuration_and_match_for_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = {"shape": 8, "train_samples": 64, "test_samples": 32}

    def folder(**model_options):
        return prepare_run(
            "mlp",
            "synthetic",
            model_options={"depth": 1, "width": 8, **model_options},
            dataset_options=options,
            config=TrainConfig(epochs=1),
        ).out

    residual, plain, again = folder(), folder(residual=False), folder()
    assert residual == again and residual != plain
    assert residual.parent.name == "runs" and residual.name.startswith("mlp-synthetic-seed0-")
    assert folder(norm="layer") not in (residual, plain)


def test_sync_bn_without_batch_norm_is_one_rule(tmp_path):
    with pytest.raises(UsageError, match="has no batch norm"):
        prepare_run(
            "mlp",
            "synthetic",
            model_options={"norm": "layer", "depth": 1, "width": 8},
            dataset_options={"shape": 8, "train_samples": 64, "test_samples": 32},
            config=TrainConfig(sync_bn=True),
            out=tmp_path,
        )


# ------------------------------------------------------------------ checkpoints


def _interrupted(tmp_path, steps=9):
    """A run stopped mid-way (its second epoch), and the reference run uninterrupted."""
    reference = fit(_model(), _blobs(), CONFIG, out=tmp_path / "ref", progress=False)

    class Stop:
        seen = 0

        def step(self, loss):
            Stop.seen += 1
            if Stop.seen == steps:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), _blobs(), CONFIG, out=tmp_path / "run", progress=False, monitor=Stop())
    return reference, tmp_path / "run"


def test_empty_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    reference, run = _interrupted(tmp_path)
    assert (run / "checkpoint.prev.pt").exists()
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(run / "checkpoint.pt")
    with pytest.warns(UserWarning, match="previous good checkpoint"):
        resumed = fit(_model(), _blobs(), CONFIG, out=run, progress=False)
    assert _rows(run / "metrics.jsonl") == _rows(tmp_path / "ref" / "metrics.jsonl")
    assert [r["test_acc"] for r in resumed.history] == [r["test_acc"] for r in reference.history]


def test_flipped_byte_inside_a_tensor_is_detected_by_the_checksum(tmp_path):
    fit(_model(), _blobs(), TrainConfig(epochs=1, batch_size=30), out=tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    weight = state["model"]["0.weight"]
    raw = path.read_bytes()
    needle = weight.contiguous().view(torch.uint8).numpy().tobytes()[:64]
    at = raw.find(needle)
    assert at > 0  # the tensor's bytes are stored as they are
    corrupted = bytearray(raw)
    corrupted[at + 5] ^= 0x10
    path.write_bytes(bytes(corrupted))
    # torch.load itself reads the changed value without complaint ...
    changed = torch.load(path, weights_only=True)["model"]["0.weight"]
    assert not torch.equal(changed, weight)
    # ... the checksum does not.
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_checkpoint(path)


def test_a_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
    other = tmp_path / "other"
    fit(
        nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)),
        _blobs(),
        TrainConfig(epochs=2, batch_size=30),
        out=other,
        progress=False,
    )
    run = tmp_path / "run"
    fit(_model(), _blobs(), TrainConfig(epochs=1, batch_size=30), out=run, progress=False)
    # Foreign checkpoint copied over (with its identity): refused by identity.
    shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")
    with pytest.raises(RunMismatchError, match="model_structure"):
        fit(_model(), _blobs(), TrainConfig(epochs=2, batch_size=30), out=run, progress=False)
    # A version-1 checkpoint (no identity) of another model: one line, not a state-dict dump.
    state = load_checkpoint(other / "checkpoint.pt")
    for key in ("identity", "checksum"):
        state.pop(key)
    state["version"] = 1
    torch.save(state, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="weights of another model") as info:
        fit(_model(), _blobs(), TrainConfig(epochs=2, batch_size=30), out=run, progress=False)
    assert "\n" not in str(info.value)


def test_kill_between_the_last_checkpoint_and_its_metrics_loses_no_row(tmp_path, monkeypatch):
    reference = fit(_model(), _blobs(), CONFIG, out=tmp_path / "ref", progress=False)
    real = RunFiles.write_metrics

    def killed_at_the_end(self, history):
        if len(history) == CONFIG.epochs:
            raise KeyboardInterrupt  # the final checkpoint is renamed, its rows are not written
        real(self, history)

    monkeypatch.setattr(RunFiles, "write_metrics", killed_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), _blobs(), CONFIG, out=tmp_path / "run", progress=False)
    assert len(_rows(tmp_path / "run" / "metrics.jsonl")) == CONFIG.epochs - 1
    monkeypatch.setattr(RunFiles, "write_metrics", real)
    again = fit(_model(), _blobs(), CONFIG, out=tmp_path / "run", progress=False)
    assert again.resumed_from_step is not None
    assert _rows(tmp_path / "run" / "metrics.jsonl") == _rows(tmp_path / "ref" / "metrics.jsonl")
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == CONFIG.epochs + 1
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "finished"
    assert [r["test_acc"] for r in again.history] == [r["test_acc"] for r in reference.history]


def test_a_complete_pending_checkpoint_is_put_in_place_and_temporaries_removed(tmp_path):
    reference, run = _interrupted(tmp_path)
    # A kill after the new checkpoint was written whole but before it was renamed.
    shutil.copy(run / "checkpoint.pt", run / "checkpoint.pt.new")
    shutil.copy(run / "checkpoint.prev.pt", run / "checkpoint.pt")
    (run / ".metrics.jsonl.abcd.tmp").write_text("half a file")
    resumed = fit(_model(), _blobs(), CONFIG, out=run, progress=False)
    names = {p.name for p in run.iterdir()}
    assert "checkpoint.pt.new" not in names and not any(n.endswith(".tmp") for n in names)
    assert "checkpoint.prev.pt" not in names  # finished: one checkpoint kept
    assert _rows(run / "metrics.jsonl") == _rows(tmp_path / "ref" / "metrics.jsonl")
    assert resumed.resumed_from_step == 8


def test_full_disk_keeps_the_last_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    _, run = _interrupted(tmp_path)
    before = (run / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoint.pt.new"))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        fit(_model(), _blobs(), CONFIG, out=run, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())
    assert load_checkpoint(run / "checkpoint.pt")["global_step"] > 0
    monkeypatch.setattr(torch, "save", real_save)
    # The CLI's line for it: one line, exit 1, no traceback.
    monkeypatch.setattr(
        "resnorm.cli.cli.main",
        lambda **_: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoint.pt.new")
        ),
    )
    code, out, err = _cli(capsys, "train", "--model", "mlp")
    assert (
        code == 1 and err == "resnorm: error: No space left on device: runs/x/checkpoint.pt.new\n"
    )


# ------------------------------------------------------------------ divergence at evaluation


class _NanAtEval(nn.Module):
    """Trains fine; its evaluation-mode output is NaN (as running statistics gone to inf)."""

    def __init__(self):
        super().__init__()
        self.net = _model()

    def forward(self, x):
        y = self.net(x)
        return y if self.training else y * float("nan")


def test_nan_first_seen_at_evaluation_is_recorded_as_diverged(tmp_path):
    torch.manual_seed(0)
    result = fit(_NanAtEval(), _blobs(), CONFIG, out=tmp_path, progress=False)
    assert result.diverged and result.diverged_in == "eval" and len(result.history) == 1
    assert math.isnan(result.history[0]["test_loss"])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "diverged" and saved["diverged_in"] == "eval"
    assert saved["final"]["test_loss"] is None  # strict JSON: null
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["test_loss"] is None
    again = fit(_NanAtEval(), _blobs(), CONFIG, out=tmp_path, progress=False)
    assert again.diverged and len(again.history) == 1  # a result, not trained again


# ------------------------------------------------------------------ the lab

STUDY = """
name = "tiny"
dataset = "synthetic"
[dataset_options]
shape = 8
train_samples = 64
test_samples = 32
[train]
epochs = 1
[[grid]]
models = ["mlp"]
depths = [1, 2]
norms = ["batch"]
residual = [true]
batch_sizes = [16]
options = { width = 8 }
"""


def test_editing_the_study_reruns_exactly_the_runs_it_changes(tmp_path):
    first = run_study(parse_study(STUDY), tmp_path, workers=1, progress=False)
    assert [r["status"] for r in first] == ["finished", "finished"]
    same = run_study(parse_study(STUDY), tmp_path, workers=1, progress=False)
    assert all(r["reused"] for r in same)
    three = STUDY.replace("epochs = 1", "epochs = 3")
    edited = run_study(parse_study(three), tmp_path, workers=1, progress=False)
    assert not any(r.get("reused") for r in edited)
    assert [len(r["history"]) for r in edited] == [3, 3]
    deeper = three.replace("depths = [1, 2]", "depths = [1, 2, 3]")
    grown = run_study(parse_study(deeper), tmp_path, workers=1, progress=False)
    assert [bool(r.get("reused")) for r in grown] == [True, True, False]


@pytest.mark.parametrize(
    "edit, fragment",
    [
        ('name = "tiny"', 'name = "../escape"'),
        ('name = "tiny"', 'name = "a/b"'),
        ("test_samples = 32", "test_samples = 32\nnum_samples = 5"),
    ],
)
def test_study_names_and_dataset_options_are_checked_when_loaded(edit, fragment):
    with pytest.raises(StudyError):
        parse_study(STUDY.replace(edit, fragment))


def test_lab_checks_device_and_data_before_anything_runs(tmp_path, capsys):
    study = tmp_path / "tiny.toml"
    study.write_text(STUDY)
    out = tmp_path / "lab"
    code, _, err = _cli(capsys, "lab", study, "--device", "cuda:0", "--out", out, "--quiet")
    if not torch.cuda.is_available():
        assert code == 2 and err.count("\n") == 1 and "cuda" in err.lower()
        assert not out.exists()
    code, _, err = _cli(
        capsys,
        "lab",
        "cifar10-resnet",
        "--quick",
        "--data-root",
        tmp_path / "nowhere",
        "--out",
        out,
        "--quiet",
    )
    assert code == 2 and err.count("\n") == 1 and "nowhere" in err and not out.exists()
    bad = tmp_path / "bad.toml"
    bad.write_text(STUDY.replace("train_samples = 64", "train_samples = -1"))
    code, _, err = _cli(capsys, "lab", bad, "--out", out, "--quiet")
    assert code == 2 and err.count("\n") == 1 and "train_samples" in err and not out.exists()


def test_lab_exits_1_when_a_run_failed_and_0_for_diverged(tmp_path, capsys):
    failing = tmp_path / "failing.toml"
    failing.write_text(STUDY.replace('norms = ["batch"]', 'norms = ["batch", "instance"]'))
    code, out, err = _cli(capsys, "lab", failing, "--out", tmp_path / "a", "--workers", "1")
    assert code == 1 and "2 of 4 runs failed" in err and "error.txt" in err
    assert "2 finished, 0 diverged, 2 failed" in out
    assert (tmp_path / "a" / "report.html").exists()
    diverging = tmp_path / "diverging.toml"
    diverging.write_text(
        STUDY.replace("epochs = 1", "epochs = 1\nlr = 1e30").replace(
            'norms = ["batch"]', 'norms = ["none"]'
        )
    )
    code, out, err = _cli(capsys, "lab", diverging, "--out", tmp_path / "b", "--workers", "1")
    assert code == 0 and "0 finished, 2 diverged, 0 failed" in out, err
    code, out, err = _cli(capsys, "lab", diverging, "--out", tmp_path / "b", "--workers", "1")
    assert code == 0 and "2 reused, 0 run now" in out


def test_quick_report_says_it_is_a_smoke_run_and_records_provenance(tmp_path):
    result = run_lab("init", tmp_path, quick=True, workers=1, progress=False)
    html = (tmp_path / "report.html").read_text()
    assert "smoke run (--quick), no conclusions" in html
    made = json.loads((tmp_path / "lab.json").read_text())
    assert made["study"]["quick"] is True and made["study"]["grid"]
    assert {"command", "resnorm", "torch", "date", "machine"} <= set(made["provenance"])
    assert "How this report was made" in html
    assert result.counts["runs"] == len(result.results)


# ------------------------------------------------------------------ usage errors vs bugs


def test_a_bug_is_not_a_usage_error(monkeypatch, capsys):
    def broken(**_):
        raise ValueError("an internal invariant broke")  # not a UsageError: a bug

    monkeypatch.setattr("resnorm.cli.cli.main", broken)
    code, out, err = _cli(capsys, "models")
    assert code == 1 and "Traceback" in err and "bug in resnorm" in err
    assert "an internal invariant broke" in err


def test_usage_errors_keep_their_builtin_types():
    from resnorm.errors import MissingFileError, UsageTypeError

    assert issubclass(UsageError, ValueError) and issubclass(UsageTypeError, TypeError)
    assert issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(StudyError, UsageError) and issubclass(CheckpointError, UsageError)
    with pytest.raises(UsageTypeError):
        TrainConfig(epochs=1.5)


def test_python_m_resnorm_bug_exit_status(tmp_path):
    """The real entry point: a usage error is exit 2 and one line."""
    proc = subprocess.run(
        [sys.executable, "-m", "resnorm", "train", "--model", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "unknown model 'nope'" in proc.stderr


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--model", "mlp", "--lr", "inf"], "lr must be a finite number, got inf"),
        (["train", "--model", "mlp", "--weight-decay", "inf"], "weight_decay must be a finite"),
        (["train", "--model", "mlp", "--depth", "99999999999"], "1<=x<=10000"),
        (["diagnose", "mlp", "--depth", "99999999999"], "1<=x<=10000"),
    ],
)
def test_more_bad_numbers_are_one_line(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and fragment in err
    assert list(tmp_path.iterdir()) == []


def test_run_lab_bounds_the_number_of_runs_of_a_study_object(tmp_path):
    with pytest.raises(UsageError, match="at most"):
        run_lab(parse_study(STUDY), tmp_path, seeds=10**7, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_atomic_write_names_its_file_and_keeps_the_old_one(tmp_path):
    from resnorm._io import atomic_open

    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")
    with pytest.raises(OSError) as info:
        with atomic_open(target, "w") as f:
            f.write("new")
            raise OSError(errno.ENOSPC, "No space left on device")  # as a full disk says it
    assert info.value.filename == str(target) and info.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_provenance_names_the_command_the_user_typed(monkeypatch):
    from resnorm.train.run import command_line

    monkeypatch.delenv("RESNORM_COMMAND", raising=False)
    monkeypatch.setattr(sys, "argv", ["/x/lib/resnorm/__main__.py", "train", "--out", "a b"])
    assert command_line() == "python -m resnorm train --out 'a b'"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/resnorm", "lab", "--quick"])
    assert command_line() == "resnorm lab --quick"
    monkeypatch.setenv("RESNORM_COMMAND", "resnorm train --nproc 2")  # set by the launcher
    assert command_line() == "resnorm train --nproc 2"


def test_provenance_names_the_cpu_and_the_kernels_torch_uses(monkeypatch):
    """The CPU and torch's vector instructions decide the rounding of a run, so a result
    on the edge of a verdict can be traced to the machine that made it."""
    import builtins

    from resnorm.train.run import cpu_model, provenance

    machine = provenance("cpu")["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["cpu"] == cpu_model() and machine["cpu"]
    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr("platform.processor", lambda: "")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert cpu_model() == "x86_64"
