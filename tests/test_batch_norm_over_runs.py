"""``resnorm.norms.batch.batch_norm_over_runs``: training-mode batch norm whose vmap rule
normalizes the runs of a vmapped batch as one (N, runs x C, ...) batch norm (what
fit_stacked calls). Outside vmap it is F.batch_norm (float64 gradcheck, and equal to the
torch function); under vmap it equals torch's own vmap of F.batch_norm and a loop over the
runs, in outputs, gradients and the running statistics updated in place."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from resnorm.norms import BatchNorm, convert_torch_batchnorm
from resnorm.norms.batch import OVER_RUNS_MIN_ELEMENTS, batch_norm_over_runs

SHAPES = [(6, 4), (6, 4, 5), (5, 3, 4, 4)]


def _inputs(shape, runs=None, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (runs,) if runs else ()
    c = shape[1]
    x = torch.randn(*lead, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(*lead, c, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.2 * torch.randn(*lead, c, generator=g, dtype=torch.float64)).requires_grad_()
    stats = (
        torch.randn(*lead, c, dtype=torch.float64, generator=g),
        torch.rand(*lead, c, dtype=torch.float64, generator=g) + 0.5,
    )
    return x, (w if affine else None), (b if affine else None), stats


@pytest.mark.parametrize("shape", SHAPES)
def test_outside_vmap_it_is_f_batch_norm(shape):
    x, w, b, (rm, rv) = _inputs(shape)
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_norm_over_runs(x, None, None, w, b, 0.1, 1e-5), (x, w, b)
    )
    mine_stats, torch_stats = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    mine = batch_norm_over_runs(x, *mine_stats, w, b, 0.1, 1e-5)
    ref = F.batch_norm(x, *torch_stats, w, b, True, 0.1, 1e-5)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(mine, (x, w, b), g)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(grads + mine_stats, ref_grads + torch_stats):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("x_batched", [True, False])
def test_under_vmap_each_run_is_its_own_batch_norm(shape, affine, x_batched):
    runs = 3
    x, w, b, (rm, rv) = _inputs(shape, runs, affine)
    if not x_batched:
        x = x[0].detach().requires_grad_()
    x_dim = 0 if x_batched else None
    wb_dims = (0, 0) if affine else (None, None)
    results = {}
    for name, fn in (("over runs", batch_norm_over_runs), ("torch", F.batch_norm)):
        stats = (rm.clone(), rv.clone())

        def one(x, rm, rv, w, b, fn=fn):
            if fn is F.batch_norm:
                return F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
            return fn(x, rm, rv, w, b, 0.1, 1e-5)

        out = vmap(one, in_dims=(x_dim, 0, 0, *wb_dims))(x, *stats, w, b)
        leaves = [t for t in (x, w, b) if t is not None]
        g = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()
        results[name] = (out, *torch.autograd.grad(out, leaves, g), *stats)
    loop_stats = (rm.clone(), rv.clone())
    loop = torch.stack(
        [
            F.batch_norm(
                x[i] if x_batched else x,
                loop_stats[0][i],
                loop_stats[1][i],
                w[i] if affine else None,
                b[i] if affine else None,
                True,
                0.1,
                1e-5,
            )
            for i in range(runs)
        ]
    )
    torch.testing.assert_close(results["over runs"][0], loop, rtol=1e-12, atol=1e-12)
    for mine, ref in zip(results["over runs"], results["torch"]):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
    for mine, ref in zip(results["over runs"][-2:], loop_stats):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
    assert not torch.equal(results["over runs"][-2], rm)  # the running mean did move


def test_running_statistics_shared_by_the_runs_are_refused():
    x, w, b, (rm, rv) = _inputs((6, 4), runs=2)
    with pytest.raises(RuntimeError, match="running_mean in place"):
        vmap(lambda x, w, b: batch_norm_over_runs(x, rm[0], rv[0], w, b, 0.1, 1e-5))(x, w, b)


def test_the_batch_norm_layer_routes_to_it_for_many_runs_on_the_cpu():
    """BatchNorm uses batch_norm_over_runs in training when its ``vmapped_runs`` (set on
    fit_stacked's copy of the model) times the input's size reaches
    OVER_RUNS_MIN_ELEMENTS, and gives the same result as without."""
    torch.manual_seed(0)
    assert BatchNorm(4).vmapped_runs == 0
    x = torch.randn(256, 4, dtype=torch.float64)
    for runs, routed in ((OVER_RUNS_MIN_ELEMENTS // x.numel(), True), (2, False)):
        layers = [BatchNorm(4).double() for _ in range(2)]
        layers[1].vmapped_runs = runs
        outs = [layer(x) for layer in layers]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            layers[0].running_var, layers[1].running_var, rtol=1e-12, atol=1e-12
        )
        assert ("BatchNormOverRuns" in outs[1].grad_fn.name()) == routed
        assert "BatchNormOverRuns" not in outs[0].grad_fn.name()


class _OwnForward(torch.nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_convert_torch_batchnorm_keeps_the_tensors_and_the_torch_layers_results():
    """torch.nn.BatchNorm1d/2d/3d become resnorm's BatchNorm holding the same tensors;
    outputs, gradients and running statistics equal the torch layer's in float64, in
    training and in eval; a subclass with its own forward is left; (N, C) inputs of the
    converted layers keep torch's vmap rule (over_runs_2d)."""
    torch.manual_seed(0)
    cases = [
        (torch.nn.BatchNorm1d(4), (8, 4)),
        (torch.nn.BatchNorm1d(4, momentum=None), (8, 4, 5)),
        (torch.nn.BatchNorm2d(4, affine=False), (8, 4, 3, 3)),
        (torch.nn.BatchNorm3d(4, track_running_stats=False), (8, 4, 2, 3, 3)),
    ]
    for layer, shape in cases:
        twin = copy.deepcopy(layer).double()
        model = torch.nn.Sequential(torch.nn.Identity(), copy.deepcopy(twin))
        tensors = [*model[1].parameters(), *model[1].buffers()]
        converted = convert_torch_batchnorm(model)
        assert converted is model and type(model[1]) is BatchNorm
        assert model[1].over_runs_2d is False and BatchNorm(4).over_runs_2d is True
        assert all(a is b for a, b in zip([*model[1].parameters(), *model[1].buffers()], tensors))
        for training in (True, True, False):
            model.train(training), twin.train(training)
            x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
            x_twin = x.detach().clone().requires_grad_()
            y, y_twin = model(x), twin(x_twin)
            y.pow(3).sum().backward(), y_twin.pow(3).sum().backward()
            assert torch.equal(y, y_twin) and torch.equal(x.grad, x_twin.grad)
            for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
                assert torch.equal(a, b)
    own = _OwnForward(4)
    assert convert_torch_batchnorm(own) is own and type(own) is _OwnForward
    root = torch.nn.BatchNorm2d(3)
    assert type(convert_torch_batchnorm(root)) is BatchNorm and type(root) is torch.nn.BatchNorm2d
    with pytest.raises(TypeError, match="module must be an nn.Module, got str"):
        convert_torch_batchnorm("bn")
