"""Tests of the layer-normalized recurrent layers in ``resnorm.blocks.recurrent``.

What is checked, and against what:

1. a float64 reference written out here from the docstrings' equations (an explicit loop
   over layers, directions and time steps, its own layer and RMS norm): outputs, final
   states and the gradients of the input, the initial states and every parameter, to
   ~1e-12, for the LSTM and the GRU, 1-2 layers, bidirectional, batch_first, no bias;
2. with ``norm="none"``: state dicts that load into ``torch.nn.LSTM``/``GRU`` (and the
   cells) and back with ``strict=True``, and the same outputs, states and gradients
   (float32 to rounding, float64 to ~1e-12);
3. that the norms normalize: with them the outputs do not depend on the scale of the input
   or of the weights (exactly so with eps=0); without them they do;
4. unbatched inputs, dropout between layers, ``reset_parameters``, ``extra_repr``;
5. bad arguments and bad inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resnorm.blocks import (
    RECURRENT_NORMS,
    LayerNormGRU,
    LayerNormGRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
)

LAYERS = {"LSTM": LayerNormLSTM, "GRU": LayerNormGRU}
CELLS = {"LSTM": LayerNormLSTMCell, "GRU": LayerNormGRUCell}
TWINS = {"LSTM": nn.LSTM, "GRU": nn.GRU}
CELL_TWINS = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell}
F64 = {"atol": 1e-12, "rtol": 1e-10}
F32 = {"atol": 1e-6, "rtol": 1e-5}
T, N, IN, H = 5, 3, 4, 6  # time steps, batch, input features, hidden units


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed: int, dtype=torch.float64, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale + shift).to(dtype)


def _randomize_norms(module: nn.Module, seed: int = 7) -> None:
    """Norm gains about 1 +- 0.5 and biases about 0 +- 0.5, so neither is the identity."""
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            if name.startswith("ln_"):
                noise = _randn(p.shape, seed + i, p.dtype, scale=0.5)
                p.copy_(noise + 1.0 if name.endswith("weight") else noise)


def _n_states(mode: str) -> int:
    return 2 if mode == "LSTM" else 1


# --------------------------------------------------------------------------------------------
# 1. the float64 reference


def _ref_norm(v, gain, bias, kind: str, eps: float):
    if kind == "layer":
        mean = v.mean(dim=-1, keepdim=True)
        var = ((v - mean) ** 2).mean(dim=-1, keepdim=True)
        v = (v - mean) / torch.sqrt(var + eps)
    else:  # rms
        v = v / torch.sqrt((v**2).mean(dim=-1, keepdim=True) + eps)
    v = v * gain
    return v if bias is None else v + bias


def _ref_term(which: str, v, P: dict, suffix: str, kind: str, eps: float):
    """Norm(W v) + b for which = "ih" or "hh"."""
    pre = v @ P[f"weight_{which}{suffix}"].T
    if kind != "none":
        ln = f"ln_{which}{suffix}"
        pre = _ref_norm(pre, P[f"{ln}.weight"], P.get(f"{ln}.bias"), kind, eps)
    bias = P.get(f"bias_{which}{suffix}")
    return pre if bias is None else pre + bias


def _ref_step(mode, x_t, state, P, suffix, kind, eps):
    a = _ref_term("ih", x_t, P, suffix, kind, eps)
    u = _ref_term("hh", state[0], P, suffix, kind, eps)
    if mode == "LSTM":
        pre = a + u
        i, f = torch.sigmoid(pre[:, :H]), torch.sigmoid(pre[:, H : 2 * H])
        g, o = torch.tanh(pre[:, 2 * H : 3 * H]), torch.sigmoid(pre[:, 3 * H :])
        c = f * state[1] + i * g
        ln = f"ln_c{suffix}"
        c_out = (
            c if kind == "none" else _ref_norm(c, P[f"{ln}.weight"], P.get(f"{ln}.bias"), kind, eps)
        )
        return o * torch.tanh(c_out), c
    r = torch.sigmoid(a[:, :H] + u[:, :H])
    z = torch.sigmoid(a[:, H : 2 * H] + u[:, H : 2 * H])
    n = torch.tanh(a[:, 2 * H :] + r * u[:, 2 * H :])
    return ((1 - z) * n + z * state[0],)


def _ref_rnn(mode, x, states, P, num_layers, directions, kind, eps):
    """x (T, N, I), states tuple of (L*D, N, H): output (T, N, D*H), final states."""
    finals = [[] for _ in states]
    for layer in range(num_layers):
        outputs = []
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            state = tuple(s[layer * directions + d] for s in states)
            out = [None] * x.shape[0]
            times = range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])
            for t in times:
                state = _ref_step(mode, x[t], state, P, suffix, kind, eps)
                out[t] = state[0]
            outputs.append(torch.stack(out))
            for k, s in enumerate(state):
                finals[k].append(s)
        x = torch.cat(outputs, dim=-1)
    return x, tuple(torch.stack(f) for f in finals)


def _run(model, mode, x, states):
    hx = None if states is None else (states if mode == "LSTM" else states[0])
    out, final = model(x, hx)
    return out, (final if mode == "LSTM" else (final,))


def _loss(out, final, seed: int):
    """A weighted sum of everything returned, so every output gets a distinct gradient."""
    total = (out * _randn(out.shape, seed, out.dtype)).sum()
    for k, s in enumerate(final):
        total = total + (s * _randn(s.shape, seed + 1 + k, s.dtype)).sum()
    return total


def _inputs(mode, model, batch_first, dtype, seed=0):
    layers_dirs = model.num_layers * model.num_directions
    shape = (N, T, IN) if batch_first else (T, N, IN)
    x = _randn(shape, seed, dtype, scale=2.0, shift=0.5).requires_grad_()
    states = tuple(
        _randn((layers_dirs, N, H), seed + 1 + k, dtype).requires_grad_()
        for k in range(_n_states(mode))
    )
    return x, states


def _grads(out, final, leaves):
    return torch.autograd.grad(_loss(out, final, 100), leaves, allow_unused=False)


def _assert_close(a, b, tol, what):
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


CONFIGS = [  # num_layers, bidirectional, batch_first, norm, bias
    (1, False, False, "layer", True),
    (2, True, True, "layer", True),
    (2, False, False, "rms", True),
    (1, True, False, "layer", False),
]


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,norm,bias", CONFIGS)
def test_matches_float64_reference(mode, num_layers, bidirectional, batch_first, norm, bias):
    torch.manual_seed(0)
    layout = {"batch_first": batch_first, "bidirectional": bidirectional}
    model = LAYERS[mode](
        IN, H, num_layers, bias, **layout, norm=norm, eps=1e-5, dtype=torch.float64
    )
    _randomize_norms(model)
    x, states = _inputs(mode, model, batch_first, torch.float64)
    params = dict(model.named_parameters())
    out, final = _run(model, mode, x, states)
    x_tnf = x.transpose(0, 1) if batch_first else x
    ref_out, ref_final = _ref_rnn(
        mode, x_tnf, states, params, num_layers, 1 + bidirectional, norm, 1e-5
    )
    if batch_first:
        ref_out = ref_out.transpose(0, 1)
    _assert_close(out, ref_out, F64, "output")
    for k, (s, r) in enumerate(zip(final, ref_final)):
        _assert_close(s, r, F64, f"final state {k}")
    leaves = [x, *states, *params.values()]
    names = ["input", *(f"state {k}" for k in range(len(states))), *params]
    for name, g, r in zip(names, _grads(out, final, leaves), _grads(ref_out, ref_final, leaves)):
        _assert_close(g, r, F64, f"gradient of {name}")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_cell_matches_float64_reference(mode):
    cell = CELLS[mode](IN, H, dtype=torch.float64)
    _randomize_norms(cell)
    x = _randn((N, IN), 1, scale=2.0, shift=0.5)
    state = tuple(_randn((N, H), 2 + k) for k in range(_n_states(mode)))
    params = dict(cell.named_parameters())
    got = cell(x, state if mode == "LSTM" else state[0])
    got = got if mode == "LSTM" else (got,)
    want = _ref_step(mode, x, state, params, "", "layer", 1e-5)
    for k, (g, w) in enumerate(zip(got, want)):
        _assert_close(g, w, F64, f"state {k}")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_gradcheck(mode):
    """Autograd's gradients against finite differences, through every norm."""
    model = LAYERS[mode](2, 3, 2, bidirectional=True, dtype=torch.float64)
    _randomize_norms(model)
    x = _randn((3, 2, 2), 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: _loss(*_run(model, mode, v, None), 9), (x,))


