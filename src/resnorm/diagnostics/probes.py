"""Finding the layers and blocks of any ``nn.Module`` and recording what flows through them.

Forward hooks measure each output the moment its module returns, so later in-place
operations (``nn.ReLU(inplace=True)``, ``out += identity``) cannot change what was
measured; no tensor is kept. A hook takes a few moments of the output (a
:class:`~.stats.MomentBatch`); the statistics of all outputs of one shape are finished
together after the pass. Gradients are read from ``.grad`` after ``backward()``, never
through module backward hooks, which in-place operations break. Hooks are always removed.
Under ``torch.compile`` the hooks run eagerly, outside the graph: traced, each one would
break the graph at ``.item()`` and be recompiled for every layer it is registered on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..blocks import ResidualAdd, TransformerBlock
from ..errors import UsageError
from ..norms import FusedAddLayerNorm, FusedAddRMSNorm
from .stats import ActivationSummary, Measured, MomentBatch

RECTIFIERS = (nn.ReLU, nn.ReLU6)
ACTIVATIONS = RECTIFIERS + (
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardswish,
    nn.Mish,
    nn.Softplus,
)
TOKEN_BLOCKS = (TransformerBlock, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def is_rectifier(module: nn.Module) -> bool:
    """Whether the module's output is rectified: a ReLU, or a fused norm that applies one
    (``FusedAddLayerNorm(..., activation="relu")``, which fused blocks use in place of
    their ReLU modules)."""
    return isinstance(module, RECTIFIERS) or (
        isinstance(module, (FusedAddLayerNorm, FusedAddRMSNorm)) and module.activation == "relu"
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside ``torch.compile`` and DistributedDataParallel wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(
            model, (nn.parallel.DistributedDataParallel, nn.DataParallel)
        ):
            inner = model.module
        if inner is None:
            return model
        model = inner


def layer_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights of one layer: its ``weight`` parameter, or, for modules that have none
    (``nn.GRU``, ``nn.LSTM``, ``nn.RNN``), its own parameters named ``weight*``
    (``weight_ih_l0``, ``weight_hh_l0``, ...)."""
    if not module._parameters:  # no parameters of its own (most modules: a quick no)
        return []
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter):
        return [weight]
    return [p for n, p in module.named_parameters(recurse=False) if n.startswith("weight")]


