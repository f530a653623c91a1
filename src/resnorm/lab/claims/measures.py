"""How each experiment of the claims study turns its runs into groups of per-seed values
and figures (the second half of :data:`~resnorm.lab.claims.experiments.EXPERIMENTS`).

A measure gets ``chosen[variant]``: ``{"lr", "runs"}`` (one record per seed, ``None`` for a
failed run) or, for a variant whose learning rate is the swept axis, ``{"lr": None,
"by_lr"}``, and the experiment's settings; it returns ``(groups, figures)``.
"""

from __future__ import annotations

import math

from .figspecs import bars, figure, runs_of, series, val_curves
from .stats import finite

STACK_NORMS = {"none": "none", "batch": "batch", "noisy_batch": "noisy-batch", "layer": "layer"}
NORM3 = ("batch", "layer", "none")


#: A run "trains" in the learning-rate sweep when it does not diverge and ends with a
#: validation accuracy of at least twice chance.
TRAINS_AT = 2.0


#: Steps-to-target of a run that never reached the target: this multiple of its steps.
NOT_REACHED = 2.0


def points(runs: list[dict], key: str = "test_acc") -> list[float | None]:
    """Per-seed ``key`` in percent (accuracies)."""
    return [None if r is None or r.get(key) is None else 100 * r[key] for r in runs]


def values(runs: list[dict], key: str) -> list[float | None]:
    return [None if r is None else r.get(key) for r in runs]


def _spread(per_setting: list[list[float | None]]) -> list[float | None]:
    """Per seed: the largest minus the smallest value over the settings."""
    out = []
    for seed_values in zip(*per_setting, strict=True):
        xs = finite(seed_values)
        out.append(max(xs) - min(xs) if len(xs) == len(seed_values) and xs else None)
    return out


def first_layers(chosen: dict, s: dict):
    groups = {}
    for group, name in (("plain", "plain_none"), ("residual", "residual_none")):
        runs = runs_of(chosen, name)
        groups[group] = {
            "grad_first_over_last": values(runs, "grad_first_over_last"),
            "change_first_over_last": values(runs, "change_first_over_last"),
            "test_acc": points(runs),
        }
    labels = {"plain": "plain", "residual": "residual"}
    figures = [
        bars(
            "first-layers-grad",
            "Gradient norm at init, first / last hidden layer",
            "log10 ratio",
            groups,
            "grad_first_over_last",
            labels,
        ),
        bars(
            "first-layers-change",
            "Relative weight change over training, first / last hidden layer",
            "log10 ratio",
            groups,
            "change_first_over_last",
            labels,
        ),
    ]
    return groups, figures


def depth(chosen: dict, s: dict):
    depths = s["depths"]
    groups = {}
    for kind in ("residual", "plain"):
        for end, depth in (("deep", max(depths)), ("shallow", min(depths))):
            runs = runs_of(chosen, f"{kind}_d{depth}")
            ratio = values(runs, "grad_first_over_last")
            groups[f"{kind}_{end}"] = {
                "test_acc": points(runs),
                "grad_first_over_last": ratio,
                "grad_imbalance": [None if v is None else abs(v) for v in ratio],
            }
    acc = [
        series(k, depths, [points(runs_of(chosen, f"{k}_d{d}")) for d in depths])
        for k in ("residual", "plain")
    ]
    grad = [
        series(
            k,
            depths,
            [values(runs_of(chosen, f"{k}_d{d}"), "grad_first_over_last") for d in depths],
        )
        for k in ("residual", "plain")
    ]
    return groups, [
        figure(
            "depth-accuracy",
            "Test accuracy over depth (1-D ResNets, batch norm)",
            "lines",
            "layers",
            "test accuracy (%)",
            acc,
            x_log=True,
            reference=10.0,
            reference_label="chance",
            metrics=["test_acc"],
        ),
        figure(
            "depth-gradient",
            "Gradient norm at init, first / last layer",
            "lines",
            "layers",
            "log10 ratio",
            grad,
            x_log=True,
            metrics=["grad_first_over_last", "grad_imbalance"],
        ),
    ]


def depth_mlp(chosen: dict, s: dict):
    depths = s["depths"]
    groups = {
        "deep": {"test_acc": points(runs_of(chosen, f"d{max(depths)}"))},
        "shallow": {"test_acc": points(runs_of(chosen, f"d{min(depths)}"))},
    }
    line = series(
        "residual MLP, batch norm", depths, [points(runs_of(chosen, f"d{d}")) for d in depths]
    )
    return groups, [
        figure(
            "depth-mlp",
            "Residual batch-norm MLP (width 128) over depth, tuned",
            "lines",
            "blocks",
            "test accuracy (%)",
            [line],
            reference=10.0,
            reference_label="chance",
            metrics=["test_acc"],
        )
    ]