# --------------------------------------------------------------------------------------------
# 2. torch.nn twins with normalization off


def _check_same_as_twin(ours, twin, mode, dtype, tol):
    x, states = _inputs(mode, ours, ours.batch_first, dtype, seed=3)
    out, final = _run(ours, mode, x, states)
    twin_out, twin_final = _run(twin, mode, x, states)
    _assert_close(out, twin_out, tol, "output")
    for k, (s, r) in enumerate(zip(final, twin_final)):
        _assert_close(s, r, tol, f"final state {k}")
    names = ["input", *(f"state {k}" for k in range(len(states))), *dict(ours.named_parameters())]
    assert names[1 + len(states) :] == [n for n, _ in twin.named_parameters()]
    grads = _grads(out, final, [x, *states, *ours.parameters()])
    twin_grads = _grads(twin_out, twin_final, [x, *states, *twin.parameters()])
    for name, g, r in zip(names, grads, twin_grads):
        _assert_close(g, r, tol, f"gradient of {name}")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32), (torch.float64, F64)])
@pytest.mark.parametrize("bias", [True, False])
def test_without_norm_is_torch(mode, dtype, tol, bias):
    args = (IN, H, 2, bias, True, 0.0, True)
    ours = LAYERS[mode](*args, norm="none", dtype=dtype)
    twin = TWINS[mode](*args, dtype=dtype)
    assert list(ours.state_dict()) == list(twin.state_dict())
    twin.load_state_dict(ours.state_dict(), strict=True)  # ours -> torch
    _check_same_as_twin(ours, twin, mode, dtype, tol)
    other = TWINS[mode](*args, dtype=dtype)
    ours.load_state_dict(other.state_dict(), strict=True)  # torch -> ours
    _check_same_as_twin(ours, other, mode, dtype, tol)


