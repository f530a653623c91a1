"""The optimizers of runs trained stacked, stepped as one.

Each run trained by :func:`~resnorm.train.fit_stacked` keeps its own optimizer (the one
:func:`~resnorm.train.optim.make_optimizer` builds for it), but stepping them one by one
costs a Python pass over every parameter of every run, and on a GPU the kernel launches
of every run: with 24 runs of a small MLP that was 40% of a stacked step. Here the runs'
optimizer states are stacked like their parameters (a leading dimension of runs), the runs
are grouped by their hyper-parameters (runs of one learning rate and weight decay are
adjacent rows) and each group of rows is stepped by one call of PyTorch's own functional
optimizer (:func:`torch.optim.adam.adam`, :func:`torch.optim.sgd.sgd`, fused) on row
slices of the stacked tensors: the same kernel, with the same scalars, on the same
elements as each run's own ``step()`` would run, so the weights are bitwise those of the
runs stepped one by one (a test checks it).

Only the optimizers that ``make_optimizer`` builds are stacked: fused AdamW and fused SGD,
without amsgrad, differentiable or capturable; anything else (and runs whose states are at
different steps) is stepped run by run, as before. The runs' own optimizer states are
written back (:meth:`StackedOptimizer.release`) before anything reads them: a checkpoint,
a run leaving the stack, the end of an epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.adam import adam
from torch.optim.sgd import sgd

# The state each stacked optimizer keeps per parameter, besides AdamW's step count.
_STATE = {torch.optim.AdamW: ("exp_avg", "exp_avg_sq"), torch.optim.SGD: ("momentum_buffer",)}
# Param-group entries that may differ between the runs of one stack.
_PER_RUN = ("params", "lr", "initial_lr", "weight_decay")


class StackedOptimizer:
    """Step the optimizers of the runs whose parameters are rows of ``stacked``.

    Build it with :meth:`build`, which says ``None`` when these optimizers cannot be
    stepped as one. Rows ``rows[g]`` of every stacked tensor belong to the runs of group
    ``g`` (equal hyper-parameters); their learning rate is read, each step, from the
    group's first run, whose scheduler has set it."""

    def __init__(self, optimizers, params, layout, stacked, rows, state, steps) -> None:
        self.optimizers, self.params = optimizers, params
        self.layout, self.stacked = layout, stacked
        self.rows, self.state, self.steps = rows, state, steps
        self.kind = type(optimizers[0])
        self.stepped = False  # until then the runs' own states are still theirs
        self.detached = {name: tensor.detach() for name, tensor in stacked.items()}
        self._views: dict[tuple, dict[str, list[torch.Tensor]]] = {}

    @classmethod
    def build(
        cls,
        optimizers: Sequence[torch.optim.Optimizer],
        params: Sequence[dict[str, torch.Tensor]],
        stacked: dict[str, torch.Tensor],
    ) -> StackedOptimizer | None:
        """``optimizers[i]`` steps run ``i``'s parameters ``params[i]`` (by name), which
        are the ``i``-th rows of ``stacked``; ``None`` when they cannot be stepped as one.
        Runs with equal hyper-parameters must be adjacent (see :func:`hyper_key`)."""
        layout = _layout(optimizers, params)
        if layout is None:
            return None
        rows = _row_groups([hyper_key(o) for o in optimizers])
        kind = type(optimizers[0])
        states = [
            [o.state.get(params[i][n], {}) for n in _names(layout)]
            for i, o in enumerate(optimizers)
        ]
        keys = _STATE[kind] if _has_state(optimizers[0]) else ()
        fresh = all(not s for run in states for s in run)
        if not fresh and not all(set(s) >= set(keys) for run in states for s in run):
            return None
        state, steps = {}, {}
        for j, name in enumerate(_names(layout)):
            like = stacked[name].detach()
            state[name] = {
                key: torch.zeros_like(like, memory_format=torch.preserve_format)
                if fresh
                else torch.stack([run[j][key] for run in states])
                for key in keys
            }
            if kind is torch.optim.AdamW:
                counts = [0.0] if fresh else [float(run[j]["step"]) for run in states]
                if any(c != counts[0] for c in counts):
                    return None  # the runs are not at the same step: step them one by one
                first = None if fresh else states[0][j]["step"]
                steps[name] = [
                    torch.zeros((), dtype=torch.float32, device=like.device)
                    if first is None
                    else first.detach().clone()
                    for _ in rows
                ]
        return cls(list(optimizers), list(params), layout, stacked, rows, state, steps)

    @torch.no_grad()
    def step(self) -> None:
        """One step of every run, on the gradients the stacked parameters hold."""
        self.stepped = True
        for g, rows in enumerate(self.rows):
            leader = self.optimizers[rows.start]
            for group, names in zip(leader.param_groups, self.layout):
                names = tuple(n for n in names if self.stacked[n].grad is not None)
                if not names:
                    continue
                grads = [self.stacked[n].grad[rows] for n in names]
                tensors = self._rows_of(g, names)
                if self.kind is torch.optim.AdamW:
                    beta1, beta2 = group["betas"]
                    adam(
                        tensors["params"],
                        grads,
                        tensors["exp_avg"],
                        tensors["exp_avg_sq"],
                        [],
                        tensors["steps"],
                        fused=True,
                        decoupled_weight_decay=True,
                        amsgrad=False,
                        beta1=beta1,
                        beta2=beta2,
                        lr=group["lr"],
                        weight_decay=group["weight_decay"],
                        eps=group["eps"],
                        maximize=group["maximize"],
                    )
                else:
                    sgd(
                        tensors["params"],
                        grads,
                        tensors.get("momentum_buffer", [None] * len(names)),
                        fused=True,
                        weight_decay=group["weight_decay"],
                        momentum=group["momentum"],
                        lr=group["lr"],
                        dampening=group["dampening"],
                        nesterov=group["nesterov"],
                        maximize=group["maximize"],
                    )

    def _rows_of(self, g: int, names: tuple[str, ...]) -> dict[str, list[torch.Tensor]]:
        """Group ``g``'s rows of the parameters ``names`` and of their states (views, made
        once: the tensors persist from step to step)."""
        key = (g, names)
        if key not in self._views:
            rows = self.rows[g]
            views = {"params": [self.detached[n][rows] for n in names]}
            for state in _STATE[self.kind]:
                if all(state in self.state[n] for n in names):
                    views[state] = [self.state[n][state][rows] for n in names]
            if self.kind is torch.optim.AdamW:
                views["steps"] = [self.steps[n][g] for n in names]
            self._views[key] = views
        return self._views[key]

    def release(self) -> None:
        """Write each run's state back into its own optimizer, in storage of its own. Only
        parameters that have been stepped get a state, as ``step()`` would give them."""
        if not self.stepped:
            return
        for g, rows in enumerate(self.rows):
            for i in range(rows.start, rows.stop):
                for name, keys in self.state.items():
                    if self.kind is torch.optim.AdamW and not float(self.steps[name][g]):
                        continue  # never stepped: no state, as torch.optim leaves it
                    own = self.optimizers[i].state[self.params[i][name]]
                    for key, tensor in keys.items():
                        own[key] = tensor[i].clone()
                    if self.kind is torch.optim.AdamW:
                        own["step"] = self.steps[name][g].clone()


