r"""Layer-normalized recurrent cells and layers: LSTM and GRU (Ba et al., 2016).

PyTorch has no normalized recurrent layer in core. These follow Ba, Kiros & Hinton,
"Layer Normalization" (arXiv:1607.06450, section 3.1 and the LSTM equations of its
appendix): the input-to-hidden and the hidden-to-hidden pre-activations are normalized
separately, each with its own gain and bias, and the LSTM's cell state is normalized
before the output ``tanh``.

Each normalization is over the whole concatenated gate vector (4H for the LSTM, 3H for
the GRU), as in the paper, where ``W_x x`` and ``W_h h`` are one matrix product each and
"the summed inputs" of the layer are normalized together. Per-gate statistics are a
variant some libraries use; the concatenated form is the paper's and costs one norm per
term. The gains and biases are per unit (4H or 3H values), so each gate still gets its
own scale and shift.

Parameter names are ``torch.nn.LSTM``/``GRU``'s (``weight_ih_l0``, ``bias_hh_l0``, the
``_reverse`` suffix for the backward direction; ``weight_ih``, ... for the cells); the
norms are ``ln_ih_l0``, ``ln_hh_l0`` and (LSTM) ``ln_c_l0``. With ``norm="none"`` (or
``norm=False``) no norm is built, the state dict is exactly torch's, and the outputs are
torch's to rounding. The time loop is plain PyTorch (see docs/recurrent.md for its speed).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_float, check_input, check_int
from ..errors import UsageError, UsageTypeError
from ..norms import make_norm

RECURRENT_NORMS = ("layer", "rms", "none")
_GATES = {"LSTM": 4, "GRU": 3}
_STATE_NAMES = {"LSTM": ("h0", "c0"), "GRU": ("h0",)}


def _resolve_norm(norm) -> str:
    """``True`` means ``"layer"``; ``False`` and ``None`` mean ``"none"``."""
    if norm is True:
        return "layer"
    if norm is False or norm is None:
        return "none"
    if isinstance(norm, str) and norm in RECURRENT_NORMS:
        return norm
    raise UsageError(
        f"norm={norm!r} is not supported by the recurrent layers; accepted values: "
        "True (= 'layer'), False or None (= 'none'), 'layer', 'rms', 'none'"
    )


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise UsageTypeError(
            f"{name} must be True or False, got {value!r} ({type(value).__name__})"
        )
    return value


class _Params(NamedTuple):
    """The tensors and norms of one layer and direction (or of a cell)."""

    weight_ih: torch.Tensor
    weight_hh: torch.Tensor
    bias_ih: torch.Tensor | None
    bias_hh: torch.Tensor | None
    ln_ih: nn.Module | None
    ln_hh: nn.Module | None
    ln_c: nn.Module | None


def _affine(x: torch.Tensor, weight, bias, norm) -> torch.Tensor:
    """``Norm(W x) + b`` (``W x + b`` without a norm)."""
    y = F.linear(x, weight)
    if norm is not None:
        y = norm(y)
    return y if bias is None else y + bias


def _lstm_step(gx: torch.Tensor, state: tuple, p: _Params) -> tuple:
    """One LSTM step; ``gx = LN_ih(W_ih x) + b_ih`` is computed beforehand."""
    h, c = state
    gates = gx + _affine(h, p.weight_hh, p.bias_hh, p.ln_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    cell = c if p.ln_c is None else p.ln_c(c)
    return torch.sigmoid(o) * torch.tanh(cell), c


def _gru_step(gx: torch.Tensor, state: tuple, p: _Params) -> tuple:
    """One GRU step; ``gx = LN_ih(W_ih x) + b_ih`` is computed beforehand."""
    (h,) = state
    gh = _affine(h, p.weight_hh, p.bias_hh, p.ln_hh)
    x_r, x_z, x_n = gx.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return ((1 - z) * n + z * h,)


_STEPS = {"LSTM": _lstm_step, "GRU": _gru_step}


class _RecurrentBase(nn.Module):
    """What cells and layers share: arguments, parameters, initialization, states."""

    mode = "LSTM"

    def _setup(self, input_size, hidden_size, bias, norm, eps) -> None:
        self.input_size = check_int("input_size", input_size, minimum=1)
        self.hidden_size = check_int("hidden_size", hidden_size, minimum=1)
        self.bias = _check_bool("bias", bias)
        self.norm = _resolve_norm(norm)
        self.eps = None if eps is None else check_float("eps", eps, low=0.0, finite=True)

    def _add_weights(self, suffix: str, input_size: int, factory: dict) -> None:
        """torch's parameters (same names, shapes and order), then the norms."""
        rows = _GATES[self.mode] * self.hidden_size
        shapes = {"weight_ih": (rows, input_size), "weight_hh": (rows, self.hidden_size)}
        for name, shape in shapes.items():
            self.register_parameter(name + suffix, nn.Parameter(torch.empty(shape, **factory)))
        for name in ("bias_ih", "bias_hh"):
            bias = nn.Parameter(torch.empty(rows, **factory)) if self.bias else None
            self.register_parameter(name + suffix, bias)
        norms = {"ln_ih": rows, "ln_hh": rows, "ln_c": self.hidden_size}
        for name, size in norms.items():
            if self.norm != "none" and (name != "ln_c" or self.mode == "LSTM"):
                self.add_module(name + suffix, self._make_norm(size, factory))

    def _make_norm(self, size: int, factory: dict) -> nn.Module:
        options = {} if self.eps is None else {"eps": self.eps}
        return make_norm(self.norm, size, channel_dim=-1, **options, **factory)

    def _params(self, suffix: str) -> _Params:
        """The tensors and norms of one layer and direction; ``None`` for an absent one."""
        return _Params(*(getattr(self, name + suffix, None) for name in _Params._fields))

    def reset_parameters(self) -> None:
        """torch's initialization: every weight and bias uniform in (-1/sqrt(H), 1/sqrt(H));
        norm gains 1 and biases 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for param in self.parameters(recurse=False):
            nn.init.uniform_(param, -bound, bound)
        for norm in self.children():
            norm.reset_parameters()

    def _initial_states(self, hx, shape: tuple, batch_dim: int, batched: bool, like) -> tuple:
        """The initial states as batched tensors of ``shape``: zeros for ``hx=None``, else
        ``hx`` (a tuple of tensors) checked against ``shape`` (without the batch dim for an
        unbatched input)."""
        names = _STATE_NAMES[self.mode]
        if hx is None:
            return tuple(like.new_zeros(shape) for _ in names)
        what = type(self).__name__
        if not isinstance(hx, (tuple, list)) or len(hx) != len(names):
            raise UsageTypeError(
                f"{what}: hx must be a tuple ({', '.join(names)}) of tensors, got {type(hx).__name__}"
            )
        expected = shape if batched else shape[:batch_dim] + shape[batch_dim + 1 :]
        for name, state in zip(names, hx):
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            if got != expected:
                raise UsageError(f"{what}: {name} must have shape {expected}, got {got}")
        return tuple(s if batched else s.unsqueeze(batch_dim) for s in hx)

    def _check_features(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.input_size:
            raise UsageError(
                f"{type(self).__name__}: input must have input_size={self.input_size} features "
                f"in its last dim, got shape {tuple(x.shape)}"
            )

    def _norm_repr(self) -> str:
        return f", norm={self.norm!r}" + ("" if self.eps is None else f", eps={self.eps:g}")


class _LayerNormRNN(_RecurrentBase):
    """A stack of layers, each one or two directions, over a whole sequence."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        norm: str | bool | None = "layer",
        eps: float | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._setup(input_size, hidden_size, bias, norm, eps)
        self.num_layers = check_int("num_layers", num_layers, minimum=1)
        self.batch_first = _check_bool("batch_first", batch_first)
        self.dropout = check_float("dropout", dropout, low=0.0, high=1.0)
        self.bidirectional = _check_bool("bidirectional", bidirectional)
        if self.dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout acts between recurrent layers, so dropout > 0 with num_layers=1 "
                f"does nothing (got dropout={self.dropout:g})",
                stacklevel=2,
            )
        self.num_directions = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        for layer in range(self.num_layers):
            size = input_size if layer == 0 else hidden_size * self.num_directions
            for direction in range(self.num_directions):
                self._add_weights(self._suffix(layer, direction), size, factory)
        self.reset_parameters()

    @staticmethod
    def _suffix(layer: int, direction: int) -> str:
        return f"_l{layer}" + ("_reverse" if direction else "")

    def _run_direction(self, x: torch.Tensor, state: tuple, suffix: str, reverse: bool):
        """One direction of one layer over (T, N, features): the (T, N, H) outputs and the
        final state."""
        p = self._params(suffix)
        step = _STEPS[self.mode]
        gx = _affine(x, p.weight_ih, p.bias_ih, p.ln_ih)  # every time step in one product
        outputs = [None] * x.shape[0]
        for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
            state = step(gx[t], state, p)
            outputs[t] = state[0]
        return torch.stack(outputs), state

    def _forward(self, input: torch.Tensor, hx) -> tuple[torch.Tensor, tuple]:
        """The shared forward: ``hx`` is a tuple of states or ``None``; returns the output
        and the tuple of final states, in the caller's layout."""
        check_input("input", input, ndims=(2, 3), what=type(self).__name__)
        self._check_features(input)
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(1)  # (T, 1, features)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        if x.shape[0] == 0:
            raise UsageError(
                f"{type(self).__name__}: input has no time steps, shape {tuple(input.shape)}"
            )
        shape = (self.num_layers * self.num_directions, x.shape[1], self.hidden_size)
        states = self._initial_states(hx, shape, 1, batched, x)
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                state = tuple(s[index] for s in states)
                suffix = self._suffix(layer, direction)
                out, state = self._run_direction(x, state, suffix, reverse=direction == 1)
                outputs.append(out)
                finals.append(state)
            x = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        final = tuple(torch.stack(parts) for parts in zip(*finals))
        if not batched:
            return x.squeeze(1), tuple(s.squeeze(1) for s in final)
        return (x.transpose(0, 1) if self.batch_first else x), final

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout:g}"
        if self.bidirectional:
            text += ", bidirectional=True"
        return text + self._norm_repr()


