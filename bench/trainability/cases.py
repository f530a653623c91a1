"""The trainability benchmark's cases: small networks written in plain ``torch.nn``.

Every case is a small function, registered with ``@case``, that builds one network and
returns a :class:`Spec`: the model, the input layout it reads, the optimizer and learning
rate it is trained with, and the design tags (depth, activation, normalization, residual,
initialization, optimizer/lr, family). Nothing here imports resnorm: the benchmark is the
ground truth that resnorm's diagnostics are scored against, so it must not depend on them.

    from cases import CASES, build_case, fixed_batch, scored_labels

    spec = build_case("mlp_sigmoid_d16_default_sgd", seed=0)   # seeds torch, then builds
    x, y = fixed_batch(spec.layout)                            # 256 MNIST-1D samples
    labels = scored_labels()          # {case: label}, the cases whose seeds agree

Input layouts (MNIST-1D: sequences of 40 values, 10 classes):

* ``flat``: (N, 40), for MLPs;
* ``channels``: (N, 1, 40), for Conv1d nets;
* ``seq``: (N, 40, 1), one value per time step, for GRU/LSTM;
* ``chunks``: (N, 10, 4), ten consecutive chunks of 4 values: time steps of a GRU/LSTM or
  the tokens of a Transformer.

Tags (see README.md): ``depth`` counts the weight layers on the path from input to output
(an MLP's Linear layers including the head; a residual net's blocks plus stem and head; a
Conv1d net's conv layers plus head; recurrent layers plus head; Transformer blocks).
``residual``: ``none`` (no skips), ``plain`` (``x + f(x)``, no normalization), ``pre``
(``x + f(norm(x))``: pre-norm / pre-activation), ``post`` (``norm(x + f(x))``) or
``branch`` (ResNet v1: ``act(x + norm(conv(...)))``, the norm at the end of the branch).
``intended`` is the outcome the case was designed for; the ground truth is what training
actually did (groundtruth.json), never this tag.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DATA_PATH = HERE / "mnist1d.npz"  # generated, gitignored
GROUNDTRUTH_PATH = HERE / "groundtruth.json"

LAYOUTS = ("flat", "channels", "seq", "chunks")
LABELS = ("trains", "diverges", "fails_vanishing", "fails_other")
WIDTH = 64  # hidden width of the MLPs and residual MLPs
CHANNELS = 32  # channels of the Conv1d nets
D_MODEL = 32  # Transformer width (4 heads, feed-forward 64)


# --------------------------------------------------------------------------- data


def load_mnist1d(path: Path = DATA_PATH) -> dict[str, np.ndarray]:
    """MNIST-1D with the ``mnist1d`` package's default arguments (5,000 samples: 4,000 for
    training and 1,000 for testing, seed 42), generated locally by ``make_dataset`` (its
    ``get_dataset`` would try a download first) and cached as ``mnist1d.npz`` beside this
    file. Arrays: ``x`` (4000, 40) float32, ``y`` (4000,) int64, ``x_test``, ``y_test``."""
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:  # make_dataset reseeds the global generators; put them back after
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {
        "x": data["x"].astype(np.float32),
        "y": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return arrays


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, 40) -> the shape a case's model reads."""
    if layout == "flat":
        return x
    if layout == "channels":
        return x.unsqueeze(1)
    if layout == "seq":
        return x.unsqueeze(2)
    if layout == "chunks":
        return x.reshape(x.shape[0], 10, 4)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def fixed_batch(layout: str, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed MNIST-1D batch: the first ``n`` training samples, in ``layout``. The
    same batch for every case and every call (for diagnostics at initialization)."""
    data = load_mnist1d()
    x = torch.from_numpy(data["x"][:n].copy())
    y = torch.from_numpy(data["y"][:n].copy())
    return to_layout(x, layout), y


def load_groundtruth(path: Path = GROUNDTRUTH_PATH) -> dict:
    """groundtruth.json: ``labels`` ({case: one of LABELS or "unstable"}), ``results``
    ({case: {seed: record}}), ``cases`` ({case: tags}), ``rules``, ``budget``,
    ``versions``, ``command``."""
    return json.loads(Path(path).read_text())


def scored_labels(path: Path = GROUNDTRUTH_PATH) -> dict[str, str]:
    """{case: label} for the cases to score: those whose label is the same for every seed
    (``unstable`` ones left out)."""
    return {k: v for k, v in load_groundtruth(path)["labels"].items() if v in LABELS}


# --------------------------------------------------------------------------- specs


@dataclass
class Spec:
    """What a case function returns."""

    model: nn.Module
    layout: str
    optimizer: str  # "sgd" (momentum 0.9), "sgd0" (no momentum), "adam", "adamw"
    lr: float
    family: str
    depth: int
    activation: str
    norm: str
    residual: str
    init: str
    intended: str
    note: str = ""
    tags: dict = field(default_factory=dict)  # filled by build_case: the tags as a dict

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        if self.optimizer == "sgd0":
            return torch.optim.SGD(params, lr=self.lr)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        raise ValueError(f"unknown optimizer {self.optimizer!r}")

    def tag_dict(self) -> dict:
        return {
            "family": self.family,
            "layout": self.layout,
            "depth": self.depth,
            "activation": self.activation,
            "norm": self.norm,
            "residual": self.residual,
            "init": self.init,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "intended": self.intended,
            "note": self.note,
        }


CASES: dict[str, Callable[[], Spec]] = {}


def case(fn: Callable[[], Spec]) -> Callable[[], Spec]:
    """Register a case function under its name."""
    if fn.__name__ in CASES:
        raise ValueError(f"duplicate case {fn.__name__}")
    CASES[fn.__name__] = fn
    return fn


def build_case(name: str, seed: int = 0) -> Spec:
    """Seed torch's generator with ``seed``, then build the case ``name``."""
    torch.manual_seed(seed)
    spec = CASES[name]()
    spec.tags = spec.tag_dict()
    return spec


# --------------------------------------------------------------------------- building blocks


def _act(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "identity": nn.Identity,
    }[name]()


def _norm(kind: str, features: int, conv: bool = False) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(features)
    if kind == "layer":  # a conv's layer norm: over channels and positions of one sample
        return nn.GroupNorm(1, features) if conv else nn.LayerNorm(features)
    if kind == "group":
        return nn.GroupNorm(8, features)
    raise ValueError(kind)


_GAIN = {
    "relu": math.sqrt(2.0),
    "gelu": math.sqrt(2.0),
    "tanh": 5.0 / 3.0,
    "sigmoid": 1.0,
    "identity": 1.0,
}


def _weights(model: nn.Module):
    """The weight matrices / kernels of Linear, Conv1d, attention and recurrent layers."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            yield m.weight
        elif isinstance(m, nn.MultiheadAttention):
            yield m.in_proj_weight
        elif isinstance(m, (nn.GRU, nn.LSTM)):
            for name, p in m.named_parameters():
                if name.startswith("weight"):
                    yield p


def _biases(model: nn.Module):
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)) and m.bias is not None:
            yield m.bias
        elif isinstance(m, (nn.GRU, nn.LSTM)):
            for name, p in m.named_parameters():
                if name.startswith("bias"):
                    yield p


@torch.no_grad()
def _init(model: nn.Module, init: str, act: str) -> None:
    """Re-initialize every weight matrix/kernel: "default" (torch's), "he" (Kaiming normal,
    fan-in, ReLU gain; biases 0), "xavier" (Glorot normal with the activation's gain;
    biases 0), "normal1" (every weight N(0, 1)), "x0.1" / "x3" (torch's default times 0.1 /
    3), "zero" (every weight and bias 0)."""
    if init == "default":
        return
    for w in _weights(model):
        if init == "he":
            nn.init.kaiming_normal_(w, nonlinearity="relu")
        elif init == "xavier":
            nn.init.xavier_normal_(w, gain=_GAIN[act])
        elif init == "normal1":
            nn.init.normal_(w, 0.0, 1.0)
        elif init == "x0.1":
            w.mul_(0.1)
        elif init == "x3":
            w.mul_(3.0)
        elif init == "zero":
            w.zero_()
        else:
            raise ValueError(init)
    if init in ("he", "xavier", "zero"):
        for b in _biases(model):
            b.zero_()


@torch.no_grad()
def _dead_biases(modules, value: float) -> None:
    for m in modules:
        m.bias.fill_(value)


# --------------------------------------------------------------------------- MLPs


def _mlp(depth: int, act: str, norm: str = "none", width: int = WIDTH) -> nn.Sequential:
    """``depth`` Linear layers: (depth - 1) x [Linear, norm, act] then the Linear head."""
    layers: list[nn.Module] = []
    d_in = 40
    for _ in range(depth - 1):
        layers += [nn.Linear(d_in, width), _norm(norm, width), _act(act)]
        d_in = width
    layers.append(nn.Linear(d_in, 10))
    return nn.Sequential(*layers)


def mlp_spec(
    depth: int,
    act: str,
    *,
    norm: str = "none",
    init: str = "default",
    opt: str = "adam",
    lr: float = 3e-3,
    intended: str,
    extra: str = "",
    note: str = "",
) -> Spec:
    """A plain MLP. ``extra``: "zero_head" (head weight and bias 0), "dead_bias" (every
    hidden Linear's bias -5: all ReLUs off for every input)."""
    model = _mlp(depth, act, norm)
    _init(model, init, act)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    if extra == "zero_head":
        with torch.no_grad():
            linears[-1].weight.zero_()
            linears[-1].bias.zero_()
    elif extra == "dead_bias":
        _dead_biases(linears[:-1], -5.0)
    elif extra:
        raise ValueError(extra)
    return Spec(
        model,
        "flat",
        opt,
        lr,
        "mlp",
        depth,
        act,
        norm,
        "none",
        init + (f"+{extra}" if extra else ""),
        intended,
        note,
    )


class ResMLP(nn.Module):
    """stem Linear(40, W) -> ``blocks`` residual blocks -> [final norm] -> Linear head.

    Block (one Linear each), by ``residual``:
    ``pre``: x + s * Linear(act(norm(x))); ``post``: norm(x + s * act(Linear(x)));
    ``plain``: x + s * Linear(act(x)); ``pre2``: x + s * norm2(Linear(act(norm(x)))), a
    pre-norm block whose branch ends in a norm (its scale is what "zero_last_norm" zeroes).
    ``s`` is a learnable scalar, 1 at init (0 with "zero_scale": SkipInit / ReZero)."""

    def __init__(self, blocks: int, act: str, norm: str, residual: str, width: int = WIDTH):
        super().__init__()
        self.residual = residual
        self.stem = nn.Linear(40, width)
        self.norms = nn.ModuleList(_norm(norm, width) for _ in range(blocks))
        self.norms2 = nn.ModuleList(
            _norm(norm, width) if residual == "pre2" else nn.Identity() for _ in range(blocks)
        )
        self.linears = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.acts = nn.ModuleList(_act(act) for _ in range(blocks))
        self.scales = nn.Parameter(torch.ones(blocks))
        self.final_norm = _norm(norm, width) if residual in ("pre", "pre2") else nn.Identity()
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        for i, lin in enumerate(self.linears):
            s, n, a = self.scales[i], self.norms[i], self.acts[i]
            if self.residual == "pre":
                x = x + s * lin(a(n(x)))
            elif self.residual == "pre2":
                x = x + s * self.norms2[i](lin(a(n(x))))
            elif self.residual == "post":
                x = n(x + s * a(lin(x)))
            elif self.residual == "plain":
                x = x + s * lin(a(x))
            else:
                raise ValueError(self.residual)
        return self.head(self.final_norm(x))


def resmlp_spec(
    blocks: int,
    act: str,
    *,
    norm: str,
    residual: str,
    init: str = "default",
    opt: str = "adam",
    lr: float = 3e-3,
    intended: str,
    extra: str = "",
    note: str = "",
) -> Spec:
    """A residual MLP. ``extra``: "zero_head", "zero_scale" (every block's s = 0),
    "zero_last_norm" (residual "pre2": every branch's last norm weight 0, Goyal et al.
    2017), "dead_bias" (bias -5 on what feeds every block's ReLU: the norm of a pre block,
    else the Linear)."""
    model = ResMLP(blocks, act, norm, residual)
    _init(model, init, act)
    with torch.no_grad():
        if extra == "zero_head":
            model.head.weight.zero_()
            model.head.bias.zero_()
        elif extra == "zero_scale":
            model.scales.zero_()
        elif extra == "zero_last_norm":
            for n in model.norms2:
                n.weight.zero_()
        elif extra == "dead_bias":  # the ReLU reads norm(x) in a pre block: the norm's bias
            _dead_biases(model.norms if residual in ("pre", "pre2") else model.linears, -5.0)
        elif extra:
            raise ValueError(extra)
    res = "pre" if residual == "pre2" else residual
    return Spec(
        model,
        "flat",
        opt,
        lr,
        "resmlp",
        blocks + 2,
        act,
        norm,
        res,
        init + (f"+{extra}" if extra else ""),
        intended,
        note,
    )


# --------------------------------------------------------------------------- Conv1d


def _cnn(depth: int, act: str, norm: str) -> nn.Sequential:
    """(depth - 1) x [Conv1d(k=5), norm, act] with stride 2 in the first three (40 -> 5
    positions), then flatten and a Linear head."""
    layers: list[nn.Module] = []
    c_in, length = 1, 40
    for i in range(depth - 1):
        stride = 2 if i < 3 else 1
        layers += [
            nn.Conv1d(c_in, CHANNELS, 5, stride=stride, padding=2),
            _norm(norm, CHANNELS, conv=True),
            _act(act),
        ]
        c_in, length = CHANNELS, (length + stride - 1) // stride
    layers += [nn.Flatten(), nn.Linear(CHANNELS * length, 10)]
    return nn.Sequential(*layers)


def cnn_spec(
    depth: int,
    act: str,
    *,
    norm: str = "none",
    init: str = "default",
    opt: str = "adam",
    lr: float = 3e-3,
    intended: str,
    extra: str = "",
    note: str = "",
) -> Spec:
    model = _cnn(depth, act, norm)
    _init(model, init, act)
    if extra == "dead_bias":
        _dead_biases([m for m in model if isinstance(m, nn.Conv1d)], -5.0)
    elif extra:
        raise ValueError(extra)
    return Spec(
        model,
        "channels",
        opt,
        lr,
        "conv1d",
        depth,
        act,
        norm,
        "none",
        init + (f"+{extra}" if extra else ""),
        intended,
        note,
    )


class ResBlock1d(nn.Module):
    """Two 3-tap convolutions with a skip. ``pre`` (ResNet v2): x + s*conv(act(n(conv(act(
    n(x)))))); ``branch`` (ResNet v1): act(x + s*n2(conv(act(n1(conv(x)))))); ``post``:
    act(n(x + s*conv(act(conv(x))))); ``plain``: x + s*conv(act(conv(act(x))))."""

    def __init__(self, c: int, act: str, norm: str, residual: str):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv1d(c, c, 3, padding=1)
        self.conv2 = nn.Conv1d(c, c, 3, padding=1)
        self.n1 = _norm(norm, c, conv=True)
        self.n2 = _norm(norm, c, conv=True)
        self.act = _act(act)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        a, s = self.act, self.scale
        if self.residual == "pre":
            return x + s * self.conv2(a(self.n2(self.conv1(a(self.n1(x))))))
        if self.residual == "branch":
            return a(x + s * self.n2(self.conv2(a(self.n1(self.conv1(x))))))
        if self.residual == "post":
            return a(self.n1(x + s * self.conv2(a(self.conv1(x)))))
        if self.residual == "plain":
            return x + s * self.conv2(a(self.conv1(a(x))))
        raise ValueError(self.residual)


class ResNet1d(nn.Module):
    """stem Conv1d(1, C, 5, stride 2) -> 3 stages of ``blocks_per_stage`` blocks (average
    pooling by 2 between stages: 20 -> 10 -> 5 positions) -> [norm, act for ``pre``] -> global average pool ->
    Linear head."""

    def __init__(self, blocks_per_stage: int, act: str, norm: str, residual: str):
        super().__init__()
        self.stem = nn.Conv1d(1, CHANNELS, 5, stride=2, padding=2)
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(ResBlock1d(CHANNELS, act, norm, residual) for _ in range(blocks_per_stage))
            )
            for _ in range(3)
        )
        self.pool = nn.AvgPool1d(2)
        pre = residual == "pre"
        self.final = nn.Sequential(
            _norm(norm, CHANNELS, conv=True) if pre else nn.Identity(),
            _act(act) if pre else nn.Identity(),
        )
        self.head = nn.Linear(CHANNELS, 10)

    def forward(self, x):
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i:
                x = self.pool(x)
            x = stage(x)
        return self.head(self.final(x).mean(dim=2))


