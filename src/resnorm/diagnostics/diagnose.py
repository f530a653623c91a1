"""``diagnose(model, inputs, targets)``: gradient flow and signal propagation from one batch."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import norms
from .._checks import check_int
from .._io import json_safe
from ..blocks import LayerScale, ResidualAdd, ResidualMLPBlock, ScalarGain, TransformerBlock
from ..errors import UsageError, UsageTypeError
from .evidence import (
    affine_deviation,
    is_zero_candidate,
    probe_batch,
    stuck_after_gates_open,
    zero_parameters,
)
from .norm_stats import compiled_norms
from .outputs import read_output
from .probes import (
    ForwardRecorder,
    find_blocks,
    layer_weights,
    named_parameters,
    parameterized_layers,
    unwrap,
)
from .restore import state_restored
from .stats import ActivationSummary, squared_norms
from .training import TrainingTrace, run_steps
from .verdict import Evidence, LayerGrad, Signal, Thresholds, Verdict, judge

# resnorm's norm classes (from the one table of kinds) and torch.nn's.
NORM_CLASSES = (
    *norms.NORM_CLASSES,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


@dataclass(frozen=True)
class BlockStat:
    """Signal-propagation statistics at a block's output (Brock et al. 2021), and the
    variance of its residual branch and skip path where it has them (``None`` otherwise)."""

    name: str
    sq_mean: float
    var: float
    branch_var: float | None
    skip_var: float | None
    residual: bool | None


@dataclass
class Diagnosis:
    """What :func:`diagnose` measured and concluded. ``verdict`` is a :class:`Verdict`
    (a string enum: ``"healthy"``, ``"vanishing"``, ``"exploding"``, ``"non-finite"``)."""

    verdict: Verdict
    loss: float
    grad_ratio: float
    start_layer: str | None
    layers: list[LayerGrad]
    blocks: list[BlockStat]
    activations: dict[str, ActivationSummary]
    findings: list[str]
    remedies: list[str]
    thresholds: Thresholds
    model_name: str = ""
    structure: dict = field(default_factory=dict)
    signals: list[Signal] = field(default_factory=list)
    confidence: str = "medium"
    training: TrainingTrace | None = None

    @property
    def fired(self) -> list[Signal]:
        """The signals behind the verdict (those past their thresholds)."""
        return [s for s in self.signals if s.fired]

    def summary(self) -> str:
        """The verdict in plain words, how sure it is, and the numbers behind it."""
        fired = {s.name for s in self.fired}
        head = {
            Verdict.HEALTHY: "Gradients flow: no vanishing or exploding gradients at this batch.",
            Verdict.VANISHING: "Gradients vanish on the way back to the first layers.",
            Verdict.EXPLODING: "Gradients explode on the way back to the first layers.",
            Verdict.NONFINITE: "NaN or Inf values appear in the forward or backward pass.",
            Verdict.STALLED: "Training makes no progress: the weights or the loss barely move.",
            Verdict.LINEAR: "The model is a linear map of its input, however deep.",
        }[self.verdict]
        if self.verdict is Verdict.HEALTHY and self.training is not None:
            head = "Gradients flow and training makes progress over the steps."
        if self.verdict is Verdict.EXPLODING and not fired & {"grad_ratio", "activation_growth"}:
            head = (
                "Training diverges: the loss rises over the steps (the learning rate is far "
                "too large for this model)."
                if fired & {"loss_rise", "update_size"}
                else "The output is far off scale at initialization: the loss starts far "
                "above chance."
            )
        sure = (
            f"(confidence {self.confidence}; signals: {', '.join(sorted(fired)) or 'none fired'})"
        )
        return " ".join([head, sure, *self.findings])

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "verdict": self.verdict.value,
            "loss": json_safe(self.loss),
            "grad_ratio": json_safe(self.grad_ratio),
            "start_layer": self.start_layer,
            "findings": self.findings,
            "remedies": self.remedies,
            "structure": self.structure,
            "confidence": self.confidence,
            "signals": [json_safe(sig.to_dict()) for sig in self.signals],
            "training": json_safe(self.training.to_dict()) if self.training else None,
            "thresholds": asdict(self.thresholds),
            "layers": [
                json_safe({**asdict(layer), "relative": layer.relative}) for layer in self.layers
            ],
            "blocks": [{k: json_safe(v) for k, v in asdict(b).items()} for b in self.blocks],
            "activations": {
                k: {kk: json_safe(vv) for kk, vv in asdict(v).items()}
                for k, v in self.activations.items()
            },
        }

    def to_json(self, **kwargs) -> str:
        """JSON (strict: NaN and Inf become null)."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    # Presentation lives in report.py; these are the entry points users look for.
    def table(self):
        from .report import diagnosis_table

        return diagnosis_table(self)

    def figure(self, path=None):
        from .report import diagnosis_figure

        return diagnosis_figure(self, path)

    def write_html(self, path) -> None:
        from .report import write_diagnosis_html

        write_diagnosis_html(self, path)


