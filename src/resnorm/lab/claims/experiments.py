"""The experiments of the claims study, one table (:data:`EXPERIMENTS`).

An :class:`Experiment` says which variants it trains (each at every learning rate of its
grid and every seed) and how it turns the runs at each variant's chosen learning rate into
*groups* of per-seed values (``groups[group][metric] = [seed 0, seed 1, ...]``), which the
protocol's rules read, plus figures. ``outputs`` lists the groups and metrics, so that a
rule naming anything else is an error before the study runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .stats import finite, mean_interval

#: A run "trains" in the learning-rate sweep when it does not diverge and ends with a
#: validation accuracy of at least twice chance.
TRAINS_AT = 2.0
#: Steps-to-target of a run that never reached the target: this multiple of its steps.
NOT_REACHED = 2.0


@dataclass(frozen=True)
class Variant:
    """One arm: a model (:func:`~resnorm.lab.claims.models.build_model` kind and options),
    its optimizer, whether its learning rate is chosen on the validation split (``tune``)
    or every rate of the grid is kept, probes, and settings overriding the size's."""

    name: str
    model: str
    options: dict
    optimizer: str = "adamw"
    tune: bool = True
    probes: tuple = ()
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    name: str
    design: str
    outputs: dict
    variants: Callable[[dict], list[Variant]]
    measure: Callable[[dict, dict], tuple[dict, list[dict]]]
    settings: tuple = ()


# --- helpers ---------------------------------------------------------------------------


def points(runs: list[dict], key: str = "test_acc") -> list[float | None]:
    """Per-seed ``key`` in percent (accuracies)."""
    return [None if r is None or r.get(key) is None else 100 * r[key] for r in runs]


def values(runs: list[dict], key: str) -> list[float | None]:
    return [None if r is None else r.get(key) for r in runs]


def series(label: str, xs: list, per_x: list[list]) -> dict:
    """A figure series: at each x the mean over seeds and its 95% interval."""
    stats = [mean_interval(v) for v in per_x]
    return {
        "label": label,
        "x": list(xs),
        "y": [s["mean"] for s in stats],
        "low": [s["low"] for s in stats],
        "high": [s["high"] for s in stats],
    }


def figure(name: str, title: str, kind: str, x_label: str, y_label: str, lines, **more) -> dict:
    return {
        "name": name,
        "title": title,
        "kind": kind,
        "x_label": x_label,
        "y_label": y_label,
        "x_log": more.pop("x_log", False),
        "y_log": more.pop("y_log", False),
        "series": lines,
        "reference": more.pop("reference", None),
        "reference_label": more.pop("reference_label", None),
        "metrics": more.pop("metrics", []),
    }


def bars(name: str, title: str, y_label: str, groups: dict, metric: str, labels: dict) -> dict:
    """One bar per group: ``groups[g][metric]`` over seeds."""
    lines = [series(labels.get(g, g), [labels.get(g, g)], [groups[g][metric]]) for g in labels]
    return figure(name, title, "bars", "", y_label, lines, metrics=[metric])


def _chosen(chosen: dict, name: str) -> list[dict]:
    return chosen[name]["runs"]


def _spread(per_setting: list[list[float | None]]) -> list[float | None]:
    """Per seed: the largest minus the smallest value over the settings."""
    out = []
    for seed_values in zip(*per_setting, strict=True):
        xs = finite(seed_values)
        out.append(max(xs) - min(xs) if len(xs) == len(seed_values) and xs else None)
    return out


def _val_curves(chosen: dict, names: dict) -> list[dict]:
    lines = []
    for name, label in names.items():
        runs = _chosen(chosen, name)
        epochs = max((len(r["history"]) for r in runs if r), default=0)
        per_epoch = [
            [
                100 * r["history"][e]["val_acc"] if r and e < len(r["history"]) else None
                for r in runs
            ]
            for e in range(epochs)
        ]
        lines.append(series(label, list(range(1, epochs + 1)), per_epoch))
    return lines


# --- the experiments -------------------------------------------------------------------

DEEP = {"depth": 16, "width": 64}
STACK = {"depth": 8, "width": 64}


def _deep_mlp(residual: bool, norm: str) -> Variant:
    name = f"{'residual' if residual else 'plain'}_{norm}"
    return Variant(name, "mlp", {**DEEP, "norm": norm, "residual": residual})


def _first_layers_variants(s: dict) -> list[Variant]:
    return [_deep_mlp(False, "none"), _deep_mlp(True, "none")]


def _first_layers_measure(chosen: dict, s: dict):
    groups = {}
    for group, name in (("plain", "plain_none"), ("residual", "residual_none")):
        runs = _chosen(chosen, name)
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