def resnet1d_spec(
    blocks_per_stage: int,
    act: str = "relu",
    *,
    norm: str,
    residual: str,
    init: str = "he",
    opt: str = "sgd",
    lr: float = 0.05,
    intended: str,
    extra: str = "",
    note: str = "",
) -> Spec:
    """``extra``: "zero_last_norm" (each block's n2 weight 0: Goyal et al. 2017, residual
    "branch"), "zero_scale" (each block's s = 0: SkipInit)."""
    model = ResNet1d(blocks_per_stage, act, norm, residual)
    _init(model, init, act)
    blocks = [b for st in model.stages for b in st]
    with torch.no_grad():
        if extra == "zero_last_norm":
            for b in blocks:
                b.n2.weight.zero_()
        elif extra == "zero_scale":
            for b in blocks:
                b.scale.zero_()
        elif extra:
            raise ValueError(extra)
    return Spec(
        model,
        "channels",
        opt,
        lr,
        "resnet1d",
        2 * len(blocks) + 2,
        act,
        norm,
        residual,
        init + (f"+{extra}" if extra else ""),
        intended,
        note,
    )


# --------------------------------------------------------------------------- GRU / LSTM


class RNNClassifier(nn.Module):
    """A GRU or LSTM over the time steps; Linear head on the last step's output."""

    def __init__(self, kind: str, input_size: int, hidden: int, layers: int):
        super().__init__()
        rnn = nn.GRU if kind == "gru" else nn.LSTM
        self.rnn = rnn(input_size, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def rnn_spec(
    kind: str,
    layout: str,
    *,
    hidden: int = 64,
    layers: int = 1,
    init: str = "default",
    opt: str = "adam",
    lr: float = 1e-2,
    intended: str,
    note: str = "",
) -> Spec:
    model = RNNClassifier(kind, 1 if layout == "seq" else 4, hidden, layers)
    _init(model, init, "tanh")
    return Spec(
        model, layout, opt, lr, kind, layers + 1, "tanh", "none", "none", init, intended, note
    )


# --------------------------------------------------------------------------- Transformers


class TokenEmbed(nn.Module):
    """Linear embedding of the 10 chunks of 4 values, plus a learned position embedding."""

    def __init__(self, d: int = D_MODEL):
        super().__init__()
        self.proj = nn.Linear(4, d)
        self.pos = nn.Parameter(torch.randn(1, 10, d) * 0.02)

    def forward(self, x):
        return self.proj(x) + self.pos


class Block(nn.Module):
    """A Transformer block: multi-head self-attention and a 2-layer feed-forward.
    ``pre``: x + s*attn(n1(x)); x + s*ff(n2(x)). ``post``: n1(x + s*attn(x)); n2(x +
    s*ff(x)). ``plain``: x + s*attn(x); x + s*ff(x). ``none``: n1(attn(x)); n2(ff(x))."""

    def __init__(self, residual: str, norm: str, act: str, d: int = D_MODEL):
        super().__init__()
        self.residual = residual
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), _act(act), nn.Linear(2 * d, d))
        self.n1 = _norm(norm, d)
        self.n2 = _norm(norm, d)
        self.scale = nn.Parameter(torch.ones(()))

    def _sa(self, x):
        return self.attn(x, x, x, need_weights=False)[0]

    def forward(self, x):
        s = self.scale
        if self.residual == "pre":
            x = x + s * self._sa(self.n1(x))
            return x + s * self.ff(self.n2(x))
        if self.residual == "post":
            x = self.n1(x + s * self._sa(x))
            return self.n2(x + s * self.ff(x))
        if self.residual == "plain":
            x = x + s * self._sa(x)
            return x + s * self.ff(x)
        if self.residual == "none":
            return self.n2(self.ff(self.n1(self._sa(x))))
        raise ValueError(self.residual)