def branch(chosen: dict, s: dict):
    runs = runs_of(chosen, "residual_batch")
    init = [r["branch_ratio"][0] if r and r.get("branch_ratio") else None for r in runs]
    end = [r["branch_ratio"][-1] if r and r.get("branch_ratio") else None for r in runs]
    growth = [
        b - a if a is not None and b is not None else None for a, b in zip(init, end, strict=True)
    ]
    groups = {"residual": {"ratio_init": init, "ratio_end": end, "ratio_growth": growth}}
    lines = []
    for name, label in (("residual_batch", "batch norm"), ("residual_none", "no norm")):
        rs = runs_of(chosen, name)
        n = max((len(r["branch_ratio"]) for r in rs if r and r.get("branch_ratio")), default=0)
        per_epoch = [
            [
                r["branch_ratio"][e]
                if r and r.get("branch_ratio") and e < len(r["branch_ratio"])
                else None
                for r in rs
            ]
            for e in range(n)
        ]
        lines.append(series(label, list(range(n)), per_epoch))
    return groups, [
        figure(
            "branch-ratio",
            "Branch / skip norm at the residual adds (16 blocks)",
            "lines",
            "epoch (0 = init)",
            "log10 ||F(x)|| / ||x||",
            lines,
            metrics=["ratio_init", "ratio_growth"],
        )
    ]


def _gaps(chosen: dict, names: list[str], matched: list[str]) -> dict:
    """Per group, per seed: train minus validation accuracy (points) at the first epoch
    whose training loss is at or below the loss every ``matched`` group reaches (the
    largest of their lowest losses), so that the gap is compared at a matched training
    loss (``None`` where a group never gets that low)."""
    runs = {g: runs_of(chosen, g) for g in names}
    seeds = len(next(iter(runs.values())))
    out = {g: [] for g in names}
    for i in range(seeds):
        lows = [
            min((h["train_loss"] for h in runs[g][i]["history"]), default=math.inf)
            if runs[g][i]
            else math.inf
            for g in names
        ]
        target = max(lows)
        for g in names:
            hist = runs[g][i]["history"] if runs[g][i] and math.isfinite(target) else []
            row = next((h for h in hist if h["train_loss"] <= target), None)
            out[g].append(None if row is None else 100 * (row["train_acc"] - row["val_acc"]))
    return out


def _mean_probe(runs: list[dict], key: str) -> list[float | None]:
    out = []
    for r in runs:
        xs = finite(p[key] for p in (r.get("santurkar") or [])) if r else []
        out.append(sum(xs) / len(xs) if xs else None)
    return out


_LANDSCAPE_FIGURES = (  # name, title, y label, metric
    ("ics", "Internal covariate shift (Santurkar et al.)", "log10 relative gradient change", "ics"),
    ("loss-variation", "Loss variation along the gradient", "log10", "loss_variation"),
    ("beta-smoothness", "Effective beta-smoothness", "log10", "beta_smoothness"),
    (
        "gradient-predictiveness",
        "Largest change of the gradient along the gradient step",
        "log10 l2 change",
        "grad_predictiveness",
    ),
    ("gap", "Train - validation accuracy at matched training loss", "points", "gap"),
    (
        "grad-variability",
        "Step-to-step variability of the gradient norm",
        "log10",
        "grad_variability",
    ),
    ("stack-accuracy", "Test accuracy (8-layer stack)", "test accuracy (%)", "test_acc"),
)


def landscape(chosen: dict, s: dict):
    gaps = _gaps(chosen, list(STACK_NORMS), ["none", "batch"])
    groups = {}
    for g in STACK_NORMS:
        runs = runs_of(chosen, g)
        groups[g] = {
            "ics": _mean_probe(runs, "ics"),
            "loss_variation": _mean_probe(runs, "loss_variation"),
            "beta_smoothness": _mean_probe(runs, "beta_smoothness"),
            "grad_predictiveness": _mean_probe(runs, "grad_predictiveness"),
            "gap": gaps[g],
            "grad_variability": values(runs, "grad_variability"),
            "test_acc": points(runs),
        }
    labels = {
        "none": "no norm",
        "batch": "batch norm",
        "noisy_batch": "noisy batch norm",
        "layer": "layer norm",
    }
    figures = [
        bars(name, title, unit, groups, metric, labels)
        for name, title, unit, metric in _LANDSCAPE_FIGURES
    ]
    return groups, figures


def lr_range(chosen: dict, s: dict):
    lrs = sorted(s["lrs"])
    groups, lines = {}, []
    for g, label in (("none", "no norm"), ("batch", "batch norm")):
        by_lr = chosen[g]["by_lr"]
        seeds = len(by_lr[lrs[0]])
        max_lr, best_lr = [], []
        for i in range(seeds):
            runs = [by_lr[lr][i] for lr in lrs]
            ok = [lr for lr, r in zip(lrs, runs, strict=True) if _trains(r)]
            # No rate trains: half a decade below the sweep (censored, and said so).
            max_lr.append(math.log10(max(ok)) if ok else math.log10(lrs[0]) - 0.5)
            scores = [(r.get("val_acc") or 0) if r and not r["diverged"] else 0 for r in runs]
            best_lr.append(math.log10(lrs[scores.index(max(scores))]))
        groups[g] = {"max_lr": max_lr, "best_lr": best_lr}
        lines.append(series(label, lrs, [points(by_lr[lr], "val_acc") for lr in lrs]))
    return groups, [
        figure(
            "lr-range",
            "Validation accuracy over the SGD learning rate (8-layer stack)",
            "lines",
            "learning rate",
            "validation accuracy (%)",
            lines,
            x_log=True,
            reference=100 * TRAINS_AT / 10,
            reference_label="trains",
            metrics=["max_lr"],
        )
    ]