def _depth_variants(s: dict) -> list[Variant]:
    options = {"widths": list(s["widths"])} if "widths" in s else {}
    return [
        Variant(
            f"{'residual' if r else 'plain'}_d{d}",
            "resnet1d",
            {"depth": d, "norm": "batch", "residual": r, **options},
        )
        for d in s["depths"]
        for r in (True, False)
    ]


def _depth_measure(chosen: dict, s: dict):
    depths = s["depths"]
    groups = {}
    for kind in ("residual", "plain"):
        for end, depth in (("deep", max(depths)), ("shallow", min(depths))):
            runs = _chosen(chosen, f"{kind}_d{depth}")
            groups[f"{kind}_{end}"] = {
                "test_acc": points(runs),
                "grad_first_over_last": values(runs, "grad_first_over_last"),
            }
    acc = [
        series(k, depths, [points(_chosen(chosen, f"{k}_d{d}")) for d in depths])
        for k in ("residual", "plain")
    ]
    grad = [
        series(
            k,
            depths,
            [values(_chosen(chosen, f"{k}_d{d}"), "grad_first_over_last") for d in depths],
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
            metrics=["grad_first_over_last"],
        ),
    ]


def _depth_mlp_variants(s: dict) -> list[Variant]:
    return [
        Variant(f"d{d}", "mlp", {"depth": d, "width": 128, "norm": "batch"}) for d in s["depths"]
    ]