class Transformer(nn.Module):
    """TokenEmbed -> blocks -> [final LayerNorm for pre-norm] -> mean over tokens -> head.
    ``torch_layer``: the blocks are ``nn.TransformerEncoderLayer`` (norm_first for pre),
    the stock torch.nn module, instead of :class:`Block`."""

    def __init__(self, depth: int, residual: str, norm: str, act: str, torch_layer: bool = False):
        super().__init__()
        self.embed = TokenEmbed()
        if torch_layer:
            layer = nn.TransformerEncoderLayer(
                D_MODEL,
                4,
                2 * D_MODEL,
                dropout=0.0,
                activation=act,
                batch_first=True,
                norm_first=residual == "pre",
            )
            self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        else:
            self.blocks = nn.Sequential(*(Block(residual, norm, act) for _ in range(depth)))
        self.final = (
            nn.LayerNorm(D_MODEL) if residual == "pre" and norm != "none" else nn.Identity()
        )
        self.head = nn.Linear(D_MODEL, 10)

    def forward(self, x):
        return self.head(self.final(self.blocks(self.embed(x))).mean(dim=1))


def transformer_spec(
    depth: int,
    residual: str,
    *,
    norm: str = "layer",
    act: str = "gelu",
    init: str = "default",
    opt: str = "adamw",
    lr: float = 1e-3,
    intended: str,
    extra: str = "",
    torch_layer: bool = False,
    note: str = "",
) -> Spec:
    """``extra``: "zero_head" (head weight and bias 0, as in ViT/MLP-Mixer), "zero_scale"
    (each block's s = 0)."""
    model = Transformer(depth, residual, norm, act, torch_layer)
    _init(model, init, act)
    with torch.no_grad():
        if extra == "zero_head":
            model.head.weight.zero_()
            model.head.bias.zero_()
        elif extra == "zero_scale":
            for b in model.blocks:
                b.scale.zero_()
        elif extra:
            raise ValueError(extra)
    return Spec(
        model,
        "chunks",
        opt,
        lr,
        "transformer",
        depth,
        act,
        norm,
        residual,
        init + (f"+{extra}" if extra else ""),
        intended,
        note or ("nn.TransformerEncoderLayer" if torch_layer else ""),
    )


