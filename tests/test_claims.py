"""The claims study: its protocol, statistics, measurements, learning-rate choice, the
whole pipeline on a tiny protocol (with resume) and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from resnorm.blocks.residual import ResidualAdd
from resnorm.cli import main
from resnorm.lab.claims import load_protocol, parse_protocol, run_claims
from resnorm.lab.claims.engine import choose, judge
from resnorm.lab.claims.experiments import EXPERIMENTS
from resnorm.lab.claims.jobs import _branch_ratio, _GradNorms
from resnorm.lab.claims.measures import _gaps, _spread, _steps_to
from resnorm.lab.claims.models import NoisyBatchNorm, NormStack, SequenceGRU, build_model
from resnorm.lab.claims.stats import combine, mean_interval, paired, verdict
from resnorm.lab.study import StudyError

TINY = """
name = "tiny"
dataset = "mnist1d"
[sizes.default]
seeds = 2
num_samples = 400
epochs = 2
batch_size = 64
lrs = [1e-3, 1e-2]
val_fraction = 0.2
[sizes.quick]
seeds = 1
num_samples = 400
epochs = 1
batch_size = 64
lrs = [1e-2]
val_fraction = 0.2
[[claim]]
id = "9"
title = "Batch norm before the activation"
seeds = ["000"]
quote = "Use batch normalization ... before activation functions."
experiment = "order"
[[claim.criterion]]
what = "before minus after"
effect = "before.test_acc - after.test_acc"
holds_if = "> 0"
unit = "points"
"""


def test_the_built_in_protocol_has_the_fourteen_claims_and_valid_rules():
    protocol = load_protocol()
    ids = [c.id for c in protocol.claims if c.kind == "claim"]
    assert ids == [str(i) for i in range(1, 15)]
    assert {"default", "quick", "full"} <= set(protocol.sizes)
    for claim in protocol.claims:
        outputs = EXPERIMENTS[claim.experiment].outputs
        for criterion in claim.criteria:
            assert criterion.direction in "<>" and math.isfinite(criterion.margin)
            for group, metric in criterion.terms:
                assert metric in outputs[group]
    # the depth claim goes to >= 100 layers at the default size
    assert max(protocol.sizes["default"].of("depth")["depths"]) >= 100
    assert protocol.sizes["default"].seeds >= 3


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (('experiment = "order"', 'experiment = "nope"'), "unknown experiment 'nope'"),
        (
            ('effect = "before.test_acc - after.test_acc"', 'effect = "before.acc"'),
            "measures no before.acc",
        ),
        (
            ('effect = "before.test_acc - after.test_acc"', 'effect = "x + y"'),
            "must be 'group.metric'",
        ),
        (('holds_if = "> 0"', 'holds_if = ">= 0"'), "holds_if='>= 0'"),
        (("[sizes.quick]", "[sizes.fast]"), "[sizes.quick] is required"),
        (("seeds = 2", "seeds = 0"), "seeds must be >= 1"),
        (('dataset = "mnist1d"', 'dataset = "digits"'), "dataset='digits' is not supported"),
        (
            ("val_fraction = 0.2\n[sizes.quick]", "val_fraction = 0.7\n[sizes.quick]"),
            "val_fraction",
        ),
        (("lrs = [1e-3, 1e-2]", "lrs = []"), "lrs must be a non-empty list"),
    ],
)
def test_a_bad_protocol_is_refused_naming_what_is_wrong(edit, fragment):
    text = TINY.replace(*edit)
    assert text != TINY
    with pytest.raises(StudyError, match=None) as info:
        parse_protocol(text, "tiny.toml")
    assert fragment in str(info.value) and "tiny.toml" in str(info.value)


def test_an_override_for_an_unknown_setting_is_refused():
    text = TINY.replace(
        "[sizes.quick]", "[sizes.default.experiments]\norder = { depths = [2] }\n[sizes.quick]"
    )
    with pytest.raises(StudyError, match="experiments.order: unknown key.s. depths"):
        parse_protocol(text)


def test_mean_interval_is_the_student_t_interval():
    got = mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert got["n"] == 3 and got["mean"] == pytest.approx(2.0)
    assert got["low"] == pytest.approx(2.0 - half, rel=1e-9)
    assert got["high"] == pytest.approx(2.0 + half, rel=1e-9)
    assert mean_interval([5.0, None, float("nan")]) == {
        "n": 1,
        "mean": 5.0,
        "low": None,
        "high": None,
    }
    assert mean_interval([])["mean"] is None
    assert paired([3.0, None, 1.0], [1.0, 2.0, 4.0]) == [2.0, None, -3.0]


@pytest.mark.parametrize(
    "low, high, direction, margin, expected",
    [
        (0.5, 2.0, ">", 0.0, "supported"),
        (-2.0, -0.5, ">", 0.0, "not supported"),
        (-0.5, 2.0, ">", 0.0, "inconclusive"),
        (1.0, 3.0, ">", 2.0, "inconclusive"),
        (-2.0, -0.5, "<", 0.0, "supported"),
        (0.5, 2.0, "<", 0.0, "not supported"),
        (-3.0, -1.5, "<", -1.0, "supported"),
        (None, None, ">", 0.0, "not judged"),
    ],
)
def test_verdict_rules(low, high, direction, margin, expected):
    assert verdict({"low": low, "high": high}, direction, margin) == expected


def test_a_claim_is_supported_only_when_every_criterion_is():
    assert combine(["supported", "supported"]) == "supported"
    assert combine(["supported", "inconclusive"]) == "inconclusive"
    assert combine(["supported", "not supported", "inconclusive"]) == "not supported"
    assert combine(["supported", "not judged"]) == "not judged"


def test_judge_pairs_the_effect_by_seed():
    claim = parse_protocol(TINY).claims[0]
    groups = {"before": {"test_acc": [60.0, 62.0, 61.0]}, "after": {"test_acc": [50.0, 53.0, 51.0]}}
    judged = judge(claim, groups)
    (criterion,) = judged["criteria"]
    assert criterion["values"] == [10.0, 9.0, 10.0]
    assert criterion["mean"] == pytest.approx(29 / 3)
    assert judged["verdict"] == "supported"


def _record(val_acc, diverged=False):
    return {"status": "finished", "val_acc": val_acc, "diverged": diverged, "test_acc": val_acc}


def test_the_learning_rate_is_chosen_on_validation_accuracy_never_a_diverged_run():
    variant = EXPERIMENTS["order"].variants({})[0]
    jobs = {lr: [f"{lr}-{s}" for s in range(2)] for lr in (1e-3, 1e-2, 1e-1)}

    class J(str):
        key = property(lambda self: str(self))

    planned = {
        "order": {variant.name: (variant, {lr: [J(k) for k in ks] for lr, ks in jobs.items()})}
    }
    records = {
        "0.001-0": _record(0.5), "0.001-1": _record(0.5),
        "0.01-0": _record(0.7), "0.01-1": _record(0.6),
        "0.1-0": _record(0.95, diverged=True), "0.1-1": _record(0.9),
    }  # fmt: skip
    chosen = choose(planned, records)["order"][variant.name]
    assert chosen["lr"] == 1e-2 and [r["val_acc"] for r in chosen["runs"]] == [0.7, 0.6]
    records["0.001-0"] = records["0.001-1"] = _record(0.65)  # a tie: the smaller rate
    assert choose(planned, records)["order"][variant.name]["lr"] == 1e-3
    records["0.001-1"] = {"status": "failed", "error": "boom"}  # a failed run has no value
    chosen = choose(planned, records)["order"][variant.name]
    assert chosen["lr"] == 1e-2 and chosen["runs"][1]["val_acc"] == 0.6


def test_steps_to_target_interpolates_and_censors():
    run = {"steps_per_epoch": 10, "history": [{"val_acc": 0.2}, {"val_acc": 0.6}]}
    # 0.4 is halfway between epoch 1 (0.2) and epoch 2 (0.6): 15 steps
    assert _steps_to(run, 0.4) == pytest.approx(math.log10(15))
    # never reached: twice the run's 20 steps
    assert _steps_to(run, 0.9) == pytest.approx(math.log10(40))
    assert _steps_to(None, 0.4) is None


def test_the_gap_is_taken_at_a_matched_training_loss():
    def run(losses, train, val):
        history = [
            {"train_loss": a, "train_acc": b, "val_acc": c} for a, b, c in zip(losses, train, val)
        ]
        return {"history": history}

    chosen = {
        "a": {"runs": [run([1.0, 0.5, 0.2], [0.5, 0.8, 0.95], [0.5, 0.7, 0.7])]},
        "b": {"runs": [run([1.0, 0.6, 0.4], [0.5, 0.7, 0.8], [0.5, 0.65, 0.75])]},
    }
    gaps = _gaps(chosen, ["a", "b"], ["a", "b"])
    # both reach 0.4 (b's lowest): a first at epoch 3 (gap 25), b at epoch 3 (gap 5)
    assert gaps["a"] == [pytest.approx(25.0)] and gaps["b"] == [pytest.approx(5.0)]
    assert _spread([[50.0, 60.0], [70.0, None], [40.0, 65.0]]) == [30.0, None]


class _KnownBranch(nn.Module):
    """A residual add whose branch is exactly ``k`` times its skip input."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k
        self.merge = ResidualAdd(channels=4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.bn(x)
        return self.merge(self.k * x, x)


def test_the_branch_ratio_is_exact_on_a_known_block_and_leaves_the_buffers():
    model = _KnownBranch(0.1)
    before = [b.clone() for b in model.buffers()]
    ratio = _branch_ratio(model, torch.randn(16, 4))
    assert ratio == pytest.approx(-1.0, abs=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert _branch_ratio(nn.Linear(4, 4), torch.randn(2, 4)) is None


def test_gradient_norm_variability_is_the_spread_of_log_changes():
    norms = _GradNorms(nn.Linear(2, 2))
    norms.norms = [1.0, 10.0, 10.0, 1000.0]  # log changes 1, 0, 2: sd 1
    assert norms.variability() == pytest.approx(1.0)


def test_the_claims_models():
    stack = NormStack(40, 10, depth=3, width=16, norm="batch", order="after", scale=2.0)
    kinds = [type(m).__name__ for m in stack.body]
    assert kinds == ["Linear", "ReLU", "BatchNorm"] * 3
    torch.manual_seed(0)
    reference = NormStack(40, 10, depth=3, width=16, norm="batch", order="after")
    torch.manual_seed(0)
    doubled = NormStack(40, 10, depth=3, width=16, norm="batch", order="after", scale=2.0)
    assert torch.equal(doubled.body[0].weight, 2 * reference.body[0].weight)
    noisy = NoisyBatchNorm(8).eval()
    x = torch.randn(5, 8)
    assert torch.equal(noisy(x), noisy.bn(x))
    assert not torch.equal(noisy.train()(x), noisy.bn(x))
    for norm in ("batch", "layer", "none"):
        assert SequenceGRU(40, 10, hidden=8, steps=10, norm=norm)(torch.randn(3, 40)).shape == (
            3,
            10,
        )
    for kind, options in (
        ("transformer", {"depth": 1, "dim": 8, "heads": 2}),
        ("resnet1d", {"depth": 8}),
    ):
        assert build_model(kind, 40, 10, options)(torch.randn(2, 40)).shape == (2, 10)


def test_a_tiny_claims_study_runs_judges_resumes_and_reports(tmp_path):
    protocol = parse_protocol(TINY, "tiny.toml")
    # two worker processes (the pool), then one (in process): the same records
    results = run_claims("default", tmp_path / "lab", protocol=protocol, workers=2, progress=False)
    (claim,) = results["claims"]
    assert claim["verdict"] in ("supported", "not supported", "inconclusive")
    (criterion,) = claim["criteria"]
    assert criterion["n"] == 2 and criterion["low"] <= criterion["mean"] <= criterion["high"]
    assert set(claim["chosen_lr"].values()) <= {1e-3, 1e-2}
    assert results["counts"] == {"jobs": 8, "reused": 0, "trained": 8, "diverged": 0, "failed": 0}
    saved = json.loads((tmp_path / "lab" / "claims.json").read_text())
    assert saved["claims"][0]["verdict"] == claim["verdict"]
    assert (tmp_path / "lab" / "report.html").exists()
    again = run_claims("default", tmp_path / "lab", protocol=protocol, workers=1, progress=False)
    assert again["counts"]["reused"] == 8 and again["counts"]["trained"] == 0
    assert again["claims"][0]["criteria"][0]["values"] == criterion["values"]


def test_quick_draws_no_conclusions(tmp_path):
    protocol = parse_protocol(TINY, "tiny.toml")
    results = run_claims("quick", tmp_path / "q", protocol=protocol, workers=1, progress=False)
    assert results["quick"] and results["claims"][0]["verdict"] == "not judged"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["lab", "claims", "--nproc", "2"], "--nproc is not supported by the claims study"),
        (["lab", "--executor", "ray"], "--executor is not supported by the claims study"),
        (["lab", "--size", "huge"], "size='huge' is not a size"),
        (["lab", "--quick", "--size", "full"], "contradict"),
        (["lab", "depth", "--size", "full"], "applies to the claims study only"),
        (["lab", "--seeds", "0"], "--seeds"),
    ],
)
def test_the_cli_refuses_what_the_claims_study_does_not_take(capsys, tmp_path, argv, fragment):
    code = main(argv + ["--out", str(tmp_path / "lab"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert fragment in err
    assert not (tmp_path / "lab" / "runs").exists()


def test_he_init_and_the_cnn_layer_norm_over_all_units():
    torch.manual_seed(0)
    stack = NormStack(400, 10, depth=2, width=400, norm="none", init="he")
    first = stack.body[0]
    assert torch.count_nonzero(first.bias) == 0
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.02)
    with pytest.raises(ValueError, match="init='xavier'"):
        NormStack(40, 10, init="xavier")
    cnn = build_model("resnet1d", 40, 10, {"depth": 8, "norm": "layer"})
    norms = [m for m in cnn.modules() if type(m).__name__ == "GroupNorm"]
    assert norms and all(m.num_groups == 1 for m in norms)


def test_the_learning_rate_sweep_censors_a_variant_no_rate_trains():
    from resnorm.lab.claims import measures

    def rec(acc, diverged=False):
        return {"val_acc": acc, "diverged": diverged}

    chosen = {
        "none": {"lr": None, "by_lr": {0.01: [rec(0.1)], 0.1: [rec(0.1)], 1.0: [rec(0.1, True)]}},
        "batch": {"lr": None, "by_lr": {0.01: [rec(0.3)], 0.1: [rec(0.5)], 1.0: [rec(0.4)]}},
    }
    groups, _ = measures.lr_range(chosen, {"lrs": [0.01, 0.1, 1.0]})
    assert groups["batch"]["max_lr"] == [pytest.approx(0.0)]  # 1.0 trains
    assert groups["batch"]["best_lr"] == [pytest.approx(-1.0)]
    assert groups["none"]["max_lr"] == [pytest.approx(-2.5)]  # none: half a decade below


def test_the_headline_names_the_deciding_criterion_and_follow_ups_read_as_questions():
    from resnorm.lab.claims.engine import headline, sentences

    text = TINY.replace('effect = "before.test_acc - after.test_acc"', 'effect = "after.test_acc"')
    text = text.replace('experiment = "order"', 'experiment = "order"\nkind = "follow-up"')
    text += text[text.index("[[claim.criterion]]") :].replace("> 0", "< 0")
    claim = parse_protocol(text).claims[0]
    groups = {"after": {"test_acc": [50.0, 52.0, 51.0]}, "before": {"test_acc": [0.0, 0.0, 0.0]}}
    judged = judge(claim, groups)
    assert [c["verdict"] for c in judged["criteria"]] == ["supported", "not supported"]
    assert judged["verdict"] == "not supported"
    assert headline(judged).startswith("before minus after: +51.00 points")
    said = sentences(claim, judged, groups)
    assert "after.test_acc 51 [" in said[0]
    assert said[-1].startswith("The earlier result does not survive")


def test_the_cli_runs_a_claims_protocol_file_and_resumes_it(capsys, tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    argv = ["lab", str(tmp_path / "tiny.toml"), "--quick", "--workers", "1", "--json"]
    assert main(argv + ["--out", str(tmp_path / "lab")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["name"] == "tiny" and first["quick"] and first["counts"]["trained"] == 2
    assert [c["verdict"] for c in first["claims"]] == ["not judged"]
    assert main(argv + ["--out", str(tmp_path / "lab")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (
        again["counts"]["reused"] == 2
        and again["claims"][0]["groups"] == first["claims"][0]["groups"]
    )
    bad = TINY.replace('name = "tiny"', 'name = "../up"')
    (tmp_path / "bad.toml").write_text(bad)
    assert main(["lab", str(tmp_path / "bad.toml"), "--quick", "--out", str(tmp_path / "b")]) == 2
    assert "name='../up'" in capsys.readouterr().err


def test_the_built_in_quick_study_runs_every_experiment(capsys, tmp_path):
    """``resnorm lab --quick``: every experiment of the built-in protocol trains, measures
    and draws its figures (one seed: every verdict "not judged"), no run fails."""
    code = main(["lab", "--quick", "--workers", "2", "--json", "--out", str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    results = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in results["claims"]] == [str(i) for i in range(1, 15)] + ["F1"]
    assert {c["verdict"] for c in results["claims"]} == {"not judged"}
    assert results["counts"]["failed"] == 0 and results["failures"] == []
    assert set(EXPERIMENTS) == {c["experiment"] for c in results["claims"]}
    for claim in results["claims"]:
        assert claim["figures"], claim["id"]
        for figure in claim["figures"]:
            assert (tmp_path / "q" / "figures" / f"{figure['name']}.png").exists()


def _jobs(model="stack", options=(("depth", 3), ("norm", "batch"), ("width", 16)), **kwargs):
    from resnorm.lab.claims.jobs import Job

    settings = {"epochs": 2, "batch_size": 64, "num_samples": 400, "val_fraction": 0.2}
    settings.update(kwargs)
    return [Job(model, options, lr, seed, **settings) for lr in (1e-3, 1e-2) for seed in (0, 1)]


def _assert_records_agree(stacked: dict, alone: dict, tol: float, job, flips: int = 1) -> None:
    """Two records of ``job``: the measures at init equal, the rest to ``tol``, and the
    accuracies to ``flips`` samples (a sample on the decision boundary may flip)."""
    from resnorm.lab.claims.jobs import job_data

    split, data = job_data(job.dataset, job.num_samples, job.val_fraction)
    n_val, n_test = len(split.y_test), len(data.y_test)
    assert stacked["grad_first_over_last"] == alone["grad_first_over_last"]
    assert (stacked["branch_ratio"] is None) == (alone["branch_ratio"] is None)
    if alone["branch_ratio"] is not None:
        assert stacked["branch_ratio"][0] == alone["branch_ratio"][0]
        assert stacked["branch_ratio"] == pytest.approx(alone["branch_ratio"], abs=tol)
    assert stacked["diverged"] == alone["diverged"]
    for a, b in zip(stacked["history"], alone["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=tol)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=(flips + 0.01) / n_val)
    assert stacked["test_acc"] == pytest.approx(alone["test_acc"], abs=(flips + 0.01) / n_test)
    for key in ("change_first_over_last", "grad_variability"):
        assert stacked[key] == pytest.approx(alone[key], abs=tol), key


@pytest.mark.parametrize(
    "model, options",
    [
        ("stack", (("depth", 3), ("norm", "batch"), ("width", 16))),
        ("mlp", (("depth", 3), ("norm", "none"), ("residual", True), ("width", 16))),
    ],
)
def test_jobs_trained_stacked_agree_with_the_jobs_trained_alone(model, options):
    """Four jobs (two learning rates x two seeds, 10 AdamW steps each) trained as one
    stacked computation: every record equals the job's record trained alone to 1e-5
    (float32; measured: 1e-7), the measures at init exactly."""
    from resnorm.lab.claims.jobs import run_job, run_jobs

    jobs = _jobs(model, options)
    stacked = run_jobs(jobs)
    for job, record in zip(jobs, stacked, strict=True):
        alone = run_job(job)
        assert (record["stacked_with"], alone["stacked_with"]) == (4, 1)
        _assert_records_agree(record, alone, 1e-5, job)


def test_a_stacked_job_that_diverges_stops_and_the_others_go_on():
    from resnorm.lab.claims.jobs import Job, run_job, run_jobs

    good, bad = _jobs(optimizer="sgd")[:2]
    bad = Job(**{**bad.__dict__, "lr": 1e12})
    records = run_jobs([good, bad])
    assert records[1]["diverged"] and not records[0]["diverged"]
    _assert_records_agree(records[0], run_job(good), 1e-5, good)


def test_jobs_that_cannot_stack_train_alone_or_are_refused():
    from resnorm.lab.claims.jobs import run_job, run_jobs, stack_refusal

    noisy = _jobs(options=(("depth", 2), ("norm", "noisy-batch"), ("width", 8)), epochs=1)[:2]
    records = run_jobs(noisy)  # noise drawn in training: not stacked, nothing lost
    assert [r["stacked_with"] for r in records] == [1, 1]
    assert records[0]["history"] == run_job(noisy[0])["history"]
    mixed = [_jobs()[0], _jobs(epochs=1)[0]]
    assert "more than their learning rate and seed" in stack_refusal(mixed)
    with pytest.raises(ValueError, match="cannot train stacked"):
        run_jobs(mixed)


def test_units_group_a_variant_s_rates_and_seeds_costliest_first(monkeypatch):
    from resnorm.lab.claims import engine

    small, large = _jobs(), _jobs(options=(("depth", 12), ("norm", "batch"), ("width", 16)))
    units = engine.plan_units(small + large, stack=True)
    assert [set(u) for u in units] == [set(large), set(small)]
    assert engine.plan_units(small, stack=False) == [(job,) for job in small]
    monkeypatch.setattr(engine, "MAX_STACK", 3)
    assert [len(u) for u in engine.plan_units(small, stack=True)] == [3, 1]


def test_a_unit_whose_stacked_training_fails_trains_alone_and_keeps_the_error(monkeypatch):
    from resnorm.lab.claims import engine

    def broken(jobs):
        raise RuntimeError("stacking broke")

    monkeypatch.setattr(engine, "run_jobs", broken)
    jobs = tuple(_jobs(epochs=1)[:2])
    with pytest.warns(UserWarning, match="trained alone, not stacked: RuntimeError"):
        records = engine._run_unit_safely(jobs)
    assert [r["status"] for r in records] == ["finished", "finished"]
    assert all(r["stack_error"] == "RuntimeError: stacking broke" for r in records)


def test_the_claims_study_stacks_by_default_and_no_stack_trains_alone(capsys, tmp_path):
    """Same records to float32 rounding either way; the choice is in the provenance."""
    (tmp_path / "tiny.toml").write_text(TINY)
    argv = ["lab", str(tmp_path / "tiny.toml"), "--workers", "1", "--json", "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "s")]) == 0
    stacked = json.loads(capsys.readouterr().out)
    assert main(argv + ["--no-stack", "--out", str(tmp_path / "a")]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert (stacked["provenance"]["stack"], alone["provenance"]["stack"]) == (True, False)
    from resnorm.lab.claims.engine import _unique_jobs, plan

    protocol = parse_protocol(TINY, "tiny.toml")
    jobs = _unique_jobs(plan(protocol, protocol.sizes["default"]))
    assert len(jobs) == 8
    for key, job in jobs.items():
        s, a = (json.loads((tmp_path / d / "runs" / f"{key}.json").read_text()) for d in "sa")
        assert (s["stacked_with"], a["stacked_with"]) == (4, 1), key
        # these runs sit near chance after 2 epochs, where the logits nearly tie: a few
        # validation samples may flip
        _assert_records_agree(s, a, 1e-5, job, flips=4)
