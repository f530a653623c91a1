"""``diagnose(model, inputs, targets)``: gradient flow and signal propagation from one batch."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import norms
from .._io import json_safe
from ..blocks import LayerScale, ResidualAdd, ResidualMLPBlock, ScalarGain, TransformerBlock
from ..errors import UsageError, UsageTypeError
from .probes import ForwardRecorder, find_blocks, parameterized_layers, unwrap
from .stats import ActivationSummary
from .verdict import LayerGrad, Thresholds, Verdict, judge

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

    def summary(self) -> str:
        """The verdict in plain words, with the numbers behind it."""
        head = {
            Verdict.HEALTHY: "Gradients flow: no vanishing or exploding gradients at this batch.",
            Verdict.VANISHING: "Gradients vanish on the way back to the first layers.",
            Verdict.EXPLODING: "Gradients explode on the way back to the first layers.",
            Verdict.NONFINITE: "NaN or Inf values appear in the forward or backward pass.",
        }[self.verdict]
        return " ".join([head, *self.findings])

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
            "thresholds": asdict(self.thresholds),
            "layers": [
                {
                    **asdict(layer),
                    "relative": json_safe(layer.relative),
                    "grad_norm": json_safe(layer.grad_norm),
                }
                for layer in self.layers
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


def _structure(net: nn.Module) -> dict:
    merges = [m for m in net.modules() if isinstance(m, ResidualAdd)]
    torch_layers = [
        m
        for m in net.modules()
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
    ]
    has_skip = (
        any(m.residual for m in merges) if merges else True if torch_layers else None
    )  # None: cannot tell from outside
    post = any(
        isinstance(m, (ResidualMLPBlock, TransformerBlock))
        and m.placement == "post"
        and any(c.residual for c in m.children() if isinstance(c, ResidualAdd))
        for m in net.modules()
    )
    post = post or any(not m.norm_first for m in torch_layers)
    kinds = sorted({type(m).__name__ for m in net.modules() if isinstance(m, NORM_CLASSES)})
    closed = sum(
        1
        for m in net.modules()
        if isinstance(m, (ScalarGain, LayerScale))
        and not bool(getattr(m, "gain", getattr(m, "gamma", None)).detach().any())
    )
    return {
        "has_skip": has_skip,
        "has_norm": bool(kinds),
        "post_norm": post,
        "norm_kinds": kinds,
        "closed_gates": closed,
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
            if layer.weight.grad is None:
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
) -> Diagnosis:
    """Measure gradient flow and signal propagation of ``model`` on one batch.

    Runs one forward and backward pass (in training mode by default, so batch norm uses
    batch statistics, as in Brock et al.) and leaves the model as it found it: its mode,
    its buffers (running statistics) and any ``.grad`` it had are restored.

    Args:
        model: any ``nn.Module`` (also inside ``torch.compile`` or DDP).
        inputs: a tensor, or a tuple of positional arguments for ``model``.
        targets: labels for the loss (see :func:`default_loss`), or ``None``.
        loss_fn: ``loss_fn(output, targets) -> scalar`` to use instead.
        blocks: names of the modules to measure signal propagation at (default: found
            automatically, see :func:`~resnorm.diagnostics.probes.find_blocks`).
        channel_dim: the channel axis of block outputs (default: 1, or -1 for
            Transformer blocks).
        thresholds: the verdict's thresholds (:class:`Thresholds`).
    """
    if not isinstance(model, nn.Module):
        raise UsageTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    thresholds = thresholds or Thresholds()
    if not isinstance(thresholds, Thresholds):
        raise UsageTypeError(f"thresholds must be a Thresholds, got {type(thresholds).__name__}")
    net = unwrap(model)
    layers = parameterized_layers(net)
    if not layers:
        raise UsageError("the model has no layer with a weight parameter to measure")
    block_list = find_blocks(net, blocks)
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    with _state_restored(model, net):
        model.train(train_mode)
        with ForwardRecorder(net, block_list, channel_dim) as recorder:
            loss_value = _forward_backward(model, args, targets, loss_fn)
        grads = _layer_grads(layers, recorder.layer_order)

    block_stats = _block_stats(recorder)
    structure = _structure(net)
    verdict = judge(grads, block_stats, recorder.activations, loss_value, thresholds, structure)
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
    )


@contextmanager
def _state_restored(model: nn.Module, net: nn.Module):
    """Clear every parameter's ``.grad`` for the measurement; afterwards (also on an error)
    put back the gradients, the buffers (running statistics) and every module's mode."""
    params = list(net.parameters())
    saved_grads = [p.grad for p in params]
    saved_buffers = [(b, b.detach().clone()) for b in net.buffers()]
    # The wrapper's modules too: DDP keeps a training flag of its own.
    was_training = [(m, m.training) for m in model.modules()]
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        with torch.no_grad():
            for buffer, saved in saved_buffers:
                buffer.copy_(saved)
        for m, mode in was_training:
            m.training = mode


def _forward_backward(model: nn.Module, args: tuple, targets, loss_fn) -> float:
    """One forward pass and, if the loss has a graph, one backward pass; the loss's value."""
    output = model(*args)
    if isinstance(output, (tuple, list)):
        output = output[0]
    loss = (loss_fn or default_loss)(output, targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise UsageError("loss_fn must return a scalar tensor")
    loss_value = float(loss.detach())
    if loss.requires_grad:
        loss.backward()
    return loss_value


def _layer_grads(layers: list[tuple[str, nn.Module]], called: list[str]) -> list[LayerGrad]:
    """Gradient and weight norms (in float64) of the layers, in forward order; a layer
    whose weight got no gradient counts 0."""
    by_name = dict(layers)
    grads = []
    for layer_name in _forward_order(called, layers):
        weight = by_name[layer_name].weight
        grad_norm = float(weight.grad.detach().double().norm()) if weight.grad is not None else 0.0
        grads.append(
            LayerGrad(
                layer_name,
                type(by_name[layer_name]).__name__,
                grad_norm,
                float(weight.detach().double().norm()),
            )
        )
    return grads


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
