"""Turning measurements into a verdict: several signals, each with its threshold, the
verdict they point to and how far past the threshold they are; the place it starts; how
sure it is; and what to change.

The signals (thresholds in :class:`Thresholds`, overridable), at initialization:

- ``non-finite``: a NaN or Inf in the loss, an activation or a gradient.
- ``grad_ratio``: the first layer's weight-gradient norm over the last's, below
  ``vanishing_ratio`` (1e-3, AUTOTRAINER's value) or above ``exploding_ratio`` (100;
  AUTOTRAINER uses 70: healthy residual stacks sit between 0.02 and 25 at
  initialization, plain batch-norm stacks at 1e9). Layers that get no gradient only
  because a parameter in front of them starts at exactly zero (a zero-initialized head,
  ReZero gates, a zero last-norm scale) are left out: they open at the first step.
- ``relative_grad``: the median layer's gradient below ``min_relative_grad`` (1e-7) of its
  weight norm: every layer starved alike, which a ratio cannot see.
- ``zero_chain``: layers that still get no gradient after the zero-initialized parameters
  in front of them take one step (a chain of zeros: all weights at zero) or no gradient
  at all with nothing to open.
- ``loss_scale``: a cross-entropy loss at initialization above ``loss_scale`` (4) times
  chance, log(C) for C classes: the output is far off scale (weights drawn too large).
- ``activation_growth``: the activation variance from the first block to the last grows
  beyond ``signal_growth`` (1e3). Shrinking below ``signal_decay`` (1e-3) is reported as
  a finding only: default-initialized GELU stacks shrink it 1e-8x and still train. A
  variance under ``VARIANCE_RESOLUTION`` (1e-13) of its block's mean square is rounding:
  the last block's then gives an upper bound, the first block's no signal.
- ``affine``: a model of two weight layers or more is an affine map of its input
  (checked at midpoints of the batch in eval mode; not while zero gates make its blocks
  identities): however deep, it learns what one linear layer learns.

And with ``steps=K`` (a few optimizer steps on the batch, :mod:`.training`):

- ``loss_rise``: the loss ends above ``loss_rise`` (2) times where it started, peaks
  above ``loss_spike`` (20) times it, or turns non-finite: the learning rate is far too
  large for this model.
- ``loss_progress``: the loss falls by less than ``loss_progress`` (2%) of its start
  while the median layer's weights change by less than ``min_update`` (1e-4) per step:
  the learning rate is far too small (a slow start with normal updates is not stalled).
- ``frozen_layers``: the first layer's relative weight update is below ``frozen_ratio``
  (1e-3) times the last layer's: the first layers do not train.
- ``update_size``: the median layer's relative update per step is above ``max_update``
  (0.1); ~1e-3 is typical.

The verdict is the one its fired signals point to most strongly (non-finite first);
``confidence`` is ``high`` when two signals agree or one is a decade past its threshold,
``low`` when fired signals disagree, ``medium`` otherwise. Where it starts: scanning from
the output back to the input, the first layer whose gradient, relative to the last
layer's, crosses the threshold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .._checks import check_float
from ..errors import UsageError
from .remedies import remedies as _remedies
from .signals import Evidence, Signal, Verdict, _signal
from .signals import forward_signals as _forward_signals
from .signals import gradient_signals as _gradient_signals
from .signals import training_signals as _training_signals

__all__ = ["Evidence", "Judgement", "LayerGrad", "Signal", "Thresholds", "Verdict", "judge"]


@dataclass(frozen=True)
class Thresholds:
    vanishing_ratio: float = 1e-3
    exploding_ratio: float = 1e2
    min_relative_grad: float = 1e-7
    dead_fraction: float = 0.7  # AUTOTRAINER's "dying ReLU" level (a finding)
    signal_growth: float = 1e3  # last/first block variance above this
    signal_decay: float = 1e-3  # ... or below this
    loss_scale: float = 4.0  # cross-entropy at init above this many times log(C)
    affine_tolerance: float = 1e-3  # relative deviation from an affine map
    loss_rise: float = 2.0  # steps: the loss ends above this many times its start
    loss_spike: float = 20.0  # steps: ... or peaks above this many times its start
    loss_progress: float = 0.02  # steps: the loss falls by less than this fraction
    frozen_ratio: float = 1e-3  # steps: first-layer update / last-layer update
    max_update: float = 0.1  # steps: median relative update per step above this
    min_update: float = 1e-4  # steps: below this per step (with the loss flat): stalled

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            check_float(name, value, low=0.0, low_inclusive=False)
        for low, high in (
            ("vanishing_ratio", "exploding_ratio"),
            ("signal_decay", "signal_growth"),
            ("min_update", "max_update"),
        ):
            if getattr(self, low) >= getattr(self, high):
                raise UsageError(
                    f"{low}={getattr(self, low):g} must be below {high}={getattr(self, high):g}"
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
    signals: list[Signal] = field(default_factory=list)
    confidence: str = "medium"


def judge(
    layers: list[LayerGrad],
    blocks: list,
    activations: dict,
    loss: float,
    thresholds: Thresholds,
    structure: dict,
    evidence: Evidence | None = None,
) -> Judgement:
    """Decide the verdict from the measured layers, blocks, activations and ``evidence``.

    ``structure`` says what the model has: ``has_skip``, ``has_norm``, ``post_norm``,
    ``norm_kinds`` (a list of class names), ``closed_gates`` and ``zero_init``.
    """
    evidence = evidence or Evidence()
    considered = _considered(layers, evidence)
    grads = [layer.grad_norm for layer in considered]
    ratio = _first_last_ratio(grads)
    nonfinite = _nonfinite_judgement(layers, activations, loss, ratio, structure)
    if nonfinite is not None:
        return nonfinite
    signals = _gradient_signals(considered, ratio, thresholds, evidence)
    signals += _forward_signals(blocks, loss, thresholds, evidence)
    signals += _training_signals(evidence.training, thresholds)
    verdict, confidence = _decide(signals, trained=evidence.training is not None)
    start = _start(considered, ratio, verdict, thresholds, signals, evidence)
    findings = _findings(considered, ratio, thresholds, structure, evidence, signals, start)
    dead = _dead_units_finding(activations, thresholds)
    if dead is not None:
        findings.append(dead)
    remedies = _remedies(verdict, structure, dead is not None, signals)
    return Judgement(verdict, ratio, start, findings, remedies, signals, confidence)


def _considered(layers: list[LayerGrad], evidence: Evidence) -> list[LayerGrad]:
    """The layers the gradient signals look at: all of them, or, when some parameters
    start at zero, those that get a gradient now (the others wait for the gates)."""
    if not evidence.gates:
        return layers
    return [layer for layer in layers if layer.grad_norm != 0]


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
    signal = _signal("non-finite", None, "finite", True, Verdict.NONFINITE, 3.0, findings[0])
    return Judgement(Verdict.NONFINITE, ratio, where, findings, remedies, [signal], "high")


def _decide(signals: list[Signal], trained: bool) -> tuple[Verdict, str]:
    """The verdict the fired signals point to most strongly, and how sure it is. Healthy
    is ``high`` only after training steps: at initialization the learning rate is unseen."""
    fired = [s for s in signals if s.fired]
    if any(s.verdict is Verdict.NONFINITE for s in fired):
        return Verdict.NONFINITE, "high"
    if not fired:
        return Verdict.HEALTHY, "high" if trained else "medium"
    weight: dict[Verdict, float] = {}
    for s in fired:
        weight[s.verdict] = weight.get(s.verdict, 0.0) + s.strength
    order = (Verdict.EXPLODING, Verdict.VANISHING, Verdict.STALLED, Verdict.LINEAR)
    verdict = max(order, key=lambda v: (weight.get(v, 0.0), -order.index(v)))
    agreeing = [s for s in fired if s.verdict is verdict]
    if len(weight) > 1:
        return verdict, "low"
    return verdict, "high" if len(agreeing) >= 2 or agreeing[0].strength >= 1 else "medium"


def _start(layers, ratio, verdict, t: Thresholds, signals, evidence) -> str | None:
    grads = [layer.grad_norm for layer in layers]
    fired = {s.name for s in signals if s.fired and s.verdict is verdict}
    if "grad_ratio" in fired:
        crosses = (
            (lambda r: r < t.vanishing_ratio)
            if verdict is Verdict.VANISHING
            else (lambda r: r > t.exploding_ratio)
        )
        return layers[_scan_from_output(grads, crosses)].name
    if "zero_chain" in fired:
        names = (evidence.stuck if evidence.gates else evidence.silent) or []
        return names[-1] if names else (layers[-1].name if layers else None)
    if "relative_grad" in fired and layers:
        return layers[-1].name
    return None


def _findings(layers, ratio, t: Thresholds, structure, evidence, signals, start) -> list[str]:
    findings = []
    grads = [layer.grad_norm for layer in layers]
    if len(grads) >= 2:
        findings.append(
            f"First/last layer gradient-norm ratio: {ratio:.2e} (first {grads[0]:.2e}, "
            f"last {grads[-1]:.2e}); healthy range "
            f"[{t.vanishing_ratio:.0e}, {t.exploding_ratio:.0e}]."
        )
    if evidence.gates:
        n = len(evidence.gates)
        findings.append(
            f"{n} parameter(s) start at zero ({', '.join(evidence.gates[:3])}"
            f"{', ...' if n > 3 else ''}; zero-initialized heads, ReZero/SkipInit gates, zero "
            f"last-norm scales): {len(evidence.silent)} layer(s) behind them get no gradient "
            f"until they move, by design; they are left out of the gradient ratio."
        )
    for s in signals:
        shrinks = s.name == "activation_growth" and s.value is not None and s.value < t.signal_decay
        if (s.fired and s.name != "grad_ratio") or shrinks:
            findings.append(s.text)
    if start is not None and any(s.fired and s.name == "grad_ratio" for s in signals):
        vanishing = ratio < t.vanishing_ratio
        word = "fall below" if vanishing else "rise above"
        limit = t.vanishing_ratio if vanishing else t.exploding_ratio
        index = [layer.name for layer in layers].index(start)
        findings.append(
            f"Going back from the output, gradients first {word} {limit:.0e} times the "
            f"output layer's at {start} (layer {index + 1} of {len(layers)})."
        )
    return findings


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
