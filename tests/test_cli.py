import json
import subprocess
import sys

import pytest

from resnorm.cli import main
from resnorm.demo import DemoRun, run_demo, summarize


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_json_lists_and_counts(capsys):
    code, out, _ = _run(capsys, "models", "resnet2*", "--params", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert code == 0 and set(rows) == {"resnet20"}
    assert rows["resnet20"]["parameters"] == 269_722


def test_models_table(capsys):
    code, out, _ = _run(capsys, "models", "seed*")
    assert code == 0 and "seed_mlp" in out and "Keras" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["demo", "--depths", "a,b"], "--depths"),
        (["demo", "--depths", "0"], "--depths"),
        (["demo", "--epochs", "0"], "--epochs"),
        (["models", "no-such-model*"], "no model matches"),
        (["frobnicate"], "No such command"),
        (["demo", "--bogus"], "--bogus"),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(capsys, argv, fragment):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("resnorm: error:") and fragment in err


def test_help_and_version(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "demo" in out and "models" in out
    code, out, _ = _run(capsys)
    assert code == 0 and "Commands" in out
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and "0.1.0" in out


def test_module_entry_point_runs():
    done = subprocess.run(
        [sys.executable, "-m", "resnorm", "demo", "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--epochs" in done.stderr


def test_demo_json_small(capsys):
    code, out, _ = _run(
        capsys,
        "demo",
        "--depths",
        "1,2",
        "--epochs",
        "1",
        "--samples",
        "300",
        "--width",
        "16",
        "--json",
    )
    report = json.loads(out)
    assert code == 0 and len(report["runs"]) == 4
    assert {(r["depth"], r["residual"]) for r in report["runs"]} == {
        (1, True),
        (1, False),
        (2, True),
        (2, False),
    }
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in report["runs"])
    # A plain twin has exactly the parameters of its residual network.
    by_key = {(r["depth"], r["residual"]): r["parameters"] for r in report["runs"]}
    assert by_key[1, True] == by_key[1, False] and by_key[2, True] == by_key[2, False]
    assert len(report["summary"]) == 4


def test_summary_sentences_follow_the_numbers():
    runs = [
        DemoRun(1, True, 10, 0.80, 0.1, 1.0, False),
        DemoRun(1, False, 10, 0.75, 0.1, 1.0, False),
        DemoRun(8, True, 20, 0.82, 0.1, 1.0, False),
        DemoRun(8, False, 20, 0.30, 2.0, 1.0, False),
    ]
    lines = summarize(runs)
    assert lines[0] == (
        "At 1 block the residual MLP beats its plain twin by 5.0 points of "
        "test accuracy (80.0% vs 75.0%)."
    )
    assert "plain MLP loses 45.0 points" in lines[2]
    assert "residual MLP gains 2.0 points" in lines[3]


@pytest.mark.slow
def test_seed_model_reaches_published_mlp_accuracy_on_mnist1d():
    # Published: an MLP reaches 68% on the 4,000-example MNIST-1D; with 8,000 examples the
    # seed texts' residual MLP should do at least as well.
    runs = run_demo(depths=(1,), epochs=10, progress=False)
    residual = next(r for r in runs if r.residual)
    assert residual.test_acc >= 0.68


def test_train_runs_resumes_and_writes_its_files(capsys, tmp_path):
    argv = [
        "train",
        "--model",
        "mlp",
        "--depth",
        "2",
        "--width",
        "16",
        "--dataset",
        "synthetic",
        "--epochs",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--json",
    ]
    code, out, _ = _run(capsys, *argv)
    first = json.loads(out)
    assert code == 0 and first["status"] == "finished" and first["epochs_completed"] == 2
    assert first["out"] == str(tmp_path / "run")
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "result.json"):
        assert (tmp_path / "run" / name).exists(), name
    code, out, _ = _run(capsys, *argv)  # the same command again: nothing retrained
    again = json.loads(out)
    assert code == 0 and again["resumed_from_step"] is not None
    assert [r["test_acc"] for r in again["history"]] == [r["test_acc"] for r in first["history"]]
    changed = list(argv)
    changed[changed.index("--epochs") + 1] = "3"
    code, out, err = _run(capsys, *changed)
    assert code == 2 and "different configuration" in err  # same folder, other settings


def test_train_digits_with_a_conv_net_fills_sizes_from_the_data(capsys, tmp_path):
    code, out, err = _run(
        capsys,
        "train",
        "--model",
        "resnet_cifar",
        "--depth",
        "8",
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
        "--quiet",
    )
    assert code == 0 and "final test accuracy" in out and "metrics.csv" in out
    assert err == ""  # --quiet: nothing on stderr


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--model", "nope"], "unknown model 'nope'"),
        (["train", "--model", "mlp", "--dataset", "nope"], "nope"),
        (["train", "--model", "mlp", "--dataset", "digits", "--data-root", "/tmp"], "root"),
        (
            ["train", "--model", "mlp", "--dataset", "cifar10", "--data-root", "/nonexistent/x"],
            "cifar-10-python.tar.gz",
        ),
        (["train", "--model", "mlp", "--lr", "-1"], "--lr"),
        (["train", "--model", "mlp", "--warmup-epochs", "50"], "warmup_epochs"),
        (["train", "--model", "resnet56", "--depth", "20"], "fixes depth=56"),
    ],
)
def test_train_bad_input_one_line_exit_2(capsys, argv, fragment):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("resnorm: error:") and fragment in err
