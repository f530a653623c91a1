"""Turning measurements into a verdict, the place it starts, and what to change.

Thresholds (all in :class:`Thresholds`, overridable):

- ``non-finite``: a NaN or Inf in the loss, an activation or a gradient.
- ``vanishing``: the first layer's weight-gradient norm is below ``vanishing_ratio``
  (1e-3, AUTOTRAINER's value) times the last layer's, or the median layer's gradient is
  below ``min_relative_grad`` (1e-7) of its weight norm (every layer starved alike, which
  a ratio cannot see).
- ``exploding``: the first/last ratio is above ``exploding_ratio`` (100). AUTOTRAINER
  uses 70; measured on our 48-block MLPs at initialization, healthy residual stacks sit
  between 0.02 and 25, plain batch-norm stacks at 1e9, so 100 leaves a margin both ways.
- otherwise ``healthy``.

Where it starts: scanning from the output back to the input, the first layer whose
gradient norm, relative to the last layer's, crosses the threshold.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from enum import Enum

from .._checks import check_float
from ..errors import UsageError


class Verdict(str, Enum):
    HEALTHY = "healthy"
    VANISHING = "vanishing"
    EXPLODING = "exploding"
    NONFINITE = "non-finite"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Thresholds:
    vanishing_ratio: float = 1e-3
    exploding_ratio: float = 1e2
    min_relative_grad: float = 1e-7
    dead_fraction: float = 0.7  # AUTOTRAINER's "dying ReLU" level
    signal_growth: float = 1e3  # last/first block variance above this is a finding
    signal_decay: float = 1e-3  # ... or below this

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            check_float(name, value, low=0.0, low_inclusive=False)
        if self.vanishing_ratio >= self.exploding_ratio:
            raise UsageError(
                f"vanishing_ratio={self.vanishing_ratio:g} must be below "
                f"exploding_ratio={self.exploding_ratio:g}"
            )


@dataclass(frozen=True)
class LayerGrad:
    name: str
    kind: str
    grad_norm: float
    weight_norm: float

    @property
    def relative(self) -> float:
        return self.grad_norm / self.weight_norm if self.weight_norm > 0 else float("nan")


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    grad_ratio: float
    start_layer: str | None
    findings: list[str]
    remedies: list[str]


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def judge(
    layers: list[LayerGrad],
    blocks: list,
    activations: dict,
    loss: float,
    thresholds: Thresholds,
    structure: dict,
) -> Judgement:
    """Decide the verdict from the measured layers, blocks and activations.

    ``structure`` says what the model has: ``has_skip``, ``has_norm``, ``post_norm``,
    ``norm_kinds`` (a list of class names).
    """
    grads = [layer.grad_norm for layer in layers]
    ratio = _first_last_ratio(grads)
    # 1. Non-finite values anywhere.
    nonfinite = _nonfinite_judgement(layers, activations, loss, ratio, structure)
    if nonfinite is not None:
        return nonfinite
    # 2. Gradients: ratio between the first and the last layer, and absolute starvation.
    verdict, start, findings = _gradient_verdict(layers, ratio, thresholds, structure)
    # 3. Signal propagation and dead units: findings, whatever the verdict.
    findings += _signal_findings(blocks, thresholds)
    dead_finding = _dead_units_finding(activations, thresholds)
    if dead_finding is not None:
        findings.append(dead_finding)
    return Judgement(
        verdict,
        ratio,
        layers[start].name if start is not None else None,
        findings,
        _remedies(verdict, structure, dead_finding is not None),
    )


def _first_last_ratio(grads: list[float]) -> float:
    """The first layer's gradient norm over the last's: 0 when both are 0, NaN when only
    the last is (or with fewer than two layers)."""
    ratio = grads[0] / grads[-1] if len(grads) >= 2 and grads[-1] > 0 else float("nan")
    if len(grads) >= 2 and grads[-1] == 0 and grads[0] == 0:
        ratio = 0.0
    return ratio


def _nonfinite_judgement(
    layers: list[LayerGrad], activations: dict, loss: float, ratio: float, structure: dict
) -> Judgement | None:
    """The non-finite verdict, with where NaN/Inf first appear, or None if all is finite."""
    bad_acts = [name for name, a in activations.items() if a.nonfinite]
    bad_grads = [layer.name for layer in layers if not math.isfinite(layer.grad_norm)]
    if math.isfinite(loss) and not bad_acts and not bad_grads:
        return None
    findings: list[str] = []
    where = bad_acts[0] if bad_acts else (bad_grads[-1] if bad_grads else None)
    if not math.isfinite(loss):
        findings.append(f"The loss is {loss}.")
    if bad_acts:
        findings.append(
            f"Non-finite activations first appear at {bad_acts[0]} "
            f"({len(bad_acts)} module output(s) affected)."
        )
    if bad_grads:
        findings.append(
            f"{len(bad_grads)} layer(s) have non-finite gradients, "
            f"nearest the output: {bad_grads[-1]}."
        )
    remedies = [
        "Check the inputs for NaN/Inf and the loss for log(0) or division by zero.",
        "Lower the learning rate, add warm-up, or clip gradients (torch.nn.utils.clip_grad_norm_).",
    ]
    if not structure["has_norm"]:
        remedies.append("Add normalization (norm='batch' or 'layer') to bound activations.")
    return Judgement(Verdict.NONFINITE, ratio, where, findings, remedies)


def _gradient_verdict(
    layers: list[LayerGrad], ratio: float, thresholds: Thresholds, structure: dict
) -> tuple[Verdict, int | None, list[str]]:
    """Vanishing, exploding or healthy from finite gradients: the verdict, the index of
    the layer where it starts (None if healthy) and the findings behind it."""
    grads = [layer.grad_norm for layer in layers]
    findings: list[str] = []
    verdict = Verdict.HEALTHY
    start = None
    # Zero-initialized gates (ReZero, SkipInit) silence their branches' weights at
    # initialization by design: those zero gradients are not starvation.
    gated = structure.get("closed_gates", 0) > 0
    relative = [
        layer.relative
        for layer in layers
        if _finite(layer.relative) and not (gated and layer.grad_norm == 0)
    ]
    if gated:
        silent = sum(1 for layer in layers if layer.grad_norm == 0)
        findings.append(
            f"{structure['closed_gates']} residual gate(s) start at zero "
            f"(ReZero/SkipInit): {silent} layer(s) inside gated branches get no "
            f"gradient until the gates move, by design; they are left out of the "
            f"verdict."
        )
    median_relative = statistics.median(relative) if relative else float("nan")
    if len(grads) >= 2 and grads[-1] > 0:
        if ratio < thresholds.vanishing_ratio:
            verdict = Verdict.VANISHING
            start = _scan_from_output(grads, lambda r: r < thresholds.vanishing_ratio)
        elif ratio > thresholds.exploding_ratio:
            verdict = Verdict.EXPLODING
            start = _scan_from_output(grads, lambda r: r > thresholds.exploding_ratio)
    if verdict is Verdict.HEALTHY and (
        grads
        and max(grads) == 0
        or _finite(median_relative)
        and median_relative < thresholds.min_relative_grad
    ):
        verdict = Verdict.VANISHING
        start = len(grads) - 1
        findings.append(
            f"The median layer's gradient is {median_relative:.1e} of its weight "
            f"norm (threshold {thresholds.min_relative_grad:.0e}): every layer "
            f"would barely move."
        )
    if len(grads) >= 2:
        findings.insert(
            0,
            f"First/last layer gradient-norm ratio: {ratio:.2e} (first "
            f"{grads[0]:.2e}, last {grads[-1]:.2e}); healthy range "
            f"[{thresholds.vanishing_ratio:.0e}, {thresholds.exploding_ratio:.0e}].",
        )
    if start is not None and verdict is not Verdict.HEALTHY:
        word = "fall below" if verdict is Verdict.VANISHING else "rise above"
        limit = (
            thresholds.vanishing_ratio
            if verdict is Verdict.VANISHING
            else thresholds.exploding_ratio
        )
        findings.append(
            f"Going back from the output, gradients first {word} {limit:.0e} "
            f"times the output layer's at {layers[start].name} (layer {start + 1} "
            f"of {len(layers)})."
        )
    return verdict, start, findings


def _signal_findings(blocks: list, thresholds: Thresholds) -> list[str]:
    """A finding if the activation variance grows or shrinks too much across the blocks."""
    variances = [b.var for b in blocks if _finite(b.var)]
    if len(variances) >= 2 and variances[0] > 0:
        growth = variances[-1] / variances[0]
        if growth > thresholds.signal_growth or growth < thresholds.signal_decay:
            trend = "grows" if growth > 1 else "shrinks"
            return [
                f"Activation variance {trend} {growth:.1e}x from the first block "
                f"({variances[0]:.2e}) to the last ({variances[-1]:.2e})."
            ]
    return []


def _dead_units_finding(activations: dict, thresholds: Thresholds) -> str | None:
    """A finding if some ReLU outputs have too many dead units, else None."""
    dead = {
        n: a.dead_fraction
        for n, a in activations.items()
        if a.dead_fraction is not None and a.dead_fraction >= thresholds.dead_fraction
    }
    if not dead:
        return None
    worst = max(dead, key=dead.get)
    return (
        f"{len(dead)} ReLU output(s) have at least {thresholds.dead_fraction:.0%} dead "
        f"units (worst: {worst}, {dead[worst]:.0%})."
    )


def _scan_from_output(grads: list[float], crosses) -> int:
    """Index of the first layer, going from the output back, whose ratio to the last
    layer's gradient crosses the threshold."""
    last = grads[-1]
    for i in range(len(grads) - 1, -1, -1):
        if crosses(grads[i] / last):
            return i
    return 0