def named_parameters(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters()`` from the listed ``named_modules()`` (each parameter once)."""
    seen: set[int] = set()
    params = []
    for module_name, module in named:
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append((f"{module_name}.{name}" if module_name else name, p))
    return params


def parameterized_layers(
    model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None
) -> list[tuple[str, nn.Module]]:
    """Modules that own weights directly (see :func:`layer_weights`), in registration
    order (out of ``modules``, the model's ``named_modules()`` when already listed)."""
    modules = model.named_modules() if modules is None else modules
    return [(name, m) for name, m in modules if layer_weights(m)]


def find_blocks(
    model: nn.Module,
    names: Iterable[str] | None = None,
    modules: list[tuple[str, nn.Module]] | None = None,
) -> list[tuple[str, nn.Module]]:
    """The blocks whose outputs the signal-propagation statistics are measured at.

    ``names`` picks them explicitly. Otherwise: every module that merges a skip path
    through :class:`~resnorm.blocks.ResidualAdd` (all of resnorm's residual blocks, plain
    twins included); failing that, the children of the deepest container whose children
    repeat one class (``layer1.0``, ``layer1.1``, ... in torchvision's ResNets;
    ``encoder.layers.*`` in ``nn.TransformerEncoder``), preferring children that are
    themselves containers over single layers. ``modules``: the model's
    ``named_modules()`` when already listed.
    """
    modules = dict(model.named_modules() if modules is None else modules)
    if names is not None:
        names = list(names)
        missing = [n for n in names if n not in modules]
        if missing:
            sample = ", ".join(list(modules)[1:8])
            raise UsageError(
                f"blocks: no module named {', '.join(map(repr, missing))} in the "
                f"model; names look like: {sample}, ..."
            )
        return [(n, modules[n]) for n in names]
    ours = [
        (name, m)
        for name, m in modules.items()
        if any(isinstance(c, ResidualAdd) for c in m.children())
    ]
    if ours:
        return ours
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    candidates = {True: (-1, []), False: (-1, [])}  # keyed by "the repeated children are blocks"
    for name, m in modules.items():
        if not isinstance(m, containers):
            continue
        classes = defaultdict(list)
        for child_name, child in m.named_children():
            classes[type(child)].append(child_name)
        repeated = max(classes.values(), key=len, default=[])
        if len(repeated) < 2:
            continue
        prefix = f"{name}." if name else ""
        entries = [(prefix + c, modules[prefix + c]) for c in repeated]
        non_leaf = any(True for _ in entries[0][1].children())
        depth = name.count(".") + 1 if name else 0
        best_depth, found = candidates[non_leaf]
        if depth > best_depth:
            candidates[non_leaf] = (depth, entries)
        elif depth == best_depth:
            found += entries
    return candidates[True][1] or candidates[False][1]


@dataclass
class BlockRecord:
    name: str
    channel_dim: int
    sq_mean: float = float("nan")
    var: float = float("nan")
    branch_vars: list[float] = field(default_factory=list)
    skip_vars: list[float] = field(default_factory=list)
    residual: bool | None = None
    cell: list | None = None  # the last output's statistics until they are settled


class ForwardRecorder:
    """Context manager: hooks the model, records one forward pass, removes its hooks.

    Records the order in which parameterized layers run, an :class:`ActivationSummary` per
    layer and activation-module call, and per block the signal-propagation statistics of
    its output and of its residual branch (and skip path) where it merges through
    :class:`~resnorm.blocks.ResidualAdd`.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: list[tuple[str, nn.Module]],
        channel_dim: int | None = None,
        compiled: bool = False,
        modules: list[tuple[str, nn.Module]] | None = None,
        layers: list[tuple[str, nn.Module]] | None = None,
        kernel=None,
    ) -> None:
        self.model = model
        # The model's named_modules() and parameterized layers, when the caller has them.
        self.modules = list(model.named_modules()) if modules is None else modules
        self.layers = parameterized_layers(model, self.modules) if layers is None else layers
        # Under torch.compile the hooks are kept out of the graph (torch.compiler.disable);
        # the wrapper costs ~50 us a hook to build, so eager models get the bare hooks.
        self.compiled = compiled
        self.blocks = blocks
        self.channel_dim = channel_dim
        self.layer_order: list[str] = []
        self._seen: set[str] = set()  # the names in layer_order
        self.activations: dict[str, ActivationSummary] = {}
        self.block_records: dict[str, BlockRecord] = {}
        self.activation_calls = 0  # outputs of nonlinearity modules (ReLU, GELU, ...) seen
        self._calls: dict[str, int] = defaultdict(int)
        self._handles: list = []
        # The hooks take unit moments (``kernel``: see MomentBatch); the statistics are
        # finished together after the pass.
        self._batch = MomentBatch(kernel)
        self._summaries: list[tuple[str, Measured, bool]] = []  # (key, entry, rectified)

    def _block_channel_dim(self, module: nn.Module) -> int:
        if self.channel_dim is not None:
            return self.channel_dim
        return -1 if isinstance(module, TOKEN_BLOCKS) else 1

    def __enter__(self) -> ForwardRecorder:
        try:
            self._register()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
        self._settle()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, hook) -> None:
        if self.compiled:
            hook = torch.compiler.disable(hook)
        self._handles.append(module.register_forward_hook(hook))

    def _register(self) -> None:
        """One hook per module, doing all of its roles: a layer's or an activation's
        summary, a block's output statistics, a merge's branch and skip variances (one
        pass over an output that is both a layer's and a block's)."""
        roles: dict[int, tuple[nn.Module, list, list, list]] = {}

        def role(module: nn.Module) -> tuple[nn.Module, list, list, list]:
            return roles.setdefault(id(module), (module, [], [], []))

        for name, module in self.layers:
            role(module)[1].append((name, is_rectifier(module), True))
        for name, module in self.modules:
            if isinstance(module, ACTIVATIONS):
                role(module)[1].append((name, isinstance(module, RECTIFIERS), False))
        for name, block in self.blocks:
            record = BlockRecord(name, self._block_channel_dim(block))
            self.block_records[name] = record
            role(block)[2].append(record)
            for child in block.children():
                if isinstance(child, ResidualAdd):
                    record.residual = child.residual
                    role(child)[3].append(record)
        for module, summaries, records, merges in roles.values():
            self._hook(module, self._module_hook(summaries, records, merges))

    @staticmethod
    def _first_tensor(output):
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, (tuple, list)):
            return next((o for o in output if isinstance(o, torch.Tensor)), None)
        return None

    def _key(self, name: str) -> str:
        self._calls[name] += 1
        count = self._calls[name]
        return name if count == 1 else f"{name}#{count}"

    def _settle(self) -> None:
        """Finish the statistics of everything the hooks measured, into the records."""
        self._batch.settle()
        for key, entry, rectified in self._summaries:
            self.activations[key] = entry.summary_as(rectified)
        self._summaries.clear()
        for record in self.block_records.values():
            if record.cell is not None:
                entry, dim = record.cell
                record.sq_mean, record.var = entry.channel[dim]
                record.cell = None
            record.branch_vars = [entry.channel[dim][1] for entry, dim in record.branch_vars]
            record.skip_vars = [entry.channel[dim][1] for entry, dim in record.skip_vars]

    def _module_hook(self, summaries: list, records: list, merges: list):
        seen = self._seen
        # What the hook asks of every output, decided once.
        wants_summary, any_rectifier = bool(summaries), any(r for _, r, _ in summaries)
        record_dims = tuple(r.channel_dim for r in records)

        def hook(module, inputs, output):
            for record in merges:
                self._merge(module, inputs, record)
            if not summaries and not records:
                return
            out = self._first_tensor(output)
            entry = None
            if out is not None:
                dims = record_dims if out.dim() >= 2 else ()
                entry = self._batch.add(
                    out, summary=wants_summary, rectified=any_rectifier, channel_dims=dims
                )
                for record in records if dims else ():
                    record.cell = (entry, record.channel_dim)
            for name, rectified, is_layer in summaries:
                if is_layer and name not in seen:
                    seen.add(name)
                    self.layer_order.append(name)
                elif not is_layer:
                    self.activation_calls += 1
                if entry is not None:
                    self._summaries.append((self._key(name), entry, rectified))

        return hook

    def _merge(self, module: nn.Module, inputs: tuple, record: BlockRecord) -> None:
        branch, skip, dim = inputs[0], inputs[1], record.channel_dim
        record.branch_vars.append((self._batch.add(branch, channel_dims=(dim,)), dim))
        if module.residual:
            record.skip_vars.append((self._batch.add(skip, channel_dims=(dim,)), dim))