# =========================================================================== the cases
# One function per case. ``intended`` is the design intent; groundtruth.json holds what
# training actually did.

# ---- plain MLPs (width 64)


@case
def mlp_relu_d4_default_adam():
    return mlp_spec(4, "relu", intended="trains")


@case
def mlp_relu_d8_he_sgd():
    return mlp_spec(8, "relu", init="he", opt="sgd", lr=0.05, intended="trains")


@case
def mlp_gelu_d8_default_adam():
    return mlp_spec(8, "gelu", intended="trains")


@case
def mlp_tanh_d4_xavier_sgd():
    return mlp_spec(4, "tanh", init="xavier", opt="sgd", lr=0.05, intended="trains")


@case
def mlp_sigmoid_d4_xavier_adam():
    return mlp_spec(4, "sigmoid", init="xavier", intended="trains")


@case
def mlp_relu_d8_zerohead_adam():
    return mlp_spec(
        8,
        "relu",
        extra="zero_head",
        intended="trains",
        note="zero-init classifier head (as in ViT / MLP-Mixer)",
    )


@case
def mlp_relu_d8_batch_sgd():
    return mlp_spec(8, "relu", norm="batch", init="he", opt="sgd", lr=0.05, intended="trains")


@case
def mlp_relu_d16_batch_adam():
    return mlp_spec(16, "relu", norm="batch", intended="trains")