def _trains(record: dict | None) -> bool:
    return (
        bool(record) and not record["diverged"] and (record.get("val_acc") or 0) >= TRAINS_AT / 10
    )


def init(chosen: dict, s: dict):
    scales = s["scales"]
    groups, lines = {}, []
    for g, label in (("none", "no norm"), ("batch", "batch norm")):
        per_scale = [points(runs_of(chosen, f"{g}_x{k:g}")) for k in scales]
        groups[g] = {"spread": _spread(per_scale)}
        lines.append(series(label, scales, per_scale))
    return groups, [
        figure(
            "init-scale",
            "Test accuracy over the initialization scale (8-layer stack)",
            "lines",
            "weight scale (x default)",
            "test accuracy (%)",
            lines,
            x_log=True,
            reference=10.0,
            reference_label="chance",
            metrics=["spread"],
        )
    ]


def order(chosen: dict, s: dict):
    groups = {o: {"test_acc": points(runs_of(chosen, o))} for o in ("before", "after")}
    labels = {"before": "Linear-BN-ReLU", "after": "Linear-ReLU-BN"}
    return groups, [
        bars(
            "order",
            "Batch norm before vs after the activation",
            "test accuracy (%)",
            groups,
            "test_acc",
            labels,
        )
    ]


def batch_size(chosen: dict, s: dict):
    sizes = s["batch_sizes"]
    groups, lines = {}, []
    for g in ("batch", "layer", "group"):
        per_size = [points(runs_of(chosen, f"{g}_b{b}")) for b in sizes]
        groups[g] = {"spread": _spread(per_size)}
        lines.append(series(f"{g} norm", sizes, per_size))
    return groups, [
        figure(
            "batch-size",
            "Test accuracy over the batch size (8-layer stack)",
            "lines",
            "batch size",
            "test accuracy (%)",
            lines,
            x_log=True,
            reference=10.0,
            reference_label="chance",
            metrics=["spread"],
        )
    ]


def cnn_rnn(chosen: dict, s: dict):
    groups = {
        f"{k}_{n}": {"test_acc": points(runs_of(chosen, f"{k}_{n}"))}
        for k in ("cnn", "rnn")
        for n in NORM3
    }
    lines = [
        series(
            f"{n} norm" if n != "none" else "no norm",
            ["CNN (ResNet-8)", "GRU"],
            [groups[f"cnn_{n}"]["test_acc"], groups[f"rnn_{n}"]["test_acc"]],
        )
        for n in NORM3
    ]
    return groups, [
        figure(
            "cnn-rnn",
            "Norm kinds in a CNN and in a recurrent network",
            "bars",
            "",
            "test accuracy (%)",
            lines,
            reference=10.0,
            reference_label="chance",
            metrics=["test_acc"],
        )
    ]


def _steps_to(run: dict | None, target: float) -> float | None:
    """log10 of the training steps to reach validation accuracy ``target`` (linear
    between epoch ends; :data:`NOT_REACHED` times the run's steps when never reached)."""
    if not run:
        return None
    steps, previous = run["steps_per_epoch"], 0.0
    for i, h in enumerate(run["history"]):
        if h["val_acc"] >= target:
            fraction = (
                (target - previous) / (h["val_acc"] - previous) if h["val_acc"] > previous else 1.0
            )
            return math.log10(steps * (i + min(max(fraction, 0.0), 1.0)))
        previous = h["val_acc"]
    return math.log10(NOT_REACHED * steps * max(len(run["history"]), 1))


def combos(chosen: dict, s: dict):
    target = s.get("target", 0.4)
    names = {
        "residual_batch": "residual + batch norm",
        "residual_none": "residual, no norm",
        "plain_batch": "plain + batch norm",
        "plain_none": "plain, no norm",
    }
    groups = {g: {"steps": [_steps_to(r, target) for r in runs_of(chosen, g)]} for g in names}
    return groups, [
        figure(
            "combos",
            "Validation accuracy per epoch (16-block MLPs)",
            "lines",
            "epoch",
            "validation accuracy (%)",
            val_curves(chosen, names),
            reference=100 * target,
            reference_label="target",
            metrics=["steps"],
        ),
    ]


def transformer(chosen: dict, s: dict):
    groups = {g: {"test_acc": points(runs_of(chosen, g))} for g in ("residual", "plain")}
    names = {"residual": "with residual connections", "plain": "without"}
    return groups, [
        figure(
            "transformer",
            "Transformer (4 blocks) with and without residual connections",
            "lines",
            "epoch",
            "validation accuracy (%)",
            val_curves(chosen, names),
            reference=10.0,
            reference_label="chance",
            metrics=["test_acc"],
        )
    ]