_LAYER_ARGS = """
    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional:
            as in ``torch.nn.{mode}`` (dropout acts on the outputs of every layer but the
            last, in training mode). ``proj_size`` is not supported.
        norm: ``"layer"`` (default, or ``True``), ``"rms"`` (RMS norm: no centring, no
            norm bias) or ``"none"`` (``False``/``None``: no norm, torch's {mode}).
        eps: the norms' epsilon; default that of :func:`resnorm.norms.make_norm` (1e-5
            for layer norm, the dtype's machine epsilon for RMS norm).
"""


class LayerNormLSTM(_LayerNormRNN):
    __doc__ = r"""A multi-layer LSTM with layer normalization (Ba et al., 2016), the interface of
    ``torch.nn.LSTM``. At each time step t, layer by layer:

    .. math::
        (i, f, g, o) &= \mathrm{LN}_{ih}(W_{ih} x_t) + b_{ih}
                        + \mathrm{LN}_{hh}(W_{hh} h_{t-1}) + b_{hh} \\
        c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g) \\
        h_t &= \sigma(o) \odot \tanh(\mathrm{LN}_c(c_t))

    where :math:`\mathrm{LN}_{ih}` and :math:`\mathrm{LN}_{hh}` normalize the whole 4H
    vector of gate pre-activations (torch's gate order i, f, g, o), each with its own 4H
    gain and bias, and :math:`\mathrm{LN}_c` normalizes the H cell values (the cell state
    carried to the next step is the unnormalized :math:`c_t`). Without normalization the
    equations are ``torch.nn.LSTM``'s, and so are the parameters.

    ``forward(input, (h0, c0)=None) -> output, (h_n, c_n)`` with torch's shapes: input
    (T, N, input_size) (``(N, T, ...)`` with ``batch_first``) or unbatched (T, input_size);
    output (T, N, D*H); states (D*num_layers, N, H), D = 2 if bidirectional.
    """ + _LAYER_ARGS.format(mode="LSTM")

    mode = "LSTM"

    def forward(self, input: torch.Tensor, hx: tuple | None = None):
        output, (h_n, c_n) = self._forward(input, hx)
        return output, (h_n, c_n)


