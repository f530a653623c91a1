"""Measurements beyond one forward and backward pass, for the verdict's signals:
parameters that start at exactly zero and what happens once they take a step, and
whether the model is an affine map of its input.

Both run inside :func:`~resnorm.diagnostics.diagnose`'s restored state: whatever they
change (a zero parameter, ``.grad``, the mode) is put back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import UsageTypeError
from .outputs import read_output
from .probes import layer_weights
from .stats import squared_norms


def zero_parameters(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters that are exactly zero everywhere, biases left out (they start at zero
    as a rule): zero-initialized heads, ReZero/SkipInit gates, zero last-norm scales, or
    a model whose weights were all set to zero."""
    return [
        (name, p)
        for name, p in net.named_parameters()
        if is_zero_candidate(name, p) and not p.detach().any()
    ]


def is_zero_candidate(name: str, p: nn.Parameter) -> bool:
    """Whether :func:`zero_parameters` looks at the parameter: not empty, not a bias."""
    return bool(p.numel()) and not name.rsplit(".", 1)[-1].startswith("bias")


def stuck_after_gates_open(
    net: nn.Module,
    gates: list[nn.Parameter],
    silent: list[tuple[str, nn.Module]],
    backward: Callable[[list[torch.Tensor]], None],
    grad_squares: list[float],
    kernel=None,
) -> list[str]:
    """The ``silent`` layers (no gradient at all) that still get none once each gate (a
    zero parameter with a gradient) has taken a small step against its gradient, as the
    first optimizer step would. One chain link of zeros opens per step: a zero head or a
    zero gate per residual branch opens everything at once; a network whose every weight
    is zero opens one layer per step. The gates are put back to zero. ``backward(inputs)``
    runs one forward and backward pass that fills in the gradients of ``inputs`` only (the
    silent layers' weights: nothing else is read; their gradients are cleared before and
    after). ``grad_squares``: the gates' squared gradient norms (the caller has them from
    its pass over every gradient); ``kernel``: see :func:`~.stats.squared_norms`."""
    weights = [w for _, module in silent for w in layer_weights(module) if w.requires_grad]
    if not weights:  # frozen weights get no gradient, gates open or not
        return [name for name, _ in silent]
    saved = [p.detach().clone() for p in gates]
    try:
        with torch.no_grad():  # a step of 1e-3 per value (RMS) against the gradient
            for p, sq in zip(gates, grad_squares):
                torch.mul(p.grad, -1e-3 * p.numel() ** 0.5 / max(math.sqrt(sq), 1e-30), out=p)
        for w in weights:  # the only gradients the pass fills in
            w.grad = None
        backward(weights)
        grads = [w.grad for w in weights if w.grad is not None]
        reached = {id(g) for g, sq in zip(grads, squared_norms(grads, kernel)) if sq != 0}
        return [  # a NaN gradient counts as reached
            name
            for name, module in silent
            if not any(w.grad is not None and id(w.grad) in reached for w in layer_weights(module))
        ]
    finally:
        with torch.no_grad():
            for p, value in zip(gates, saved):
                p.copy_(value)
        for w in weights:
            w.grad = None


def affine_deviation(model: nn.Module, args: tuple, samples: int = 8) -> float | None:
    """How far ``model`` (in eval mode) is from an affine map of its input: for pairs of
    samples (x1, x2) of the batch, ``||f((x1 + x2) / 2) - (f(x1) + f(x2)) / 2||`` over
    ``||f(x1) - f(x2)|| / 2``. Zero (to rounding) for a stack of linear layers, with or
    without normalization at inference; of order 1 for any nonlinear network. ``None``
    when it cannot be checked: inputs that are not one floating-point tensor of at least
    two samples, an output without logits, or an output that does not vary."""
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if not x.is_floating_point() or x.dim() < 2 or x.shape[0] < 2:
        return None
    n = min(samples, x.shape[0] // 2)
    x1, x2 = x[:n], x[n : 2 * n]
    was_training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            out = read_output(model(torch.cat([x1, x2, (x1 + x2) / 2]))).logits
    except UsageTypeError:  # an output only the user's loss_fn can read
        return None
    finally:
        for m, mode in was_training:
            m.training = mode
    if out is None or out.shape[0] != 3 * n:
        return None
    # Rows: fm - (f1 + f2) / 2 and (f1 - f2) / 2, from one product; then both norms.
    mix = torch.tensor([[-0.5, -0.5, 1.0], [0.5, -0.5, 0.0]], dtype=torch.float64)
    deviation, spread = (mix.to(out.device) @ out.double().reshape(3, -1)).norm(dim=1).tolist()
    if not math.isfinite(spread) or spread == 0:
        return None
    return deviation / spread


# The gate probe asks whether any gradient reaches the silent layers once the gates open:
# a question of the network's structure, asked of this many samples of the batch.
PROBE_BATCH = 64


def probe_batch(args: tuple, targets) -> tuple[tuple, torch.Tensor | None]:
    """The first :data:`PROBE_BATCH` samples when the input is one tensor whose first axis
    is the targets' (the batch axis, known for sure); else the whole batch."""
    x = args[0] if len(args) == 1 else None
    if (
        isinstance(x, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and x.dim() >= 1
        and targets.dim() >= 1
        and x.shape[0] == targets.shape[0] > PROBE_BATCH
    ):
        return (x[:PROBE_BATCH],), targets[:PROBE_BATCH]
    return args, targets