@case
def mlp_relu_d8_group_adam():
    return mlp_spec(8, "relu", norm="group", intended="trains")


@case
def mlp_gelu_d4_layer_adam():
    return mlp_spec(4, "gelu", norm="layer", intended="trains")


@case
def mlp_relu_d64_layer_sgd():
    return mlp_spec(
        64,
        "relu",
        norm="layer",
        init="he",
        opt="sgd",
        lr=0.02,
        intended="fails_other",
        note="deep plain layer-norm net",
    )


@case
def mlp_sigmoid_d16_default_sgd():
    return mlp_spec(16, "sigmoid", opt="sgd", lr=0.05, intended="fails_vanishing")


@case
def mlp_sigmoid_d32_xavier_sgd():
    return mlp_spec(32, "sigmoid", init="xavier", opt="sgd", lr=0.05, intended="fails_vanishing")


@case
def mlp_tanh_d32_small_sgd():
    return mlp_spec(32, "tanh", init="x0.1", opt="sgd", lr=0.05, intended="fails_vanishing")


@case
def mlp_relu_d16_small_sgd():
    return mlp_spec(16, "relu", init="x0.1", opt="sgd", lr=0.05, intended="fails_vanishing")


@case
def mlp_relu_d8_deadbias_sgd():
    return mlp_spec(
        8,
        "relu",
        opt="sgd",
        lr=0.05,
        extra="dead_bias",
        intended="fails_vanishing",
        note="every hidden bias -5: all ReLUs dead",
    )