def _depth_mlp_measure(chosen: dict, s: dict):
    depths = s["depths"]
    groups = {
        "deep": {"test_acc": points(_chosen(chosen, f"d{max(depths)}"))},
        "shallow": {"test_acc": points(_chosen(chosen, f"d{min(depths)}"))},
    }
    line = series(
        "residual MLP, batch norm", depths, [points(_chosen(chosen, f"d{d}")) for d in depths]
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


def _branch_variants(s: dict) -> list[Variant]:
    return [_deep_mlp(True, "batch"), _deep_mlp(True, "none")]


def _branch_measure(chosen: dict, s: dict):
    runs = _chosen(chosen, "residual_batch")
    init = [r["branch_ratio"][0] if r and r.get("branch_ratio") else None for r in runs]
    end = [r["branch_ratio"][-1] if r and r.get("branch_ratio") else None for r in runs]
    growth = [
        b - a if a is not None and b is not None else None for a, b in zip(init, end, strict=True)
    ]
    groups = {"residual": {"ratio_init": init, "ratio_end": end, "ratio_growth": growth}}
    lines = []
    for name, label in (("residual_batch", "batch norm"), ("residual_none", "no norm")):
        rs = _chosen(chosen, name)
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


_STACK_NORMS = {"none": "none", "batch": "batch", "noisy_batch": "noisy-batch", "layer": "layer"}


def _stack(name: str, **options) -> Variant:
    return Variant(name, "stack", {**STACK, **options}, probes=("santurkar",))


def _landscape_variants(s: dict) -> list[Variant]:
    return [_stack(g, norm=n) for g, n in _STACK_NORMS.items()]


def _gaps(chosen: dict, names: list[str]) -> dict:
    """Per group, per seed: train minus validation accuracy (points) at the first epoch
    whose training loss is at or below the loss every group reaches (the largest of
    their lowest losses), so that the gap is compared at a matched training loss."""
    runs = {g: _chosen(chosen, g) for g in names}
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


def _landscape_measure(chosen: dict, s: dict):
    gaps = _gaps(chosen, list(_STACK_NORMS))
    groups = {}
    for g in _STACK_NORMS:
        runs = _chosen(chosen, g)
        groups[g] = {
            "ics": _mean_probe(runs, "ics"),
            "loss_variation": _mean_probe(runs, "loss_variation"),
            "beta_smoothness": _mean_probe(runs, "beta_smoothness"),
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
        bars(
            "ics",
            "Internal covariate shift (Santurkar et al.)",
            "log10 relative gradient change",
            groups,
            "ics",
            labels,
        ),
        bars(
            "loss-variation",
            "Loss variation along the gradient",
            "log10",
            groups,
            "loss_variation",
            labels,
        ),
        bars(
            "beta-smoothness",
            "Effective beta-smoothness",
            "log10",
            groups,
            "beta_smoothness",
            labels,
        ),
        bars(
            "gap",
            "Train - validation accuracy at matched training loss",
            "points",
            groups,
            "gap",
            labels,
        ),
        bars(
            "grad-variability",
            "Step-to-step variability of the gradient norm",
            "log10",
            groups,
            "grad_variability",
            labels,
        ),
        bars(
            "stack-accuracy",
            "Test accuracy (8-layer stack)",
            "test accuracy (%)",
            groups,
            "test_acc",
            labels,
        ),
    ]
    return groups, figures


def _lr_range_variants(s: dict) -> list[Variant]:
    return [
        Variant(g, "stack", {**STACK, "norm": g}, optimizer="sgd", tune=False)
        for g in ("none", "batch")
    ]


def _lr_range_measure(chosen: dict, s: dict):
    lrs = sorted(s["lrs"])
    groups, lines = {}, []
    for g, label in (("none", "no norm"), ("batch", "batch norm")):
        by_lr = chosen[g]["by_lr"]
        seeds = len(by_lr[lrs[0]])
        max_lr, best_lr = [], []
        for i in range(seeds):
            runs = [by_lr[lr][i] for lr in lrs]
            ok = [lr for lr, r in zip(lrs, runs, strict=True) if _trains(r)]
            max_lr.append(math.log10(max(ok)) if ok else None)
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


def _init_variants(s: dict) -> list[Variant]:
    return [
        Variant(f"{g}_x{k:g}", "stack", {**STACK, "norm": g, "scale": k})
        for g in ("none", "batch")
        for k in s["scales"]
    ]


def _init_measure(chosen: dict, s: dict):
    scales = s["scales"]
    groups, lines = {}, []
    for g, label in (("none", "no norm"), ("batch", "batch norm")):
        per_scale = [points(_chosen(chosen, f"{g}_x{k:g}")) for k in scales]
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


def _order_variants(s: dict) -> list[Variant]:
    return [
        Variant(o, "stack", {**STACK, "norm": "batch", "order": o}) for o in ("before", "after")
    ]


def _order_measure(chosen: dict, s: dict):
    groups = {o: {"test_acc": points(_chosen(chosen, o))} for o in ("before", "after")}
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


def _batch_size_variants(s: dict) -> list[Variant]:
    return [
        Variant(f"{g}_b{b}", "stack", {**STACK, "norm": g}, overrides={"batch_size": b})
        for g in ("batch", "layer", "group")
        for b in s["batch_sizes"]
    ]


def _batch_size_measure(chosen: dict, s: dict):
    sizes = s["batch_sizes"]
    groups, lines = {}, []
    for g in ("batch", "layer", "group"):
        per_size = [points(_chosen(chosen, f"{g}_b{b}")) for b in sizes]
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


_NORM3 = ("batch", "layer", "none")


def _cnn_rnn_variants(s: dict) -> list[Variant]:
    cnn = [Variant(f"cnn_{n}", "resnet1d", {"depth": 8, "norm": n}) for n in _NORM3]
    rnn = [Variant(f"rnn_{n}", "gru", {"hidden": 64, "steps": 10, "norm": n}) for n in _NORM3]
    return cnn + rnn


def _cnn_rnn_measure(chosen: dict, s: dict):
    groups = {
        f"{k}_{n}": {"test_acc": points(_chosen(chosen, f"{k}_{n}"))}
        for k in ("cnn", "rnn")
        for n in _NORM3
    }
    lines = [
        series(
            f"{n} norm" if n != "none" else "no norm",
            ["CNN (ResNet-8)", "GRU"],
            [groups[f"cnn_{n}"]["test_acc"], groups[f"rnn_{n}"]["test_acc"]],
        )
        for n in _NORM3
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


def _combos_variants(s: dict) -> list[Variant]:
    return [_deep_mlp(r, n) for r in (True, False) for n in ("batch", "none")]


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


def _combos_measure(chosen: dict, s: dict):
    target = s.get("target", 0.4)
    names = {
        "residual_batch": "residual + batch norm",
        "residual_none": "residual, no norm",
        "plain_batch": "plain + batch norm",
        "plain_none": "plain, no norm",
    }
    groups = {g: {"steps": [_steps_to(r, target) for r in _chosen(chosen, g)]} for g in names}
    others = [groups[g]["steps"] for g in names if g != "residual_batch"]
    groups["best_other"] = {
        "steps": [
            min(finite(v)) if len(finite(v)) == len(v) else None for v in zip(*others, strict=True)
        ]
    }
    return groups, [
        figure(
            "combos",
            "Validation accuracy per epoch (16-block MLPs)",
            "lines",
            "epoch",
            "validation accuracy (%)",
            _val_curves(chosen, names),
            reference=100 * target,
            reference_label="target",
            metrics=["steps"],
        ),
    ]


def _transformer_variants(s: dict) -> list[Variant]:
    base = {"depth": 4, "dim": 32, "heads": 4, "steps": 10}
    return [
        Variant(g, "transformer", {**base, "residual": g == "residual"})
        for g in ("residual", "plain")
    ]


def _transformer_measure(chosen: dict, s: dict):
    groups = {g: {"test_acc": points(_chosen(chosen, g))} for g in ("residual", "plain")}
    names = {"residual": "with residual connections", "plain": "without"}
    return groups, [
        figure(
            "transformer",
            "Transformer (4 blocks) with and without residual connections",
            "lines",
            "epoch",
            "validation accuracy (%)",
            _val_curves(chosen, names),
            reference=10.0,
            reference_label="chance",
            metrics=["test_acc"],
        )
    ]


_ACC = ("test_acc",)
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "first-layers",
            "Plain and residual MLPs of 16 blocks (width 64, no norm): the "
            "gradient norm of the first and last hidden layers at init, and their relative "
            "weight change over training.",
            {
                g: ("grad_first_over_last", "change_first_over_last", "test_acc")
                for g in ("plain", "residual")
            },
            _first_layers_variants,
            _first_layers_measure,
        ),
        Experiment(
            "depth",
            "1-D ResNets and their plain twins (batch norm) over depth: test accuracy "
            "and the first/last gradient norm at init.",
            {
                f"{k}_{e}": ("test_acc", "grad_first_over_last")
                for k in ("residual", "plain")
                for e in ("deep", "shallow")
            },
            _depth_variants,
            _depth_measure,
            ("depths", "widths"),
        ),
        Experiment(
            "depth-mlp",
            "The depth study's residual batch-norm MLP (width 128) at each depth, "
            "now with its learning rate tuned and several seeds.",
            {"deep": _ACC, "shallow": _ACC},
            _depth_mlp_variants,
            _depth_mlp_measure,
            ("depths",),
        ),
        Experiment(
            "branch",
            "A residual MLP of 16 post-activation blocks, a = ReLU(F(a) + a) (batch "
            "norm): the norm of each block's branch over its skip input, at init and after "
            "every epoch.",
            {"residual": ("ratio_init", "ratio_end", "ratio_growth")},
            _branch_variants,
            _branch_measure,
        ),
        Experiment(
            "landscape",
            "An 8-layer Linear-norm-ReLU stack (width 64) with no norm, batch "
            "norm, batch norm with injected noise, and layer norm; Santurkar et al.'s "
            "measurements after the first, middle and last epochs.",
            {
                g: (
                    "ics",
                    "loss_variation",
                    "beta_smoothness",
                    "gap",
                    "grad_variability",
                    "test_acc",
                )
                for g in _STACK_NORMS
            },
            _landscape_variants,
            _landscape_measure,
        ),
        Experiment(
            "lr-range",
            "The 8-layer stack with and without batch norm, trained with SGD "
            "(momentum 0.9) at every learning rate of a wide sweep.",
            {g: ("max_lr", "best_lr") for g in ("none", "batch")},
            _lr_range_variants,
            _lr_range_measure,
        ),
        Experiment(
            "init",
            "The 8-layer stack with and without batch norm, every weight matrix "
            "scaled by x0.1 to x10 after the default initialization.",
            {g: ("spread",) for g in ("none", "batch")},
            _init_variants,
            _init_measure,
            ("scales",),
        ),
        Experiment(
            "order",
            "The 8-layer stack with batch norm before the ReLU (Linear-BN-ReLU) and "
            "after it (Linear-ReLU-BN).",
            {"before": _ACC, "after": _ACC},
            _order_variants,
            _order_measure,
        ),
        Experiment(
            "batch-size",
            "The 8-layer stack with batch, layer and group norm, trained at "
            "several batch sizes for the same number of epochs.",
            {g: ("spread",) for g in ("batch", "layer", "group")},
            _batch_size_variants,
            _batch_size_measure,
            ("batch_sizes",),
        ),
        Experiment(
            "cnn-rnn",
            "A 1-D ResNet-8 and a GRU over MNIST-1D as 10 patches of 4, each with "
            "batch, layer and no norm (GRU: layer norm inside the cell, Ba et al. 2016; batch "
            "norm on the input projection, Laurent et al. 2016).",
            {f"{k}_{n}": _ACC for k in ("cnn", "rnn") for n in _NORM3},
            _cnn_rnn_variants,
            _cnn_rnn_measure,
        ),
        Experiment(
            "combos",
            "16-block MLPs (width 64), plain or residual, with or without batch "
            "norm: training steps until the validation accuracy reaches the target.",
            {
                g: ("steps",)
                for g in (
                    "residual_batch",
                    "residual_none",
                    "plain_batch",
                    "plain_none",
                    "best_other",
                )
            },
            _combos_variants,
            _combos_measure,
            ("target",),
        ),
        Experiment(
            "transformer",
            "A pre-norm Transformer classifier (4 blocks, width 32, 10 tokens "
            "of 4 samples) with and without its residual connections.",
            {"residual": _ACC, "plain": _ACC},
            _transformer_variants,
            _transformer_measure,
        ),
    )
}