def _remedies(verdict: Verdict, structure: dict, dead_units: bool) -> list[str]:
    has_skip, has_norm = structure["has_skip"], structure["has_norm"]
    out: list[str] = []
    if verdict is Verdict.VANISHING:
        if not has_skip:
            out.append(
                "Add skip connections (residual=True): y = F(x) + x gives gradients "
                "a path around every block."
            )
        if not has_norm:
            out.append(
                "Add normalization (norm='batch' for convnets and MLPs, 'layer' or "
                "'rms' for Transformers) so each layer's signal keeps unit scale."
            )
        out.append(
            "Check the initialization: He/Kaiming init for ReLU layers keeps the "
            "variance of activations and gradients constant with depth."
        )
        if has_skip and structure["post_norm"]:
            out.append(
                "Move normalization inside the branch (placement='pre') so the skip "
                "path stays an identity from output to input."
            )
    elif verdict is Verdict.EXPLODING:
        if not has_skip:
            if any("BatchNorm" in kind for kind in structure["norm_kinds"]):
                out.append(
                    "Add skip connections (residual=True): deep plain stacks with batch "
                    "norm have exploding gradients at initialization (Yang et al. 2019)."
                )
            else:
                out.append("Add skip connections (residual=True).")
        if structure["post_norm"]:
            out.append(
                "Use pre-norm placement (placement='pre'): post-norm stacks have large "
                "gradients near the output at initialization (Xiong et al. 2020)."
            )
        if has_skip is not False:  # a plain block scaled to zero outputs zero, not its input
            out.append(
                "Scale the residual branches at initialization (scale='rezero' or "
                "'layerscale', or zero_init_last=True) so each block starts near the "
                "identity."
            )
        out.append("Lower the learning rate, add warm-up, or clip gradients.")
    if dead_units:
        out.append(
            "Many ReLU units are dead: lower the learning rate, use a leaky or "
            "smooth activation (activation='gelu'), or normalize before the ReLU."
        )
    return out