@case
def mlp_relu_d8_deadbias_adam():
    return mlp_spec(
        8,
        "relu",
        extra="dead_bias",
        intended="fails_vanishing",
        note="every hidden bias -5: all ReLUs dead",
    )


@case
def mlp_relu_d8_zero_sgd():
    return mlp_spec(
        8,
        "relu",
        init="zero",
        opt="sgd",
        lr=0.05,
        intended="fails_vanishing",
        note="every weight and bias 0: no signal reaches the hidden layers",
    )


@case
def mlp_relu_d8_normal1_sgd():
    return mlp_spec(8, "relu", init="normal1", opt="sgd", lr=0.02, intended="diverges")


@case
def mlp_relu_d16_big_sgd():
    return mlp_spec(16, "relu", init="x3", opt="sgd", lr=0.02, intended="diverges")


@case
def mlp_tanh_d8_normal1_sgd():
    return mlp_spec(
        8,
        "tanh",
        init="normal1",
        opt="sgd",
        lr=0.02,
        intended="fails_other",
        note="saturated tanh (chaotic regime)",
    )


@case
def mlp_relu_d8_he_sgd_lrhuge():
    return mlp_spec(8, "relu", init="he", opt="sgd", lr=5.0, intended="diverges")


@case
def mlp_relu_d4_default_adam_lrhuge():
    return mlp_spec(4, "relu", lr=1.0, intended="diverges")


@case
def mlp_relu_d8_he_sgd_lrtiny():
    return mlp_spec(8, "relu", init="he", opt="sgd", lr=1e-5, intended="fails_other")


@case
def mlp_identity_d4_default_adam():
    return mlp_spec(4, "identity", intended="fails_other", note="a linear model: underfits")


@case
def mlp_identity_d16_xavier_sgd():
    return mlp_spec(
        16,
        "identity",
        init="xavier",
        opt="sgd",
        lr=0.01,
        intended="fails_other",
        note="a deep linear model: underfits",
    )


# ---- residual MLPs (width 64, one Linear per block)


@case
def resmlp_pre_layer_d32_relu_adam():
    return resmlp_spec(30, "relu", norm="layer", residual="pre", intended="trains")


@case
def resmlp_pre_layer_d128_gelu_adam():
    return resmlp_spec(126, "gelu", norm="layer", residual="pre", intended="trains")


@case
def resmlp_post_layer_d32_relu_adam():
    return resmlp_spec(30, "relu", norm="layer", residual="post", intended="trains")


@case
def resmlp_post_layer_d128_relu_sgd():
    return resmlp_spec(
        126,
        "relu",
        norm="layer",
        residual="post",
        init="he",
        opt="sgd",
        lr=0.02,
        intended="fails_vanishing",
    )


@case
def resmlp_plain_d32_default_adam():
    return resmlp_spec(30, "relu", norm="none", residual="plain", intended="trains")


