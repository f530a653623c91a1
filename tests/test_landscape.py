"""Santurkar et al.'s measurements (resnorm.diagnostics.landscape) against answers known by
construction: a least-squares linear model, whose loss along the gradient is an exact
quadratic, and linear networks, whose gradients have closed forms."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnorm.diagnostics import (
    LayerShift,
    LossLandscape,
    internal_covariate_shift,
    loss_landscape,
)
from resnorm.diagnostics.landscape import ETA_COUNT, ETA_RANGE
from resnorm.errors import UsageError, UsageTypeError

REL = 1e-10


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _least_squares(n=12, d=4, m=3):
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(d, m).double()
    with torch.no_grad():
        model.weight.copy_(_randn(g, m, d))
        model.bias.copy_(_randn(g, m))
    # Correlated columns: the gradient is not an eigenvector of the Hessian.
    x = _randn(g, n, d) @ _randn(g, d, d)
    return model, x, _randn(g, n, m)


def _least_squares_closed_form(model, x, y):
    """Loss, gradient and Hessian of mean((x W^T + b - y)^2) in the parameters
    theta = [W | b] (row-major), from the design matrix alone."""
    n, m = y.shape
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    theta = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], dim=1)
    residual = design @ theta.T - y
    loss = float(residual.square().sum()) / (n * m)
    grad = (2 / (n * m)) * residual.T @ design
    # Block diagonal: each output row k of theta sees the Hessian 2/(nm) X^T X.
    hessian = (2 / (n * m)) * torch.kron(torch.eye(m, dtype=x.dtype), design.T @ design)
    return loss, grad.reshape(-1), hessian


def test_least_squares_landscape_is_the_exact_quadratic():
    model, x, y = _least_squares()
    loss0, g, hessian = _least_squares_closed_form(model, x, y)
    hg = hessian @ g
    etas = [1e-3, 0.01, 0.05, 0.2, 0.7]
    result = loss_landscape(model, x, y, loss_fn=F.mse_loss, etas=etas)

    assert result.loss == pytest.approx(loss0, rel=REL)
    assert result.grad_norm == pytest.approx(float(g.norm()), rel=REL)
    assert result.etas == tuple(etas)
    curvature = float(g @ hg)  # g^T H g: the second derivative of the loss along -g
    for eta, loss, change in zip(etas, result.losses, result.grad_changes):
        expected = loss0 - eta * float(g @ g) + eta**2 / 2 * curvature
        assert loss == pytest.approx(expected, rel=REL)
        # grad(theta - eta g) = g - eta H g
        assert change == pytest.approx(eta * float(hg.norm()), rel=REL)
    beta = float(hg.norm() / g.norm())
    assert result.beta_smoothness == pytest.approx(beta, rel=REL)
    # The definition's ratio ||H g|| / ||g|| is at least the curvature along g, and more
    # when g is not an eigenvector of H.
    assert beta > curvature / float(g @ g) * (1 + 1e-6)
    assert result.grad_change_range == pytest.approx(
        (etas[0] * float(hg.norm()), etas[-1] * float(hg.norm())), rel=REL
    )
    assert result.loss_variation == pytest.approx(max(result.losses) - min(result.losses))
    assert result.loss_range == (min(result.losses), max(result.losses))


def test_default_step_sizes_are_a_geometric_sweep_around_lr():
    model, x, y = _least_squares()
    result = loss_landscape(model, x, y, loss_fn=F.mse_loss, lr=0.2)
    assert len(result.etas) == ETA_COUNT
    assert result.etas[0] == pytest.approx(0.2 * ETA_RANGE[0])
    assert result.etas[-1] == pytest.approx(0.2 * ETA_RANGE[1])
    ratios = [b / a for a, b in zip(result.etas, result.etas[1:])]
    assert ratios == pytest.approx([ratios[0]] * len(ratios))
    assert isinstance(result, LossLandscape)
    json.dumps(result.to_dict())


def _linear_chain_grads(weights, x, y):
    """Gradients of mean((x W1^T W2^T ... Wk^T - y)^2) w.r.t. each W_j, by the chain rule
    written out as matrix products."""
    n, m = y.shape
    activations = [x]
    for w in weights:
        activations.append(activations[-1] @ w.T)
    delta = (2 / (n * m)) * (activations[-1] - y)
    grads = [None] * len(weights)
    for j in reversed(range(len(weights))):
        grads[j] = delta.T @ activations[j]
        delta = delta @ weights[j]
    return grads


def _linear_net(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(a, b, bias=False).double() for a, b in zip(sizes, sizes[1:])]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(_randn(g, *layer.weight.shape) / layer.weight.shape[1] ** 0.5)
    x, y = _randn(g, 10, sizes[0]), _randn(g, 10, sizes[-1])
    return nn.Sequential(*layers), x, y


@pytest.mark.parametrize("sizes", [(5, 4, 3), (5, 6, 4, 3)])
def test_covariate_shift_of_a_linear_network_matches_the_closed_form(sizes):
    model, x, y = _linear_net(sizes)
    lr = 0.3
    weights = [layer.weight.detach().clone() for layer in model]
    grads = _linear_chain_grads(weights, x, y)
    shifts = internal_covariate_shift(model, x, y, loss_fn=F.mse_loss, lr=lr)

    assert [s.name for s in shifts] == [str(j) for j in range(len(sizes) - 1)]
    assert all(isinstance(s, LayerShift) and s.kind == "Linear" for s in shifts)
    first = shifts[0]
    assert (first.l2, first.cosine) == (0.0, 1.0)  # no layer before the first
    for i, shift in enumerate(shifts[1:], start=1):
        # Layers 0..i-1 took their SGD step, layer i and later did not.
        moved = [w - lr * g if j < i else w for j, (w, g) in enumerate(zip(weights, grads))]
        g, g_shifted = grads[i].reshape(-1), _linear_chain_grads(moved, x, y)[i].reshape(-1)
        assert shift.grad_norm == pytest.approx(float(g.norm()), rel=REL)
        assert shift.l2 == pytest.approx(float((g - g_shifted).norm()), rel=REL)
        cosine = float(g @ g_shifted / (g.norm() * g_shifted.norm()))
        assert shift.cosine == pytest.approx(cosine, rel=REL)
        assert shift.l2 > 0


class _Reordered(nn.Module):
    """Registers its layers in the opposite order to the one it runs them in, and holds
    a layer the loss never reaches."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(4, 2)
        self.unused = nn.Linear(3, 3)
        self.early = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.ones(()))  # owned by the model itself

    def forward(self, x):
        return self.late(torch.tanh(self.early(x))) * self.scale


