"""The signals a verdict is judged from: what each measures, its threshold, the verdict it
points to when it fires and how strongly (decades past its threshold). The thresholds
are :class:`~resnorm.diagnostics.verdict.Thresholds`; the list of signals and their
defaults is in :mod:`resnorm.diagnostics.verdict`'s docstring."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from .stats import VARIANCE_RESOLUTION

if TYPE_CHECKING:
    from .verdict import LayerGrad, Thresholds


class Verdict(str, Enum):
    HEALTHY = "healthy"
    VANISHING = "vanishing"
    EXPLODING = "exploding"
    NONFINITE = "non-finite"
    STALLED = "stalled"
    LINEAR = "linear"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Signal:
    """One measured signal: its ``value``, the ``limit`` it is held to (as text), whether
    it ``fired``, the ``verdict`` it points to when it fires, its ``strength`` (decades
    past the threshold, 0 when not fired) and one sentence saying what was seen."""

    name: str
    value: float | None
    limit: str
    fired: bool
    verdict: Verdict | None
    strength: float
    text: str

    def to_dict(self) -> dict:
        out = asdict(self)
        out["verdict"] = self.verdict.value if self.verdict is not None else None
        return out


@dataclass
class Evidence:
    """What the verdict is judged from besides the layers, blocks and activations:
    ``classes`` (C of a cross-entropy loss, else ``None``); ``gates`` (parameters that
    start at exactly zero and receive a gradient) and ``silent`` (layers with no gradient
    at all); ``stuck`` (silent layers still without one after the gates' first step);
    ``affine`` (the relative deviation from an affine map, ``None`` when not checked);
    ``training`` (a :class:`~resnorm.diagnostics.training.TrainingTrace` with ``steps``);
    ``first_layer`` (the first weight layer in forward order) and ``depth`` (how many weight
    layers ran)."""

    classes: int | None = None
    gates: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)
    stuck: list[str] | None = None
    affine: float | None = None
    training: object | None = None
    first_layer: str | None = None
    zeros: list = field(default_factory=list)  # (name, parameter) exactly zero at init
    depth: int = 0


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def _decades(value: float, limit: float) -> float:
    """How far past its threshold a fired signal is, in decades (at least 0.1)."""
    if value <= 0 or limit <= 0 or not math.isfinite(value):
        return 3.0
    return min(3.0, max(0.1, abs(math.log10(value / limit))))


def _signal(name, value, limit_text, fired, verdict, strength, text) -> Signal:
    return Signal(
        name,
        value,
        limit_text,
        bool(fired),
        verdict if fired else None,
        strength if fired else 0.0,
        text,
    )


def gradient_signals(
    layers: list[LayerGrad], ratio: float, t: Thresholds, evidence: Evidence
) -> list[Signal]:
    grads = [layer.grad_norm for layer in layers]
    out = []
    if len(grads) >= 2 and grads[-1] > 0:
        low, high = ratio < t.vanishing_ratio, ratio > t.exploding_ratio
        limit = t.vanishing_ratio if low else t.exploding_ratio
        out.append(
            _signal(
                "grad_ratio",
                ratio,
                f"[{t.vanishing_ratio:.0e}, {t.exploding_ratio:.0e}]",
                low or high,
                Verdict.VANISHING if low else Verdict.EXPLODING,
                _decades(ratio, limit),
                f"First/last layer gradient-norm ratio {ratio:.2e} "
                f"({'below' if low else 'above' if high else 'within'} "
                f"[{t.vanishing_ratio:.0e}, {t.exploding_ratio:.0e}]).",
            )
        )
    relative = [layer.relative for layer in layers if _finite(layer.relative)]
    if relative:
        median = statistics.median(relative)
        out.append(
            _signal(
                "relative_grad",
                median,
                f">= {t.min_relative_grad:.0e}",
                median < t.min_relative_grad,
                Verdict.VANISHING,
                _decades(median, t.min_relative_grad),
                f"The median layer's gradient is {median:.1e} of its weight norm.",
            )
        )
    stuck = evidence.stuck if evidence.gates else evidence.silent
    all_silent = bool(grads) and max(grads) == 0 and not evidence.gates
    if stuck or all_silent:
        names = stuck or [layer.name for layer in layers]
        n_all = len(evidence.silent) + len(layers) if evidence.gates else len(layers)
        fraction = len(names) / max(1, n_all)
        fired = all_silent or fraction >= 0.5 or evidence.first_layer in names
        why = (
            "even after the zero-initialized parameters in front of them take a step"
            if evidence.gates
            else "at all"
        )
        out.append(
            _signal(
                "zero_chain",
                fraction,
                "< 50% of the layers",
                fired,
                Verdict.VANISHING,
                3.0 if all_silent else 1.0 + fraction,
                f"{len(names)} of {n_all} layer(s) get no gradient {why}, the first layer "
                f"{'among them' if evidence.first_layer in names else 'not'} (first: {names[0]}).",
            )
        )
    return out


def forward_signals(blocks: list, loss: float, t: Thresholds, evidence: Evidence) -> list[Signal]:
    out = []
    if evidence.classes is not None and evidence.classes >= 2:
        chance = math.log(evidence.classes)
        scale = loss / chance
        out.append(
            _signal(
                "loss_scale",
                scale,
                f"<= {t.loss_scale:g} x log(C)",
                scale > t.loss_scale,
                Verdict.EXPLODING,
                _decades(scale, t.loss_scale),
                f"The loss at initialization is {loss:.3g}, {scale:.3g}x chance (log {evidence.classes}"
                f" = {chance:.3g}).",
            )
        )
    growth_signal = _activation_growth(blocks, t)
    if growth_signal is not None:
        out.append(growth_signal)
    # One linear layer is meant to be one; a model with zero gates is the identity per
    # block at initialization, and stops being affine once they open.
    if evidence.affine is not None and evidence.depth >= 2 and not evidence.gates:
        affine = evidence.affine <= t.affine_tolerance
        out.append(
            _signal(
                "affine",
                evidence.affine,
                f"> {t.affine_tolerance:.0e}",
                affine,
                Verdict.LINEAR,
                1.0,
                f"The model is {'an' if affine else 'not an'} affine map of its input (deviation "
                f"{evidence.affine:.1e} at midpoints of the batch, eval mode).",
            )
        )
    return out


def _activation_growth(blocks: list, t: Thresholds) -> Signal | None:
    """The activation variance from the first block to the last. A block whose output is
    exactly zero starts at zero by design (a zero head or gate) and is left out; a variance
    under :data:`~.stats.VARIANCE_RESOLUTION` of its block's mean square is rounding, not a
    measurement: the last block's is then an upper bound, the first block's says nothing."""
    measured = [b for b in blocks if _finite(b.var) and b.var > 0]
    if len(measured) < 2 or _unresolved(measured[0]):
        return None
    first, last = measured[0].var, measured[-1].var
    if _unresolved(measured[-1]):
        bound = VARIANCE_RESOLUTION * (measured[-1].sq_mean + last) / first
        text = (
            f"Activation variance shrinks below {bound:.1e}x from the first block "
            f"({first:.2e}) to the last (under {bound * first:.1e}: the rounding level of its "
            "mean square, where the samples no longer differ)."
        )
        growth, up = bound, False
    else:
        growth = last / first
        up = growth > t.signal_growth
        text = (
            f"Activation variance {'grows' if growth > 1 else 'shrinks'} {growth:.1e}x from "
            f"the first block ({first:.2e}) to the last ({last:.2e})."
        )
    # Shrinking activations are a finding, not a verdict: networks at PyTorch's
    # default init shrink them 1e-8x over 8 GELU layers and still train.
    limit = f"<= {t.signal_growth:.0e}"
    strength = _decades(growth, t.signal_growth)
    return _signal("activation_growth", growth, limit, up, Verdict.EXPLODING, strength, text)


def _unresolved(block) -> bool:
    return not block.var >= VARIANCE_RESOLUTION * (block.sq_mean + block.var)


def training_signals(trace, t: Thresholds) -> list[Signal]:
    """The signals of a :class:`~.training.TrainingTrace`: the loss (rising, non-finite,
    or flat while the weights barely move) and the weight updates (frozen first layers,
    updates far too large)."""
    if trace is None or not trace.losses:
        return []
    losses = trace.losses
    if not all(math.isfinite(v) for v in losses):
        step = next(i for i, v in enumerate(losses) if not math.isfinite(v))
        text = f"The loss turns non-finite at step {step} of {len(losses) - 1}."
        return [_signal("loss_rise", None, "finite", True, Verdict.NONFINITE, 3.0, text)]
    return _loss_signals(losses, trace.median_update, t) + _update_signals(trace, t)


def _loss_signals(losses: list[float], u: float | None, t: Thresholds) -> list[Signal]:
    start = losses[0]
    tail = losses[-max(1, len(losses) // 5) :]
    end = sum(tail) / len(tail)
    rise = end / start if start > 0 else float("nan")
    peak = max(losses) / start if start > 0 else float("nan")
    spiked = _finite(peak) and peak > t.loss_spike
    progress = (start - min(losses)) / start if start > 0 else float("nan")
    slow = u is not None and u < t.min_update
    moved = f", the weights by {u:.1e} of their norm per step." if u is not None else "."
    return [
        _signal(
            "loss_rise",
            rise,
            f"<= {t.loss_rise:g}x the start, peak <= {t.loss_spike:g}x",
            _finite(rise) and rise > t.loss_rise or spiked,
            Verdict.EXPLODING,
            _decades(peak, t.loss_spike) if spiked else _decades(rise, t.loss_rise),
            f"Over {len(losses) - 1} steps the loss goes from {start:.3g} to {end:.3g}"
            + (f", peaking at {max(losses):.3g}." if spiked else "."),
        ),
        _signal(
            "loss_progress",
            progress,
            f">= {t.loss_progress:.0%} of the start, or updates >= {t.min_update:.0e}",
            _finite(progress) and progress < t.loss_progress and slow and not spiked,
            Verdict.STALLED,
            _decades(max(progress, 1e-9), t.loss_progress),
            f"The loss falls by {progress:.1%} at most over the steps{moved}",
        ),
    ]


def _update_signals(trace, t: Thresholds) -> list[Signal]:
    out = []
    first, last, u = trace.first_update, trace.last_update, trace.median_update
    if first is not None and last is not None and last > 0:
        frozen = first / last
        out.append(
            _signal(
                "frozen_layers",
                frozen,
                f">= {t.frozen_ratio:.0e}",
                frozen < t.frozen_ratio,
                Verdict.VANISHING,
                _decades(max(frozen, 1e-30), t.frozen_ratio),
                f"The first layer's weights move {frozen:.1e}x as much as the last layer's.",
            )
        )
    if u is not None:
        out.append(
            _signal(
                "update_size",
                u,
                f"<= {t.max_update:.0e} per step",
                u > t.max_update,
                Verdict.EXPLODING,
                _decades(u, t.max_update),
                f"The median layer's weights change by {u:.1e} of their norm per step.",
            )
        )
    return out