class LayerNormGRU(_LayerNormRNN):
    __doc__ = r"""A multi-layer GRU with layer normalization, the interface of ``torch.nn.GRU``.
    At each time step t, layer by layer:

    .. math::
        (a_r, a_z, a_n) &= \mathrm{LN}_{ih}(W_{ih} x_t) + b_{ih} \\
        (u_r, u_z, u_n) &= \mathrm{LN}_{hh}(W_{hh} h_{t-1}) + b_{hh} \\
        r &= \sigma(a_r + u_r), \quad z = \sigma(a_z + u_z) \\
        n &= \tanh(a_n + r \odot u_n) \\
        h_t &= (1 - z) \odot n + z \odot h_{t-1}

    Ba et al.'s rule for the LSTM (normalize the input and the recurrent summed inputs
    separately, over the whole 3H vector, each with its own gain and bias), with torch's
    gate order (r, z, n) and torch's reset-gate placement (r scales the normalized
    recurrent candidate term), so that without normalization it is ``torch.nn.GRU``. No
    norm on the state: :math:`h_t` is a convex combination of values in (-1, 1).

    ``forward(input, h0=None) -> output, h_n`` with torch's shapes (see
    :class:`LayerNormLSTM`).
    """ + _LAYER_ARGS.format(mode="GRU")

    mode = "GRU"

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None):
        output, (h_n,) = self._forward(input, None if hx is None else (hx,))
        return output, h_n


