import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from resnorm.lab import StudyError, load_study, parse_study, plan_workers, run_study
from resnorm.lab.study import BUILTIN

BASE = """
name = "tiny"
dataset = "synthetic"
[dataset_options]
shape = [8]
num_classes = 3
train_samples = 96
test_samples = 32
[train]
epochs = 1
"""


def _study(grid: str, extra: str = "") -> str:
    """BASE with ``extra`` top-level keys (before BASE's tables) or tables (after them)."""
    return BASE + extra + grid if extra.startswith("[") else extra + BASE + grid


GRID = """
[[grid]]
models = ["mlp"]
depths = [1, 2]
norms = ["batch", "none"]
residual = [true, false]
batch_sizes = [32]
options = { width = 8 }
"""


@pytest.mark.parametrize(
    "text, message",
    [
        ("name = ", "not valid TOML"),
        ("bogus = 1\n" + BASE + GRID, "unknown key(s) bogus"),
        ('dataset = "synthetic"\n' + GRID, "missing required key 'name'"),
        (
            BASE.replace('dataset = "synthetic"', 'dataset = "nope"') + GRID,
            "unknown dataset 'nope'",
        ),
        ('x = "width"\n' + BASE + GRID, "x='width' is not supported"),
        (_study(GRID.replace('"mlp"', '"nope"')), "unknown model 'nope'"),
        (_study(GRID.replace('"mlp"', '"resnet20"')), "fixed depth"),
        (_study(GRID.replace("width = 8", "colour = 8")), "takes no option(s) colour"),
        (_study(GRID.replace('"none"', '"weird"')), "unknown norm 'weird'"),
        (_study(GRID.replace("[1, 2]", "[0, 2]")), "depths must be a non-empty list of integers"),
        (_study(GRID.replace("[true, false]", "[]")), "residual must be a non-empty list"),
        (_study(GRID).replace("epochs = 1", "epochs = 0"), r"\[train\]: epochs must be"),
        (_study(GRID).replace("epochs = 1", "batch_size = 4"), "must not set batch_size"),
        (_study(GRID, "[quick]\nfast = true\n"), r"\[quick\]: unknown key\(s\) fast"),
        (_study(GRID.replace("models", "modles")), "unknown key(s) modles"),
        ("grid = []\n" + BASE, "at least one table"),
    ],
)
def test_study_validation_errors(text, message):
    with pytest.raises(StudyError) as info:
        parse_study(text, "t.toml")
    assert message in str(info.value) or re.search(message, str(info.value))
    assert "t.toml" in str(info.value)


def test_grid_expansion_is_the_product_in_a_stable_order():
    study = parse_study(_study(GRID), "t.toml")
    runs = study.runs()
    assert len(runs) == 2 * 2 * 2  # depths x norms x residual (placement fixed, one seed)
    assert len({r.run_id for r in runs}) == len(runs)
    assert [r.run_id for r in runs] == [r.run_id for r in study.runs()]
    assert runs[0].run_id == "mlp-d1-batch-res-post-width8-b32-s0"
    assert runs[0].variant == "mlp, residual, batch norm"
    assert len(study.runs(seeds=3)) == 24 and {r.seed for r in study.runs(seeds=3)} == {0, 1, 2}


def test_quick_version_uses_quick_lists_and_settings():
    text = _study(
        GRID.replace("options", "quick_depths = [1]\noptions"),
        "[quick]\ntrain = { epochs = 1 }\ndataset_options = { train_samples = 50 }\n",
    )
    quick = parse_study(text).quick_version()
    assert {r.depth for r in quick.runs()} == {1}
    assert quick.dataset_options["train_samples"] == 50 and quick.seeds == 1


def test_builtin_studies_parse():
    for name in BUILTIN:
        study = load_study(name)
        assert study.runs() and study.quick_version().runs()
    with pytest.raises(StudyError, match="neither a built-in study"):
        load_study("no-such-study")


def test_plan_workers_uses_the_cores_without_oversubscribing():
    assert plan_workers(10, cores=2) == (2, 1)
    assert plan_workers(1, cores=2) == (1, 2)
    assert plan_workers(10, workers=1, cores=4) == (1, 4)
    assert plan_workers(3, workers=8, cores=16) == (3, 5)