@case
def resmlp_plain_d128_he_sgd():
    return resmlp_spec(
        126,
        "relu",
        norm="none",
        residual="plain",
        init="he",
        opt="sgd",
        lr=0.02,
        intended="diverges",
        note="no norm, He init: the variance doubles every block",
    )


@case
def resmlp_plain_d64_zeroscale_sgd():
    return resmlp_spec(
        62,
        "relu",
        norm="none",
        residual="plain",
        init="he",
        opt="sgd",
        lr=0.02,
        extra="zero_scale",
        intended="trains",
        note="SkipInit / ReZero: every residual branch scale 0",
    )


@case
def resmlp_pre_batch_d32_zerolastnorm_sgd():
    return resmlp_spec(
        30,
        "relu",
        norm="batch",
        residual="pre2",
        init="he",
        opt="sgd",
        lr=0.02,
        extra="zero_last_norm",
        intended="trains",
        note="zero-init residual: each branch's last BatchNorm weight 0",
    )


@case
def resmlp_pre_layer_d64_sgd_lrhuge():
    return resmlp_spec(
        62, "relu", norm="layer", residual="pre", init="he", opt="sgd", lr=20.0, intended="diverges"
    )


@case
def resmlp_pre_layer_d32_adam_lrtiny():
    return resmlp_spec(30, "relu", norm="layer", residual="pre", lr=1e-6, intended="fails_other")


@case
def resmlp_plain_d32_big_sgd():
    return resmlp_spec(
        30,
        "relu",
        norm="none",
        residual="plain",
        init="x3",
        opt="sgd",
        lr=0.02,
        intended="diverges",
    )


@case
def resmlp_pre_group_d32_sgd():
    return resmlp_spec(
        30, "relu", norm="group", residual="pre", init="he", opt="sgd", lr=0.02, intended="trains"
    )


@case
def resmlp_pre_batch_d32_sgd():
    return resmlp_spec(
        30, "relu", norm="batch", residual="pre", init="he", opt="sgd", lr=0.02, intended="trains"
    )


@case
def resmlp_pre_layer_d32_sigmoid_adam():
    return resmlp_spec(30, "sigmoid", norm="layer", residual="pre", intended="trains")


@case
def resmlp_plain_d64_identity_adam():
    return resmlp_spec(
        62,
        "identity",
        norm="none",
        residual="plain",
        intended="fails_other",
        note="a linear model: underfits",
    )


@case
def resmlp_pre_layer_d32_deadbias_adam():
    return resmlp_spec(
        30,
        "relu",
        norm="layer",
        residual="pre",
        extra="dead_bias",
        intended="fails_other",
        note="dead branches, live skips: stem + head, a linear model",
    )


# ---- Conv1d nets (32 channels, kernel 5)


@case
def cnn_relu_d4_default_adam():
    return cnn_spec(4, "relu", intended="trains", note="like the MNIST-1D paper's CNN")


@case
def cnn_relu_d8_batch_sgd():
    return cnn_spec(8, "relu", norm="batch", init="he", opt="sgd", lr=0.05, intended="trains")


@case
def cnn_gelu_d6_group_adam():
    return cnn_spec(6, "gelu", norm="group", intended="trains")


@case
def cnn_relu_d12_batch_adam():
    return cnn_spec(12, "relu", norm="batch", intended="trains")


@case
def cnn_tanh_d6_xavier_sgd():
    return cnn_spec(6, "tanh", init="xavier", opt="sgd", lr=0.05, intended="trains")


@case
def cnn_sigmoid_d16_default_sgd():
    return cnn_spec(16, "sigmoid", opt="sgd", lr=0.05, intended="fails_vanishing")


@case
def cnn_relu_d8_normal1_sgd():
    return cnn_spec(8, "relu", init="normal1", opt="sgd", lr=0.02, intended="diverges")


@case
def cnn_relu_d6_he_sgd_lrhuge():
    return cnn_spec(6, "relu", init="he", opt="sgd", lr=5.0, intended="diverges")


@case
def cnn_identity_d4_default_adam():
    return cnn_spec(4, "identity", intended="fails_other", note="a linear model: underfits")


@case
def cnn_tanh_d24_small_sgd():
    return cnn_spec(24, "tanh", init="x0.1", opt="sgd", lr=0.05, intended="fails_vanishing")


@case
def cnn_relu_d6_deadbias_adam():
    return cnn_spec(
        6,
        "relu",
        extra="dead_bias",
        intended="fails_vanishing",
        note="every conv bias -5: all ReLUs dead",
    )


@case
def cnn_relu_d4_default_sgd_lrtiny():
    return cnn_spec(4, "relu", opt="sgd", lr=1e-5, intended="fails_other")


# ---- ResNet-like Conv1d (3 stages)