def test_norm_false_is_none():
    assert LayerNormLSTM(IN, H, norm=False).norm == "none"
    assert LayerNormGRU(IN, H, norm=True).norm == "layer"
    assert "none" in RECURRENT_NORMS


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("batched", [True, False])
def test_cell_without_norm_is_torch(mode, batched):
    ours = CELLS[mode](IN, H, norm="none")
    twin = CELL_TWINS[mode](IN, H)
    twin.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(twin.state_dict(), strict=True)
    shape = (N,) if batched else ()
    x = _randn((*shape, IN), 4, torch.float32)
    state = tuple(_randn((*shape, H), 5 + k, torch.float32) for k in range(_n_states(mode)))
    hx = state if mode == "LSTM" else state[0]
    got, want = ours(x, hx), twin(x, hx)
    for g, w in zip(*((got, want) if mode == "LSTM" else ((got,), (want,)))):
        _assert_close(g, w, F32, "state")


# --------------------------------------------------------------------------------------------
# 3. the norms normalize


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["layer", "rms", "none"])
def test_norm_removes_dependence_on_scale(mode, norm):
    """LN(k W x) = LN(W x) for k > 0 (exactly with eps=0; RMS norm likewise), so with the
    norms the outputs do not depend on the scale of the input, of W_ih or of W_hh; without
    them they do. This fails if a norm is missing or misplaced. (Non-zero initial states:
    with eps=0 the norm of W_hh h_0 = 0 would be 0/0.)"""
    model = LAYERS[mode](IN, H, 2, norm=norm, eps=0.0, dtype=torch.float64)
    x, states = _inputs(mode, model, False, torch.float64, seed=6)
    with torch.no_grad():
        reference, _ = _run(model, mode, x, states)
        changes = []
        for k in (1e-2, 30.0):
            changes.append((_run(model, mode, k * x, states)[0] - reference).abs().max())
            for name, p in model.named_parameters():
                if name.startswith(("weight_ih", "weight_hh")):
                    p.mul_(k)
            changes.append((_run(model, mode, x, states)[0] - reference).abs().max())
            for name, p in model.named_parameters():
                if name.startswith(("weight_ih", "weight_hh")):
                    p.div_(k)
    if norm == "none":
        assert min(changes) > 1e-3, changes
    else:
        assert max(changes) < 1e-10, changes


def test_normalizes_the_concatenated_gates():
    """One norm over the 4H (3H) gate pre-activations per term, one over the H cell values."""
    lstm, gru = LayerNormLSTM(IN, H), LayerNormGRU(IN, H)
    assert lstm.ln_ih_l0.normalized_shape == lstm.ln_hh_l0.normalized_shape == (4 * H,)
    assert lstm.ln_c_l0.normalized_shape == (H,)
    assert gru.ln_ih_l0.normalized_shape == (3 * H,)
    assert "ln_c_l0" not in dict(gru.named_children())
    names = [n for n, _ in gru.named_parameters()]
    assert names == [
        *("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"),
        *("ln_ih_l0.weight", "ln_ih_l0.bias", "ln_hh_l0.weight", "ln_hh_l0.bias"),
    ]


