"""Santurkar et al.'s measurements of the optimization landscape, on any ``nn.Module``.

Santurkar, Tsipras, Ilyas & Madry, "How Does Batch Normalization Help Optimization?"
(NeurIPS 2018, arXiv 1805.11604) measure, at one point of training and on one batch:

- :func:`internal_covariate_shift` (their section 2.2): how much the gradient of one layer
  changes when the layers before it take their optimizer step;
- :func:`loss_landscape` (their section 3.1, Fig. 4): the loss and the gradient along the
  gradient direction, ``theta - eta * g``: the variation of the loss, the gradient's
  predictiveness and the "effective beta-smoothness".

The trainable parameters (every parameter that requires grad) are grouped by the module
that owns them; a group is a "layer". Both functions run the model in training mode by
default (batch norm with batch statistics, as in the paper), give every forward pass the
same random numbers (the same dropout masks, so the passes see the same batch), and leave
the model as found: parameters, ``.grad``, buffers (running statistics), modes and the
random generators' states. Definitions, formulas and closed-form checks:
``docs/landscape.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .._checks import check_float
from ..errors import UsageError, UsageTypeError
from .diagnose import _loss
from .probes import unwrap
from .restore import state_restored
from .signals import Evidence

#: The default step sizes of :func:`loss_landscape`: ``ETA_COUNT`` values spaced
#: geometrically from ``ETA_RANGE[0] * lr`` to ``ETA_RANGE[1] * lr``. (The paper's exact
#: range is not stated in a form we verified; this is ours.)
ETA_RANGE = (0.05, 4.0)
ETA_COUNT = 9


@dataclass(frozen=True)
class LayerShift:
    """Internal covariate shift of one layer (Santurkar et al. 2018, section 2.2).

    ``G`` is the gradient of the loss w.r.t. the layer's parameters (all of them, as one
    vector); ``G'`` the same gradient after every layer before it (in forward order) took
    one SGD step ``W <- W - lr * grad`` on the same batch, the layer and the ones after it
    unchanged. ``l2 = ||G - G'||_2``; ``cosine = <G, G'> / (||G|| ||G'||)`` (1 when
    ``G' == G``, NaN when one of them is zero otherwise); ``grad_norm = ||G||``, so
    ``l2 / grad_norm`` is the relative shift. ``kind`` is the module's class name."""

    name: str
    kind: str
    l2: float
    cosine: float
    grad_norm: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LossLandscape:
    """The loss and its gradient along the gradient (Santurkar et al. 2018, section 3.1).

    ``loss`` is ``L(theta)`` and ``grad_norm`` is ``||g||``, ``g = grad L(theta)`` over all
    trainable parameters; for each step size ``etas[j]``, ``losses[j] = L(theta - eta g)``
    and ``grad_changes[j] = ||g - grad L(theta - eta g)||_2``. The paper's three summary
    numbers are properties: :attr:`loss_variation`, :attr:`grad_change_range` (gradient
    predictiveness: small changes mean the gradient predicts the next one well) and
    :attr:`beta_smoothness`."""

    loss: float
    grad_norm: float
    etas: tuple[float, ...]
    losses: tuple[float, ...]
    grad_changes: tuple[float, ...]

    @property
    def loss_range(self) -> tuple[float, float]:
        """The smallest and largest loss over the steps (NaN if one is NaN)."""
        return _lowest(self.losses), _highest(self.losses)

    @property
    def loss_variation(self) -> float:
        """``max_eta L(theta - eta g) - min_eta L(theta - eta g)``: how much the loss
        varies along the gradient (``inf`` when a step diverges)."""
        low, high = self.loss_range
        return high - low

    @property
    def grad_change_range(self) -> tuple[float, float]:
        """The smallest and largest ``||g - grad L(theta - eta g)||`` over the steps."""
        return _lowest(self.grad_changes), _highest(self.grad_changes)

    @property
    def beta_smoothness(self) -> float:
        """The effective beta-smoothness: ``max_eta ||g - grad L(theta - eta g)|| /
        ||eta g||`` (NaN when ``g`` is zero). For a quadratic loss with Hessian ``H`` it
        is ``||H g|| / ||g||`` at every step size."""
        if self.grad_norm == 0:
            return math.nan
        return _highest(
            [c / (eta * self.grad_norm) for c, eta in zip(self.grad_changes, self.etas)]
        )

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "loss_variation": self.loss_variation,
            "grad_change_range": list(self.grad_change_range),
            "beta_smoothness": self.beta_smoothness,
        }