def default_loss(output: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy for integer class targets, mean squared error for float targets of the
    output's shape, and ``mean(output^2) / 2`` (whose gradient is the output itself) when
    there are no targets."""
    if targets is None:
        return output.float().square().mean() / 2
    if not targets.is_floating_point() and targets.dim() == 1 and output.dim() == 2:
        return F.cross_entropy(output.float(), targets)
    if targets.is_floating_point() and targets.shape == output.shape:
        return F.mse_loss(output.float(), targets.float())
    raise UsageError(
        f"no default loss for output {tuple(output.shape)} and targets "
        f"{tuple(targets.shape)} ({targets.dtype}); pass loss_fn="
    )


def _structure(net: nn.Module, zeros: list | None = None, modules: list | None = None) -> dict:
    """What the model is built of (``modules``: its ``modules()`` when already listed)."""
    zeros = zero_parameters(net) if zeros is None else zeros
    modules = list(net.modules()) if modules is None else modules
    merges = [m for m in modules if isinstance(m, ResidualAdd)]
    torch_layers = [
        m
        for m in modules
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
    ]
    has_skip = (
        any(m.residual for m in merges) if merges else True if torch_layers else None
    )  # None: cannot tell from outside
    post = any(
        isinstance(m, (ResidualMLPBlock, TransformerBlock))
        and m.placement == "post"
        and any(c.residual for c in m.children() if isinstance(c, ResidualAdd))
        for m in modules
    )
    post = post or any(not m.norm_first for m in torch_layers)
    kinds = sorted({type(m).__name__ for m in modules if isinstance(m, NORM_CLASSES)})
    closed = sum(
        1
        for m in modules
        if isinstance(m, (ScalarGain, LayerScale))
        and not bool(getattr(m, "gain", getattr(m, "gamma", None)).detach().any())
    )
    return {
        "has_skip": has_skip,
        "has_norm": bool(kinds),
        "post_norm": post,
        "norm_kinds": kinds,
        "closed_gates": closed,
        "zero_init": bool(zeros),
    }


def _forward_order(called: list[str], layers: list[tuple[str, nn.Module]]) -> list[str]:
    """The layers in the order the forward pass ran them. A layer whose weight got a
    gradient without its forward hook firing (``nn.MultiheadAttention`` uses its
    ``out_proj`` weight functionally) goes right after the layer registered before it, not
    after the output layer, whose gradient the first/last ratio divides by."""
    order = list(called)
    previous = None
    for layer_name, layer in layers:
        if layer_name not in called:
            if all(w.grad is None for w in layer_weights(layer)):
                continue
            order.insert(order.index(previous) + 1 if previous is not None else 0, layer_name)
        previous = layer_name
    return order


def diagnose(
    model: nn.Module,
    inputs,
    targets: torch.Tensor | None = None,
    loss_fn: Callable | None = None,
    *,
    blocks: Iterable[str] | None = None,
    channel_dim: int | None = None,
    thresholds: Thresholds | None = None,
    train_mode: bool = True,
    name: str = "",
    optimizer: torch.optim.Optimizer | None = None,
    steps: int | None = None,
) -> Diagnosis:
    """Measure gradient flow and signal propagation of ``model`` on one batch and judge
    whether it will train (the signals: :mod:`~resnorm.diagnostics.verdict`): a forward
    and backward pass (training mode by default: batch norm uses batch statistics, as in
    Brock et al.), an eval-mode forward on midpoints of the batch (is it affine? asked of
    two weight layers or more, no zero gates, no nonlinearity module run), a forward and
    backward with zero parameters moved a small step (if layers get no gradient; on the
    first :data:`~.evidence.PROBE_BATCH` samples when that is unambiguous), and ``steps``
    steps of ``optimizer`` (20 by default). The model is left as found (parameters, mode,
    buffers, ``.grad``, the optimizer's state, the random generator). Sums are float64: of
    float32 CPU tensors by :mod:`resnorm.kernels`' compiled kernel when it can be had.

    Args:
        model: any ``nn.Module`` (also inside ``torch.compile`` or DDP).
        inputs: a tensor, or a tuple of positional arguments for ``model``.
        targets: labels for the loss (see :func:`default_loss`), or ``None``.
        loss_fn: ``loss_fn(output, targets) -> scalar`` to use instead; it gets the
            model's logits (see :func:`~resnorm.diagnostics.outputs.read_output`), or the
            raw output when it has none. Without ``loss_fn`` or ``targets``, a loss the
            model returns itself (``output.loss``) is used.
        blocks: where to measure signal propagation (default: :func:`find_blocks`);
            ``channel_dim`` their channel axis (default: 1, -1 for Transformer blocks).
        thresholds: the verdict's thresholds (:class:`Thresholds`).
    """
    thresholds, steps = _checked(model, thresholds, optimizer, steps)
    net = unwrap(model)
    named = list(net.named_modules())  # listed once: every pass below reads this list
    layers = parameterized_layers(net, named)
    if not layers:
        raise UsageError("the model has no layer with a weight parameter to measure")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    evidence = Evidence()
    step_loss, probe_loss = _losses(model, args, targets, loss_fn, evidence)
    with state_restored(model, net, train_mode, named):
        compiled = any(hasattr(m, "_orig_mod") for m in (model, getattr(model, "module", None)))
        found = find_blocks(net, blocks, named)
        kernel = compiled_norms(None)  # the compiled statistics, when they can be had
        with ForwardRecorder(net, found, channel_dim, compiled, named, layers, kernel) as recorder:
            loss_value = _backward(step_loss)
        grads, evidence.zeros, gates = _layer_grads(layers, recorder.layer_order, named, kernel)
        by_name = dict(layers)
        order = [(g.name, by_name[g.name]) for g in grads]
        nonlinear = recorder.activation_calls > 0  # a nonlinearity module ran
        _gather_evidence(model, net, args, order, grads, gates, probe_loss, evidence, nonlinear)
        if steps:
            evidence.training = run_steps(model, step_loss, optimizer, steps, order)
    return _conclude(net, recorder, grads, loss_value, thresholds, evidence, name, named)


def _losses(model, args, targets, loss_fn, evidence) -> tuple[Callable, Callable]:
    """The loss of one forward pass on the batch, and the gate probe's: on the first
    samples (see probe_batch), or on the whole batch for a model that runs at its batch
    size only."""

    def step_loss() -> torch.Tensor:
        return _loss(model(*args), targets, loss_fn, evidence)

    def probe_loss() -> torch.Tensor:
        probe_args, probe_targets = probe_batch(args, targets)
        try:
            return _loss(model(*probe_args), probe_targets, loss_fn, evidence)
        except RuntimeError:
            return step_loss()

    return step_loss, probe_loss


def _gather_evidence(model, net, args, layers, grads, gates, probe_loss, evidence, nonlinear):
    """What the verdict needs beyond the gradients of the ``layers`` (in forward order):
    the first layer and depth, the zero ``gates`` and what stays silent behind them
    (``probe_loss``: the pass that asks), and whether the model is affine."""
    evidence.first_layer, evidence.depth = grads[0].name if grads else None, len(grads)
    _gate_evidence(net, layers, grads, gates, probe_loss, evidence)
    # A nonlinearity module that ran settles it; only models without one are checked
    # (a stack of linear layers, or activations called as functions), and only where the
    # verdict reads it: two weight layers or more, and no zero gates.
    if not nonlinear and evidence.depth >= 2 and not evidence.gates:
        evidence.affine = affine_deviation(model, args)


def _conclude(net, recorder, grads, loss_value, thresholds, evidence, name, named) -> Diagnosis:
    """Judge the measurements and bundle them as a :class:`Diagnosis`."""
    block_stats = _block_stats(recorder)
    structure = _structure(net, evidence.zeros, [m for _, m in named])
    verdict = judge(
        grads, block_stats, recorder.activations, loss_value, thresholds, structure, evidence
    )
    return Diagnosis(
        verdict.verdict,
        loss_value,
        verdict.grad_ratio,
        verdict.start_layer,
        grads,
        block_stats,
        recorder.activations,
        verdict.findings,
        verdict.remedies,
        thresholds,
        name or type(net).__name__,
        structure,
        verdict.signals,
        verdict.confidence,
        evidence.training,
    )


DEFAULT_THRESHOLDS = Thresholds()  # frozen: one instance serves every call


def _checked(model, thresholds, optimizer, steps) -> tuple[Thresholds, int]:
    """The argument checks of :func:`diagnose`; the thresholds and the number of steps."""
    if not isinstance(model, nn.Module):
        raise UsageTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    thresholds = thresholds or DEFAULT_THRESHOLDS
    if not isinstance(thresholds, Thresholds):
        raise UsageTypeError(f"thresholds must be a Thresholds, got {type(thresholds).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageTypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if steps is not None:
        check_int("steps", steps, minimum=0)
        if steps and optimizer is None:
            raise UsageError(f"steps={steps} needs optimizer= (the optimizer to train with)")
    return thresholds, (steps if steps is not None else 20) if optimizer is not None else 0


def _loss(output, targets, loss_fn, evidence: Evidence) -> torch.Tensor:
    """The scalar loss of one forward's ``output``; records the number of classes when
    it is the default cross-entropy."""
    if loss_fn is not None:
        try:
            logits = read_output(output).logits
        except UsageTypeError:
            logits = None
        loss = loss_fn(output if logits is None else logits, targets)
    else:
        read = read_output(output)
        if targets is None and read.loss is not None:
            loss = read.loss
        elif read.logits is None:
            raise UsageTypeError(
                f"the model returned a loss but no logits, and targets were given; pass "
                f"loss_fn= (got a {type(output).__name__})"
            )
        else:
            loss = default_loss(read.logits, targets)
            if _is_class_targets(read.logits, targets):
                evidence.classes = int(read.logits.shape[1])
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise UsageError("loss_fn must return a scalar tensor")
    return loss.reshape(())


def _is_class_targets(logits: torch.Tensor, targets) -> bool:
    return (
        isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
        and targets.dim() == 1
        and logits.dim() == 2
    )


def _backward(step_loss: Callable[[], torch.Tensor], inputs: list | None = None) -> float:
    """One forward pass and, if the loss has a graph, one backward pass (into the ``.grad``
    of ``inputs`` only, when given); the loss's value."""
    loss = step_loss()
    if loss.requires_grad:
        loss.backward(inputs=inputs)
    return float(loss.detach())


def _gate_evidence(net, layers, grads: list[LayerGrad], gates, probe_loss, evidence) -> None:
    """Record the ``gates`` (parameters that start at zero with a gradient, with their
    gradients' squared norms), which layers get no gradient at all (silent), and which of
    those stay silent once the gates move (``probe_loss``: one forward pass whose backward
    fills in their gradients)."""
    evidence.silent = [g.name for g in grads if g.grad_norm == 0]
    evidence.gates = [n for n, _, _ in gates]
    if gates and evidence.silent:
        silent = [(n, m) for n, m in layers if n in set(evidence.silent)]
        evidence.stuck = stuck_after_gates_open(
            net,
            [p for _, p, _ in gates],
            silent,
            lambda inputs: _backward(probe_loss, inputs),
            [sq for _, _, sq in gates],
        )


def _layer_grads(
    layers: list[tuple[str, nn.Module]],
    called: list[str],
    named: list[tuple[str, nn.Module]],
    kernel=None,
) -> tuple[list[LayerGrad], list[tuple[str, nn.Parameter]], list[tuple]]:
    """Gradient and weight norms (in float64, over :func:`~.probes.layer_weights`) of the
    layers, in forward order (a layer whose weights got no gradient counts 0); the model's
    parameters that are exactly zero (see :func:`~.evidence.zero_parameters`); and the
    gates among them, ``(name, parameter, squared gradient norm)`` of those with a
    gradient that is not zero. All from one float64 pass over every parameter and
    gradient (``kernel``: see :func:`~.stats.squared_norms`)."""
    by_name = dict(layers)
    order = _forward_order(called, layers)
    weights = [layer_weights(by_name[name]) for name in order]
    params = named_parameters(named)
    every = [w for ws in weights for w in ws] + [p for _, p in params]
    grads = list({id(w.grad): w.grad for w in every if w.grad is not None}.values())
    with torch.no_grad():  # no graph and no detach() per tensor
        squares = squared_norms([p for _, p in params] + grads, kernel)
    square_of = {id(p): sq for (_, p), sq in zip(params, squares)}
    square_of.update((id(g), sq) for g, sq in zip(grads, squares[len(params) :]))
    result = []
    for name, ws in zip(order, weights):
        grad_sq = sum(square_of[id(w.grad)] for w in ws if w.grad is not None)
        weight_sq = sum(square_of[id(w)] for w in ws)
        result.append(LayerGrad(name, type(by_name[name]).__name__, grad_sq**0.5, weight_sq**0.5))
    zeros = [(n, p) for n, p in params if is_zero_candidate(n, p) and square_of[id(p)] == 0]
    gates = [(n, p, square_of[id(p.grad)]) for n, p in zeros if p.grad is not None]
    return result, zeros, [gate for gate in gates if gate[2] != 0]  # NaN: a gate


def _block_stats(recorder: ForwardRecorder) -> list[BlockStat]:
    """The recorded blocks' statistics, with the last call's branch and skip variances."""
    stats = []
    for record in recorder.block_records.values():
        branch = record.branch_vars[-1] if record.branch_vars else None
        skip = record.skip_vars[-1] if record.skip_vars else None
        stats.append(
            BlockStat(record.name, record.sq_mean, record.var, branch, skip, record.residual)
        )
    return stats