# --------------------------------------------------------------------------------------------
# 4. layouts, dropout, initialization, repr


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_unbatched_input_is_a_batch_of_one(mode):
    model = LAYERS[mode](IN, H, 2, bidirectional=True)
    x = _randn((T, IN), 8, torch.float32)
    states = tuple(_randn((4, H), 9 + k, torch.float32) for k in range(_n_states(mode)))
    out, final = _run(model, mode, x, states)
    out1, final1 = _run(model, mode, x.unsqueeze(1), tuple(s.unsqueeze(1) for s in states))
    assert out.shape == (T, 2 * H)
    _assert_close(out, out1.squeeze(1), F32, "output")
    for s, s1 in zip(final, final1):
        _assert_close(s, s1.squeeze(1), F32, "final state")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_dropout_acts_between_layers_in_training_only(mode):
    torch.manual_seed(0)
    model = LAYERS[mode](IN, H, 2, dropout=0.5)
    plain = LAYERS[mode](IN, H, 2)
    plain.load_state_dict(model.state_dict())
    x = _randn((T, N, IN), 10, torch.float32)
    _assert_close(model.eval()(x)[0], plain(x)[0], F32, "eval output")
    assert not torch.allclose(model.train()(x)[0], plain(x)[0])
    with pytest.warns(UserWarning, match="num_layers=1"):
        LAYERS[mode](IN, H, 1, dropout=0.5)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU, LayerNormLSTMCell, LayerNormGRUCell])
def test_reset_parameters_is_torch_init(cls):
    module = cls(IN, H)
    _randomize_norms(module)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(10.0)
    module.reset_parameters()
    bound = H**-0.5
    for name, p in module.named_parameters():
        if name.startswith("ln_"):
            assert torch.equal(
                p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
            )
        else:
            assert p.abs().max() <= bound and p.std() > bound / 4, name


def test_extra_repr():
    lstm = LayerNormLSTM(IN, H, 2, bias=False, batch_first=True, bidirectional=True)
    assert lstm.extra_repr() == (
        "4, 6, num_layers=2, bias=False, batch_first=True, bidirectional=True, norm='layer'"
    )
    assert "(ln_c_l1_reverse): LayerNorm((6,), eps=1e-05" in repr(lstm)
    assert repr(LayerNormGRUCell(IN, H, norm="none")) == "LayerNormGRUCell(4, 6, norm='none')"
    assert "eps=0.001" in repr(LayerNormGRU(IN, H, eps=1e-3, norm="rms"))


# --------------------------------------------------------------------------------------------
# 5. errors


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"hidden_size": 0}, ValueError, "hidden_size must be an integer >= 1, got 0"),
        ({"hidden_size": 2.5}, TypeError, "hidden_size must be an integer, got 2.5"),
        ({"norm": "batch"}, ValueError, "norm='batch' is not supported.*'layer', 'rms', 'none'"),
        ({"norm": "foo"}, ValueError, "norm='foo'"),
        ({"dropout": 1.5}, ValueError, r"dropout must be in \[0, 1\], got 1.5"),
        ({"bias": "yes"}, TypeError, "bias must be True or False, got 'yes'"),
        ({"eps": -1.0}, ValueError, "eps must be in"),
        ({"num_layers": 0}, ValueError, "num_layers must be an integer >= 1"),
    ],
)
@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_bad_arguments(cls, kwargs, error, match):
    arguments = {"input_size": IN, "hidden_size": H, **kwargs}
    with pytest.raises(error, match=match):
        cls(**arguments)


@pytest.mark.parametrize("cls", [LayerNormLSTMCell, LayerNormGRUCell])
def test_cell_bad_arguments(cls):
    with pytest.raises(ValueError, match="hidden_size must be an integer >= 1, got -3"):
        cls(IN, -3)
    with pytest.raises(ValueError, match="norm='group'"):
        cls(IN, H, norm="group")


def test_bad_inputs():
    lstm = LayerNormLSTM(IN, H, 2)
    with pytest.raises(
        ValueError, match=r"input_size=4 features in its last dim, got shape \(5, 3, 7\)"
    ):
        lstm(torch.zeros(T, N, 7))
    with pytest.raises(ValueError, match="input must be 2-D or 3-D"):
        lstm(torch.zeros(1, T, N, IN))
    with pytest.raises(ValueError, match=r"c0 must have shape \(2, 3, 6\), got \(1, 3, 6\)"):
        lstm(torch.zeros(T, N, IN), (torch.zeros(2, N, H), torch.zeros(1, N, H)))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h0, c0\)"):
        lstm(torch.zeros(T, N, IN), torch.zeros(2, N, H))
    with pytest.raises(ValueError, match="no time steps"):
        LayerNormGRU(IN, H)(torch.zeros(0, N, IN))
    with pytest.raises(ValueError, match=r"h0 must have shape \(3, 6\)"):
        LayerNormGRUCell(IN, H)(torch.zeros(N, IN), torch.zeros(N, H + 1))