def _highest(values: Sequence[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _lowest(values: Sequence[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else min(values)


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One float64 vector of ``tensors`` (norms and differences are taken in float64)."""
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    if torch.equal(a, b):
        return 1.0
    norms = float(a.norm()) * float(b.norm())
    if norms == 0:
        return math.nan
    return max(-1.0, min(1.0, float(a @ b) / norms))


def _parameter_groups(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Parameter]]]:
    """Every parameter of ``model`` that requires grad, grouped by the module that owns
    it, as ``(name, module, parameters)`` in registration order; a parameter shared by
    several modules belongs to the first."""
    seen: set[int] = set()
    groups = []
    for name, module in model.named_modules():
        params = [
            p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen
        ]
        seen.update(id(p) for p in params)
        if params:
            groups.append((name, module, params))
    return groups


class _Probe:
    """One batch's loss and gradients at whatever values the parameters hold. Every
    pass starts from the same random-generator state, so dropout draws the same masks."""

    def __init__(self, model: nn.Module, inputs, targets, loss_fn: Callable | None) -> None:
        # Wrappers (torch.compile, DDP) are measured through the module inside, eagerly.
        self.net = unwrap(model)
        self.groups = _parameter_groups(self.net)
        if not self.groups:
            raise UsageError(
                f"the model ({type(self.net).__name__}) has no parameter that requires grad; "
                "there is no gradient to measure"
            )
        self.params = [p for _, _, params in self.groups for p in params]
        self.args = inputs if isinstance(inputs, tuple) else (inputs,)
        self.targets, self.loss_fn = targets, loss_fn
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def gradient(self, params: list[nn.Parameter]) -> tuple[float, list[torch.Tensor | None]]:
        """The loss and its gradient w.r.t. ``params`` (``None`` for a parameter the loss
        does not reach); ``.grad`` is not touched."""
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        loss = _loss(self.net(*self.args), self.targets, self.loss_fn, Evidence())
        if not loss.requires_grad:
            raise UsageError(
                "the loss does not depend on any parameter of the model that requires grad"
            )
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return float(loss.detach()), [None if g is None else g.detach() for g in grads]

    def ordered_gradient(self) -> tuple[list[torch.Tensor | None], list[str]]:
        """Every parameter's gradient, and the names of the groups the loss reaches in the
        order their modules' forward calls finished (a container that owns a parameter
        comes after the children it runs)."""
        called: list[str] = []

        def recorder(name: str):
            def hook(module, args, output) -> None:
                if name not in called:
                    called.append(name)

            return hook

        handles = [m.register_forward_hook(recorder(name)) for name, m, _ in self.groups]
        try:
            _, grads = self.gradient(self.params)
        finally:
            for handle in handles:
                handle.remove()
        reached = dict(zip(map(id, self.params), (g is not None for g in grads)))
        order = list(called)
        previous = None
        for name, _, params in self.groups:
            # A module whose parameters are used without its forward running
            # (nn.MultiheadAttention's out_proj) goes after the one registered before it.
            if name not in order and any(reached[id(p)] for p in params):
                order.insert(order.index(previous) + 1 if previous is not None else 0, name)
            previous = name if name in order else previous
        by_name = {name: params for name, _, params in self.groups}
        return grads, [n for n in order if any(reached[id(p)] for p in by_name[n])]


def _filled(params: list[nn.Parameter], grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The gradients with zeros where the loss does not reach a parameter."""
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@contextmanager
def _parameters_restored(params: list[nn.Parameter]):
    """Yield copies of ``params``; afterwards (also on an error) copy them back."""
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


def _checked_lr(model, lr) -> float:
    if not isinstance(model, nn.Module):
        raise UsageTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return check_float("lr", lr, low=0, low_inclusive=False, finite=True)


def _checked_etas(etas, lr: float) -> list[float]:
    """The step sizes: ``etas`` checked (positive, finite, at least one), or the default
    geometric sweep of :data:`ETA_RANGE` times ``lr``."""
    if etas is None:
        low, high = ETA_RANGE
        return [lr * low * (high / low) ** (j / (ETA_COUNT - 1)) for j in range(ETA_COUNT)]
    if isinstance(etas, torch.Tensor):
        etas = etas.tolist()
    if isinstance(etas, (str, bytes)) or not isinstance(etas, Iterable):
        raise UsageTypeError(
            f"etas must be a sequence of step sizes (positive numbers), got {etas!r} "
            f"({type(etas).__name__})"
        )
    checked = [
        check_float(f"etas[{j}]", eta, low=0, low_inclusive=False, finite=True)
        for j, eta in enumerate(etas)
    ]
    if not checked:
        raise UsageError("etas must hold at least one step size, got an empty sequence")
    return checked


def _shift(name: str, module: nn.Module, grad, shifted) -> LayerShift:
    g, g_shifted = _flat(grad), _flat(shifted)
    l2 = float((g - g_shifted).norm())
    return LayerShift(name, type(module).__name__, l2, _cosine(g, g_shifted), float(g.norm()))


def internal_covariate_shift(
    model: nn.Module,
    inputs,
    targets: torch.Tensor | None = None,
    loss_fn: Callable | None = None,
    *,
    lr: float = 0.1,
    train_mode: bool = True,
) -> list[LayerShift]:
    """Internal covariate shift of every layer on one batch (Santurkar et al. 2018,
    section 2.2), as :class:`LayerShift` records in forward order.

    For layer ``i``: ``G`` is the gradient of the loss w.r.t. its parameters at the
    current values; ``G'`` the same gradient after the layers before ``i`` took one SGD
    step of learning rate ``lr`` with their own gradients on this batch. The first layer
    has none before it: ``G' = G``, ``l2 = 0``, ``cosine = 1``. A layer is the set of
    trainable parameters one module owns; layers the loss does not reach are left out.
    Costs one forward and backward pass per layer.

    Args:
        model: any ``nn.Module`` (wrappers such as ``torch.compile`` and DDP are measured
            through the module inside).
        inputs: a tensor, or a tuple of positional arguments for ``model``.
        targets: labels for the loss: class indices give cross-entropy (see
            :func:`~resnorm.diagnostics.default_loss`).
        loss_fn: ``loss_fn(output, targets) -> scalar`` to use instead.
        lr: the SGD learning rate of the earlier layers' step (> 0).
        train_mode: run in training mode (batch norm with batch statistics; its running
            statistics are put back afterwards), or in eval mode.
    """
    lr = _checked_lr(model, lr)
    probe = _Probe(model, inputs, targets, loss_fn)
    with state_restored(model, probe.net, train_mode), _parameters_restored(probe.params):
        grads, order = probe.ordered_gradient()
        grad_of = dict(zip(map(id, probe.params), _filled(probe.params, grads)))
        groups = {name: (module, params) for name, module, params in probe.groups}
        shifts = []
        for i, name in enumerate(order):
            module, params = groups[name]
            grad = [grad_of[id(p)] for p in params]
            if i == 0:
                shifted = grad
            else:
                with torch.no_grad():  # the layer before takes its step; earlier ones did
                    for p in groups[order[i - 1]][1]:
                        p.add_(grad_of[id(p)], alpha=-lr)
                shifted = _filled(params, probe.gradient(params)[1])
            shifts.append(_shift(name, module, grad, shifted))
    return shifts


def loss_landscape(
    model: nn.Module,
    inputs,
    targets: torch.Tensor | None = None,
    loss_fn: Callable | None = None,
    *,
    lr: float = 0.1,
    etas: Iterable[float] | None = None,
    train_mode: bool = True,
) -> LossLandscape:
    """The loss and its gradient along the gradient direction on one batch (Santurkar
    et al. 2018, section 3.1, Fig. 4), as a :class:`LossLandscape`.

    With ``g`` the gradient of the loss over every trainable parameter at the current
    values ``theta``, evaluates ``L(theta - eta g)`` and ``grad L(theta - eta g)`` for each
    step size ``eta``: by default ``ETA_COUNT`` (9) values spaced geometrically from
    ``0.05 * lr`` to ``4 * lr`` (:data:`ETA_RANGE`). Costs one forward and backward pass
    per step size, plus one.

    Args:
        model, inputs, targets, loss_fn, train_mode: as in
            :func:`internal_covariate_shift`.
        lr: the learning rate the default step sizes are relative to (> 0).
        etas: the step sizes (positive, finite) instead of the default sweep.
    """
    lr = _checked_lr(model, lr)
    etas = _checked_etas(etas, lr)
    probe = _Probe(model, inputs, targets, loss_fn)
    params = probe.params
    with state_restored(model, probe.net, train_mode), _parameters_restored(params) as theta:
        loss, grads = probe.gradient(params)
        grads = _filled(params, grads)
        g = _flat(grads)
        losses, changes = [], []
        for eta in etas:
            with torch.no_grad():
                for p, start, d in zip(params, theta, grads):
                    p.copy_(start).add_(d, alpha=-eta)
            loss_eta, grads_eta = probe.gradient(params)
            losses.append(loss_eta)
            changes.append(float((g - _flat(_filled(params, grads_eta))).norm()))
    return LossLandscape(loss, float(g.norm()), tuple(etas), tuple(losses), tuple(changes))