def test_init_only_study_reuses_finished_runs(tmp_path):
    text = _study(GRID, "init_only = true\n")
    study = parse_study(text)
    results = run_study(study, tmp_path, workers=1, progress=False)
    assert [r["status"] for r in results] == ["finished"] * 8
    assert all(r["init"]["verdict"] in ("healthy", "vanishing", "exploding") for r in results)
    assert all(r["history"] == [] for r in results)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/summary.json")}
    again = run_study(study, tmp_path, workers=1, progress=False)
    assert [{k: v for k, v in r.items() if k != "reused"} for r in again] == results
    assert all(r["reused"] for r in again) and not any("reused" in r for r in results)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/summary.json")} == stamps


def test_failed_and_diverged_runs_are_recorded_and_the_others_go_on(tmp_path):
    grid = GRID.replace('norms = ["batch", "none"]', 'norms = ["none", "instance"]')
    study = parse_study(_study(grid).replace("epochs = 1", "epochs = 1\nlr = 1e30"))
    results = run_study(study, tmp_path, workers=1, progress=False)
    by_norm = {}
    for r in results:
        by_norm.setdefault(r["norm"], []).append(r)
    # Instance norm needs positions to normalize over; (N, C) features have none.
    assert all(r["status"] == "failed" and "UsageError" in r["error"] for r in by_norm["instance"])
    assert all(
        (tmp_path / "runs" / r["run_id"] / "error.txt").exists() for r in by_norm["instance"]
    )
    assert all(r["status"] == "diverged" and r["diverged_at_step"] for r in by_norm["none"])


_CHILD = textwrap.dedent("""
    import sys
    from resnorm.lab import parse_study, run_study
    if __name__ == "__main__":  # worker processes are spawned: they import this module
        study = parse_study(open(sys.argv[1]).read())
        run_study(study, sys.argv[2], workers=2, progress=False)
""")


def test_killed_lab_resumes_and_keeps_finished_runs(tmp_path):
    grid = GRID.replace("depths = [1, 2]", "depths = [1, 2, 3]")
    text = _study(grid).replace("epochs = 1", "epochs = 30")
    (tmp_path / "study.toml").write_text(text)
    (tmp_path / "child.py").write_text(_CHILD)
    out = tmp_path / "lab"
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "study.toml"), str(out)],
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while len(list(out.glob("runs/*/summary.json"))) < 2 and time.monotonic() < deadline:
        assert child.poll() is None, "the lab process ended before it could be killed"
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # the lab and its workers
    child.wait(timeout=30)
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert 2 <= len(finished) < 12
    results = run_study(parse_study(text), out, workers=1, progress=False)
    assert len(results) == 12 and all(r["status"] in ("finished", "diverged") for r in results)
    for path, stamp in finished.items():
        assert path.stat().st_mtime_ns == stamp  # not run again
    assert all(
        json.loads(p.read_text())["status"] != "failed" for p in out.glob("runs/*/summary.json")
    )


def _write_cifar10(folder, per_batch=8):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def test_cifar10_resnet_study_quick_runs_on_official_format_files(tmp_path, capsys):
    from resnorm.cli import main

    _write_cifar10(tmp_path / "data" / "cifar-10-batches-py")
    code = main(
        [
            "lab",
            "cifar10-resnet",
            "--quick",
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "lab"),
            "--workers",
            "1",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and (tmp_path / "lab" / "report.html").exists()
    assert {r["depth"] for r in report["results"]} == {8}
    assert {r["status"] for r in report["results"]} == {"finished"}
    assert {r["residual"] for r in report["results"]} == {True, False}
    assert all(len(r["history"]) == 1 for r in report["results"])


def test_lab_report_table_matches_results_for_a_quick_lab(tmp_path):
    from resnorm.lab import run_lab

    result = run_lab("init", tmp_path, quick=True, workers=1, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["run_id"] for r in saved] == [r["run_id"] for r in result.results]
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2
    for run in saved:
        assert run["run_id"] in html