def test_layers_are_taken_in_forward_order_and_unreached_ones_left_out():
    torch.manual_seed(0)
    model, x, y = _Reordered(), torch.randn(8, 3), torch.randint(0, 2, (8,))
    shifts = internal_covariate_shift(model, x, y)
    assert [(s.name, s.kind) for s in shifts] == [
        ("early", "Linear"),
        ("late", "Linear"),
        ("", "_Reordered"),
    ]
    assert (shifts[0].l2, shifts[0].cosine) == (0.0, 1.0)
    assert all(s.l2 > 0 and -1 <= s.cosine <= 1 for s in shifts[1:])
    result = loss_landscape(model, x, y, etas=[0.1])
    assert math.isfinite(result.beta_smoothness) and result.grad_norm > 0


def _bn_net():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
    )


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        [m.training for m in model.modules()],
        torch.get_rng_state(),
    )


def _assert_same(before, after):
    (state0, grads0, modes0, rng0), (state1, grads1, modes1, rng1) = before, after
    assert state0.keys() == state1.keys()
    assert all(torch.equal(state0[k], state1[k]) for k in state0), "parameters or buffers"
    for (obj0, value0), (obj1, value1) in zip(grads0, grads1):
        assert obj1 is obj0
        assert value0 is None or torch.equal(value0, value1)
    assert modes0 == modes1
    assert torch.equal(rng0, rng1)


