"""The experiments of the claims study, one table (:data:`EXPERIMENTS`).

An :class:`Experiment` says which variants it trains (each at every learning rate of its
grid and every seed) and how it turns the runs at each variant's chosen learning rate into
*groups* of per-seed values (``groups[group][metric] = [seed 0, seed 1, ...]``), which the
protocol's rules read, plus figures. ``outputs`` lists the groups and metrics, so that a
rule naming anything else is an error before the study runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import measures as m


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


DEEP = {"depth": 16, "width": 64}


STACK = {"depth": 8, "width": 64}


def _deep_mlp(residual: bool, norm: str) -> Variant:
    name = f"{'residual' if residual else 'plain'}_{norm}"
    return Variant(name, "mlp", {**DEEP, "norm": norm, "residual": residual})


def _first_layers_variants(s: dict) -> list[Variant]:
    return [_deep_mlp(False, "none"), _deep_mlp(True, "none")]


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


def _depth_mlp_variants(s: dict) -> list[Variant]:
    return [
        Variant(f"d{d}", "mlp", {"depth": d, "width": 128, "norm": "batch"}) for d in s["depths"]
    ]


def _branch_variants(s: dict) -> list[Variant]:
    return [_deep_mlp(True, "batch"), _deep_mlp(True, "none")]


def _stack(name: str, **options) -> Variant:
    return Variant(name, "stack", {**STACK, **options}, probes=("santurkar",))


def _landscape_variants(s: dict) -> list[Variant]:
    return [_stack(g, norm=n) for g, n in m.STACK_NORMS.items()]


def _lr_range_variants(s: dict) -> list[Variant]:
    return [
        Variant(g, "stack", {**STACK, "norm": g, "init": "he"}, optimizer="sgd", tune=False)
        for g in ("none", "batch")
    ]


def _init_variants(s: dict) -> list[Variant]:
    return [
        Variant(f"{g}_x{k:g}", "stack", {**STACK, "norm": g, "scale": k})
        for g in ("none", "batch")
        for k in s["scales"]
    ]


def _order_variants(s: dict) -> list[Variant]:
    return [
        Variant(o, "stack", {**STACK, "norm": "batch", "order": o}) for o in ("before", "after")
    ]


def _batch_size_variants(s: dict) -> list[Variant]:
    return [
        Variant(f"{g}_b{b}", "stack", {**STACK, "norm": g}, overrides={"batch_size": b})
        for g in ("batch", "layer", "group")
        for b in s["batch_sizes"]
    ]


def _cnn_rnn_variants(s: dict) -> list[Variant]:
    cnn = [Variant(f"cnn_{n}", "resnet1d", {"depth": 8, "norm": n}) for n in m.NORM3]
    rnn = [Variant(f"rnn_{n}", "gru", {"hidden": 64, "steps": 10, "norm": n}) for n in m.NORM3]
    return cnn + rnn


def _combos_variants(s: dict) -> list[Variant]:
    return [_deep_mlp(r, n) for r in (True, False) for n in ("batch", "none")]


def _transformer_variants(s: dict) -> list[Variant]:
    base = {"depth": 4, "dim": 32, "heads": 4, "steps": 10}
    return [
        Variant(g, "transformer", {**base, "residual": g == "residual"})
        for g in ("residual", "plain")
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
            m.first_layers,
        ),
        Experiment(
            "depth",
            "1-D ResNets and their plain twins (batch norm) over depth: test accuracy "
            "and the first/last gradient norm at init.",
            {
                f"{k}_{e}": ("test_acc", "grad_first_over_last", "grad_imbalance")
                for k in ("residual", "plain")
                for e in ("deep", "shallow")
            },
            _depth_variants,
            m.depth,
            ("depths", "widths"),
        ),
        Experiment(
            "depth-mlp",
            "The depth study's residual batch-norm MLP (width 128) at each depth, "
            "now with its learning rate tuned and several seeds.",
            {"deep": _ACC, "shallow": _ACC},
            _depth_mlp_variants,
            m.depth_mlp,
            ("depths",),
        ),
        Experiment(
            "branch",
            "A residual MLP of 16 post-activation blocks, a = ReLU(F(a) + a) (batch "
            "norm): the norm of each block's branch over its skip input, at init and after "
            "every epoch.",
            {"residual": ("ratio_init", "ratio_end", "ratio_growth")},
            _branch_variants,
            m.branch,
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
                    "grad_predictiveness",
                    "gap",
                    "grad_variability",
                    "test_acc",
                )
                for g in m.STACK_NORMS
            },
            _landscape_variants,
            m.landscape,
        ),
        Experiment(
            "lr-range",
            "The 8-layer stack with and without batch norm, trained with SGD "
            "(momentum 0.9) at every learning rate of a wide sweep.",
            {g: ("max_lr", "best_lr") for g in ("none", "batch")},
            _lr_range_variants,
            m.lr_range,
        ),
        Experiment(
            "init",
            "The 8-layer stack with and without batch norm, every weight matrix "
            "scaled by x0.1 to x10 after the default initialization.",
            {g: ("spread",) for g in ("none", "batch")},
            _init_variants,
            m.init,
            ("scales",),
        ),
        Experiment(
            "order",
            "The 8-layer stack with batch norm before the ReLU (Linear-BN-ReLU) and "
            "after it (Linear-ReLU-BN).",
            {"before": _ACC, "after": _ACC},
            _order_variants,
            m.order,
        ),
        Experiment(
            "batch-size",
            "The 8-layer stack with batch, layer and group norm, trained at "
            "several batch sizes for the same number of epochs.",
            {g: ("spread",) for g in ("batch", "layer", "group")},
            _batch_size_variants,
            m.batch_size,
            ("batch_sizes",),
        ),
        Experiment(
            "cnn-rnn",
            "A 1-D ResNet-8 and a GRU over MNIST-1D as 10 patches of 4, each with "
            "batch, layer and no norm (GRU: layer norm inside the cell, Ba et al. 2016; batch "
            "norm on the input projection, Laurent et al. 2016).",
            {f"{k}_{n}": _ACC for k in ("cnn", "rnn") for n in m.NORM3},
            _cnn_rnn_variants,
            m.cnn_rnn,
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
                )
            },
            _combos_variants,
            m.combos,
            ("target",),
        ),
        Experiment(
            "transformer",
            "A pre-norm Transformer classifier (4 blocks, width 32, 10 tokens "
            "of 4 samples) with and without its residual connections.",
            {"residual": _ACC, "plain": _ACC},
            _transformer_variants,
            m.transformer,
        ),
    )
}