@case
def resnet1d_batch_d14_sgd():
    return resnet1d_spec(
        2,
        norm="batch",
        residual="branch",
        intended="trains",
        note="ResNet v1 (BN at the end of the branch)",
    )


@case
def resnet1d_batch_d14_zerolastnorm_sgd():
    return resnet1d_spec(
        2,
        norm="batch",
        residual="branch",
        extra="zero_last_norm",
        intended="trains",
        note="zero-init residual (Goyal et al. 2017)",
    )


@case
def resnet1d_pre_group_d14_adam():
    return resnet1d_spec(
        2,
        norm="group",
        residual="pre",
        opt="adam",
        lr=1e-3,
        intended="trains",
        note="ResNet v2 (pre-activation), GroupNorm",
    )


@case
def resnet1d_post_batch_d14_sgd():
    return resnet1d_spec(2, norm="batch", residual="post", intended="trains")


@case
def resnet1d_plain_d32_he_sgd():
    return resnet1d_spec(
        5,
        norm="none",
        residual="plain",
        intended="diverges",
        note="no norm, He init: the variance doubles every block",
    )


@case
def resnet1d_plain_d20_zeroscale_sgd():
    return resnet1d_spec(
        3,
        norm="none",
        residual="plain",
        extra="zero_scale",
        intended="trains",
        note="SkipInit: every residual branch scale 0",
    )


@case
def resnet1d_batch_d14_sgd_lrhuge():
    return resnet1d_spec(2, norm="batch", residual="branch", lr=20.0, intended="diverges")


@case
def resnet1d_pre_group_d14_sgd_lrtiny():
    return resnet1d_spec(2, norm="group", residual="pre", lr=1e-5, intended="fails_other")


# ---- GRU / LSTM classifiers (hidden 64)


@case
def gru_seq_adam():
    return rnn_spec("gru", "seq", intended="trains")


@case
def gru_chunks_adam():
    return rnn_spec("gru", "chunks", intended="trains")


@case
def lstm_chunks_adam():
    return rnn_spec("lstm", "chunks", intended="trains")


@case
def lstm_seq_adam():
    # At lr 1e-2 (the other recurrent cases' rate) this case was bimodal: test accuracy
    # 0.09 / 0.60 / 0.20 / 0.10 for seeds 0-3; at 3e-3 it was 0.49 for seeds 0, 1 and 2.
    return rnn_spec("lstm", "seq", lr=3e-3, intended="trains")


@case
def lstm_chunks_2layer_sgd():
    return rnn_spec("lstm", "chunks", layers=2, opt="sgd", lr=0.1, intended="trains")


@case
def gru_chunks_sgd_lrtiny():
    return rnn_spec("gru", "chunks", opt="sgd", lr=1e-4, intended="fails_other")


@case
def lstm_chunks_sgd_lrhuge():
    return rnn_spec("lstm", "chunks", opt="sgd", lr=100.0, intended="diverges")


@case
def gru_seq_normal1_adam():
    return rnn_spec(
        "gru",
        "seq",
        init="normal1",
        intended="fails_other",
        note="N(0,1) recurrent weights: saturated gates",
    )


# ---- Transformers (10 tokens of 4 values, width 32, 4 heads)


@case
def tf_pre_layer_d2_torch_adamw():
    return transformer_spec(2, "pre", torch_layer=True, intended="trains")


@case
def tf_post_layer_d2_torch_adamw():
    return transformer_spec(2, "post", torch_layer=True, intended="trains")


@case
def tf_pre_layer_d4_zerohead_adamw():
    return transformer_spec(4, "pre", extra="zero_head", intended="trains")


@case
def tf_pre_layer_d6_adamw():
    return transformer_spec(6, "pre", intended="trains")


@case
def tf_plain_d4_zeroscale_adamw():
    return transformer_spec(4, "plain", norm="none", extra="zero_scale", intended="trains")


@case
def tf_post_layer_d6_adamw_lrhigh():
    return transformer_spec(
        6, "post", lr=1e-2, intended="fails_other", note="post-norm, high lr, no warm-up"
    )


@case
def tf_none_none_d12_adamw():
    # At depth 6 this design trained, barely (0.42 / 0.44 / 0.43 for seeds 0-2).
    return transformer_spec(
        12,
        "none",
        norm="none",
        intended="fails_other",
        note="no residual, no norm: attention rank collapse",
    )


@case
def tf_pre_layer_d2_sgd_lrtiny():
    return transformer_spec(2, "pre", opt="sgd", lr=1e-5, intended="fails_other")


@case
def tf_plain_d4_normal1_adamw():
    return transformer_spec(4, "plain", norm="none", init="normal1", intended="diverges")


@case
def tf_pre_layer_d2_sgd_lrhuge():
    return transformer_spec(2, "pre", opt="sgd", lr=50.0, intended="diverges")