@pytest.mark.parametrize("measure", [internal_covariate_shift, loss_landscape])
@pytest.mark.parametrize("mixed_modes", [False, True])
def test_the_model_is_left_as_found(measure, mixed_modes):
    model, x, y = _bn_net(), torch.randn(16, 6), torch.randint(0, 3, (16,))
    model[0].weight.grad = torch.randn_like(model[0].weight)
    if mixed_modes:
        model[3].eval()
    before = _snapshot(model)
    first = measure(model, x, y)
    _assert_same(before, _snapshot(model))
    assert measure(model, x, y) == first  # the same batch, the same dropout masks


def test_training_mode_by_default_and_eval_mode_on_request():
    model, x, y = _bn_net(), torch.randn(16, 6), torch.randint(0, 3, (16,))
    twin = copy.deepcopy(model)
    model.eval()
    with torch.no_grad():
        eval_loss = float(F.cross_entropy(twin.eval()(x), y))
        torch.manual_seed(7)
        train_loss = float(F.cross_entropy(twin.train()(x), y))  # the same dropout mask below
    torch.manual_seed(7)
    assert loss_landscape(model, x, y, etas=[0.1]).loss == pytest.approx(train_loss, rel=1e-6)
    assert loss_landscape(model, x, y, etas=[0.1], train_mode=False).loss == pytest.approx(
        eval_loss, rel=1e-6
    )
    assert not model.training


def test_every_pass_draws_the_same_dropout_masks():
    """With a vanishing step, the gradient after it is the gradient before it: only when
    dropout draws the same masks in every pass (the same batch, the same noise)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    result = loss_landscape(model, x, y, etas=[1e-9])
    assert result.grad_changes[0] < 1e-6 * result.grad_norm
    assert result.losses[0] == pytest.approx(result.loss, rel=1e-6)
    shift = internal_covariate_shift(model, x, y, lr=1e-9)[1]
    assert shift.l2 < 1e-6 * shift.grad_norm and shift.cosine == pytest.approx(1.0)


@pytest.mark.parametrize("measure", [internal_covariate_shift, loss_landscape])
def test_models_without_trainable_parameters_are_refused(measure):
    x = torch.randn(4, 3)
    with pytest.raises(UsageError, match="no parameter that requires grad"):
        measure(nn.ReLU(), x)
    with pytest.raises(UsageError, match="no parameter that requires grad"):
        measure(nn.Linear(3, 2).requires_grad_(False), x)
    with pytest.raises(UsageTypeError, match="model must be an nn.Module"):
        measure(lambda t: t, x)
    with pytest.raises(UsageError, match="does not depend on any parameter"):
        measure(nn.Linear(3, 2), x, loss_fn=lambda out, t: torch.tensor(1.0))


@pytest.mark.parametrize("measure", [internal_covariate_shift, loss_landscape])
@pytest.mark.parametrize("lr", [0, -0.1, float("nan"), float("inf")])
def test_bad_learning_rates_are_refused(measure, lr):
    with pytest.raises(UsageError, match="lr must be"):
        measure(nn.Linear(3, 2), torch.randn(4, 3), lr=lr)


def test_bad_step_sizes_are_refused():
    model, x = nn.Linear(3, 2), torch.randn(4, 3)
    with pytest.raises(UsageTypeError, match="lr must be a number"):
        loss_landscape(model, x, lr="0.1")
    with pytest.raises(UsageError, match="at least one step size"):
        loss_landscape(model, x, etas=[])
    with pytest.raises(UsageError, match=r"etas\[1\] must be in \(0, inf\]"):
        loss_landscape(model, x, etas=[0.1, 0.0])
    with pytest.raises(UsageError, match=r"etas\[0\] must be a finite number"):
        loss_landscape(model, x, etas=[float("inf")])
    with pytest.raises(UsageTypeError, match="etas must be a sequence"):
        loss_landscape(model, x, etas=0.1)
    with pytest.raises(UsageTypeError, match="etas must be a sequence"):
        loss_landscape(model, x, etas="0.1")
    assert loss_landscape(model, x, etas=torch.tensor([0.1, 0.2])).etas == pytest.approx((0.1, 0.2))