def hyper_key(optimizer: torch.optim.Optimizer) -> tuple:
    """What runs stepped by one call must share: each param group's learning rate (as
    set at the start, before any schedule) and weight decay."""
    return tuple(
        (group.get("initial_lr", group["lr"]), group["weight_decay"])
        for group in optimizer.param_groups
    )


def _has_state(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer) is torch.optim.AdamW or any(
        group["momentum"] != 0 for group in optimizer.param_groups
    )


def _names(layout: list[list[str]]) -> list[str]:
    return [name for names in layout for name in names]


def _layout(optimizers, params) -> list[list[str]] | None:
    """The parameter names of each param group, equal for every run, or ``None`` when the
    optimizers are not ones this module steps, or differ beyond ``_PER_RUN``."""
    first = optimizers[0]
    kind = type(first)
    if kind not in _STATE or any(type(o) is not kind for o in optimizers):
        return None
    names = {id(p): n for n, p in params[0].items()}
    layout = [[names.get(id(p)) for p in group["params"]] for group in first.param_groups]
    if any(n is None for names_ in layout for n in names_):
        return None
    shared = [{k: v for k, v in g.items() if k not in _PER_RUN} for g in first.param_groups]
    for group in shared:
        if not group.get("fused") or group.get("differentiable") or group.get("capturable"):
            return None
        if group.get("amsgrad") or group.get("decoupled_weight_decay") is False:
            return None
        if kind is torch.optim.SGD and group["momentum"] != 0 and group["dampening"] != 0:
            return None  # a first step from a zero buffer would differ
    for optimizer, own in zip(optimizers, params):
        groups = optimizer.param_groups
        if len(groups) != len(layout) or getattr(optimizer, "grad_scale", None) is not None:
            return None
        for group, names_, common in zip(groups, layout, shared):
            if [id(p) for p in group["params"]] != [id(own[n]) for n in names_]:
                return None
            if {k: v for k, v in group.items() if k not in _PER_RUN} != common:
                return None
    return layout


def _row_groups(keys: list[tuple]) -> list[slice]:
    """Adjacent runs with equal keys, as row slices."""
    rows, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            rows.append(slice(start, i))
            start = i
    return rows
