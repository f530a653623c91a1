"""A few optimizer steps on the diagnosed batch, for the signals that only training shows:
a learning rate far too large (the loss rises or turns non-finite), one far too small or
a loss that does not move, first layers that do not train, updates far from ~1e-3 of the
weights per step.

:func:`run_steps` trains the model itself and then puts back its parameters, buffers,
``.grad`` fields, the optimizer's state and the random-number generator, so the caller's
training is not changed by being diagnosed.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .probes import layer_weights


@dataclass
class TrainingTrace:
    """What ``steps`` optimizer steps did: ``losses`` (before each step, then after the
    last one), per layer (forward order) the relative weight change of each step
    (``updates[layer][step]``: ``||W_t+1 - W_t|| / max(||W_t||, ||W_t+1||)``), the whole
    run's relative change of the first and last layers, and the median layer's change
    per step."""

    losses: list[float] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    updates: list[list[float]] = field(default_factory=list)
    first_update: float | None = None
    last_update: float | None = None
    median_update: float | None = None

    def to_dict(self) -> dict:
        return {
            "losses": self.losses,
            "layer_names": self.layer_names,
            "updates": self.updates,
            "first_update": self.first_update,
            "last_update": self.last_update,
            "median_update": self.median_update,
        }


def _relative_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    delta = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(after, before))
    norm = max(
        sum(float(b.double().square().sum()) for b in before),
        sum(float(a.double().square().sum()) for a in after),
    )
    return (delta / norm) ** 0.5 if norm > 0 else 0.0


@contextmanager
def _everything_restored(model: nn.Module, optimizer: torch.optim.Optimizer):
    params = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
    grads = [(p, p.grad) for p in model.parameters()]
    opt_state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        model.load_state_dict(params)
        for p, g in grads:
            p.grad = g
        optimizer.load_state_dict(opt_state)
        torch.set_rng_state(rng)


def run_steps(
    model: nn.Module,
    step_loss: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    layers: list[tuple[str, nn.Module]],
) -> TrainingTrace:
    """Take ``steps`` optimizer steps, each on ``step_loss()`` (a forward pass returning
    the scalar loss), recording the loss and each layer's relative weight change; stop
    early when the loss turns non-finite. Everything is put back afterwards."""
    trace = TrainingTrace(layer_names=[name for name, _ in layers])
    weights = [layer_weights(module) for _, module in layers]
    trace.updates = [[] for _ in layers]
    with _everything_restored(model, optimizer):
        start = [[w.detach().clone() for w in ws] for ws in weights]
        before = start
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = step_loss()
            trace.losses.append(float(loss.detach()))
            if not torch.isfinite(loss):
                break
            loss.backward()
            optimizer.step()
            after = [[w.detach().clone() for w in ws] for ws in weights]
            for i, (b, a) in enumerate(zip(before, after)):
                trace.updates[i].append(_relative_change(b, a))
            before = after
        else:
            with torch.no_grad():
                trace.losses.append(float(step_loss().detach()))
        if layers and trace.updates[0]:
            end = [[w.detach().clone() for w in ws] for ws in weights]
            trace.first_update = _relative_change(start[0], end[0])
            trace.last_update = _relative_change(start[-1], end[-1])
            per_step = [statistics.fmean(u) for u in trace.updates if u]
            trace.median_update = statistics.median(per_step)
    return trace