class _LayerNormCell(_RecurrentBase):
    """One time step; parameters named like ``torch.nn.LSTMCell``/``GRUCell``'s."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        *,
        norm: str | bool | None = "layer",
        eps: float | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._setup(input_size, hidden_size, bias, norm, eps)
        self._add_weights("", input_size, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def _forward(self, input: torch.Tensor, hx) -> tuple:
        check_input("input", input, ndims=(1, 2), what=type(self).__name__)
        self._check_features(input)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        states = self._initial_states(hx, (x.shape[0], self.hidden_size), 0, batched, x)
        p = self._params("")
        state = _STEPS[self.mode](_affine(x, p.weight_ih, p.bias_ih, p.ln_ih), states, p)
        return state if batched else tuple(s.squeeze(0) for s in state)

    def extra_repr(self) -> str:
        bias = "" if self.bias else ", bias=False"
        return f"{self.input_size}, {self.hidden_size}{bias}" + self._norm_repr()


class LayerNormLSTMCell(_LayerNormCell):
    """One step of :class:`LayerNormLSTM` (same equations), the interface of
    ``torch.nn.LSTMCell``: ``forward(input, (h, c)=None) -> (h', c')`` on (N, input_size)
    or unbatched (input_size,). Parameters ``weight_ih``, ``weight_hh``, ``bias_ih``,
    ``bias_hh`` (torch's) and the norms ``ln_ih``, ``ln_hh``, ``ln_c``."""

    mode = "LSTM"

    def forward(self, input: torch.Tensor, hx: tuple | None = None):
        h, c = self._forward(input, hx)
        return h, c


class LayerNormGRUCell(_LayerNormCell):
    """One step of :class:`LayerNormGRU` (same equations), the interface of
    ``torch.nn.GRUCell``: ``forward(input, h=None) -> h'``. Parameters as torch's, norms
    ``ln_ih`` and ``ln_hh``."""

    mode = "GRU"

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None):
        (h,) = self._forward(input, None if hx is None else (hx,))
        return h


__all__ = [
    "RECURRENT_NORMS",
    "LayerNormGRU",
    "LayerNormGRUCell",
    "LayerNormLSTM",
    "LayerNormLSTMCell",
]
