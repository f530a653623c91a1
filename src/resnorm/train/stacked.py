"""``fit_stacked``: several runs of one architecture trained together, as one computation.

Runs that share a model's structure and a data set and differ only in their seed (hence
initialization and data order), learning rate or weight decay are trained in one process
by one batched forward and backward: the runs' parameters are stacked along a new leading
dimension and the model is evaluated over them with :func:`torch.func.vmap` and
:func:`torch.func.functional_call`, so every layer does one batched operation for all runs
(a ``bmm`` in place of R ``mm``). Everything else stays per run, exactly as :func:`fit`
does it, because it *is* :func:`fit`'s code (the same ``_Trainer`` per run): the
optimizer and its state, the schedule, the batches, gradient clipping, the evaluation
after every epoch, divergence (a run whose loss is not finite stops; the others go on),
the run folder, its metrics files and checkpoints (the format of a run trained alone, so
a run checkpointed stacked resumes alone and the other way round). Batch norm's running
statistics are per run (the buffers are stacked too). Two things are batched for speed
with the same arithmetic per run: the runs' optimizers are stepped as one
(:class:`~resnorm.train.stacked_optim.StackedOptimizer`, bitwise each run's own step),
and on the CPU the larger batch norms (resnorm's, and torch.nn's, which the stacked copy
of the model converts) normalize the runs as one
(:func:`~resnorm.norms.batch.batch_norm_over_runs`).

What stacking changes is the order of floating-point operations inside the batched
kernels: a run trained stacked ends with the weights of the same run trained alone to
rounding, growing with the steps taken. The tests hold float64 to 1e-12 after 18 AdamW
steps (1e-6 with batch norm: the gradient of a norm's shift is a sum that nearly cancels,
which Adam divides by its own small scale), float32 to 1e-5 after 24 steps, and a
batch-norm run in float32 within 10x of what a one-ulp change of its inputs does to the
run trained alone.

Not stacked (the runs train alone, one after the other): models that draw random numbers
in training (dropout, drop-path: vmap would need one mask stream per run, which training
alone does not draw), mixed precision, ``torch.compile``, synchronized batch norm and
process groups. A model that ``vmap`` cannot batch (a custom autograd function without a
batching rule) is found on the first step and its runs train alone, with a warning.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..blocks import DropPath
from ..data import DataSplit
from ..errors import UsageError
from ..norms import BatchNorm, convert_torch_batchnorm
from .batches import _batches
from .config import TrainConfig
from .distributed import world
from .evaluate import _full_precision
from .loop import FitResult, _check_fit_arguments, _Trainer, resolve_device
from .optim import augment_images
from .run import RunMismatchError, model_structure
from .stacked_optim import StackedOptimizer, hyper_key
from .threads import intra_op_threads

# The TrainConfig fields that may differ between runs trained together.
STACKABLE_FIELDS = ("seed", "lr", "weight_decay")


def stack_refusal(models: Sequence[nn.Module], configs: Sequence[TrainConfig]) -> str | None:
    """Why these runs cannot be trained stacked, in words, or ``None`` when they can."""
    if world()[1] > 1:
        return "a process group trains one run at a time"
    first = configs[0].to_dict()
    for name, value in first.items():
        if name not in STACKABLE_FIELDS and any(c.to_dict()[name] != value for c in configs):
            return f"their TrainConfig differs in {name} (only {', '.join(STACKABLE_FIELDS)} may)"
    for flag in ("amp", "compile", "sync_bn"):
        if first[flag]:
            return f"{flag}=True is not stacked"
    structure = model_structure(models[0])
    if any(model_structure(m) != structure for m in models[1:]):
        return "their models differ in structure (parameter names, shapes or dtypes)"
    if any(_draws_random_numbers(m) for m in models):
        return "the model draws random numbers in training (dropout, drop-path, noise)"
    if any(_has_forward_hooks(m) for m in models):
        return "the model has forward hooks, which the stacked forward would not call"
    return None


def _has_forward_hooks(model: nn.Module) -> bool:
    """Whether a module of ``model`` has a forward or forward-pre hook: the stacked
    forward calls a skeleton of the model (:func:`torch.func.functional_call`), so a hook
    on the model itself (a Monitor's dead-unit counter, a user's probe) would see nothing."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _draws_random_numbers(model: nn.Module) -> bool:
    """Whether a dropout or drop-path layer of ``model`` drops anything in training, or a
    module says it draws random numbers (a true ``draws_random_numbers`` attribute); other
    random layers are found by vmap on the first step."""
    random_layers = (nn.modules.dropout._DropoutNd, DropPath)
    return any(
        (isinstance(m, random_layers) and m.p > 0) or getattr(m, "draws_random_numbers", False)
        for m in model.modules()
    )


def fit_stacked(
    models: Sequence[nn.Module],
    data: DataSplit,
    configs: Sequence[TrainConfig],
    *,
    outs: Sequence | None = None,
    metas: Sequence[dict] | None = None,
    resume: bool = True,
    restart_mismatched: bool = False,
    on_epoch: Callable[[int, dict], None] | None = None,
    monitors: Sequence | None = None,
) -> list[FitResult]:
    """Train ``models[i]`` with ``configs[i]`` (into the run folder ``outs[i]``), all of
    them together (see the module's docstring); return their :class:`FitResult` in order.

    What each run does, and what its folder holds, is what :func:`fit` does and writes
    for it alone (``resume``: a run folder with a checkpoint continues from it;
    ``restart_mismatched``: a folder holding another run starts over instead of raising
    :class:`~resnorm.train.RunMismatchError`). ``on_epoch(i, row)`` is called with run
    ``i``'s row after each of its epochs. ``monitors[i]`` (anything with ``step(loss)``,
    or ``None``) is called after each of run ``i``'s steps with its loss, its parameters
    holding their gradients, as :func:`fit` calls its ``monitor``. Runs that cannot be
    stacked (:func:`stack_refusal`) raise :class:`~resnorm.errors.UsageError`.
    """
    if not models or len(configs) != len(models):
        raise UsageError(
            f"fit_stacked takes one config per model: got {len(models)} model(s) and "
            f"{len(configs)} config(s)"
        )
    outs = list(outs) if outs is not None else [None] * len(models)
    metas = list(metas) if metas is not None else [{}] * len(models)
    monitors = list(monitors) if monitors is not None else [None] * len(models)
    if len(outs) != len(models) or len(metas) != len(models) or len(monitors) != len(models):
        raise UsageError(
            f"fit_stacked takes one out, meta and monitor per model ({len(models)}): got "
            f"{len(outs)}, {len(metas)} and {len(monitors)}"
        )
    for model, config in zip(models, configs):
        _check_fit_arguments(model, data, config)
    refusal = stack_refusal(models, configs)
    if refusal is not None:
        raise UsageError(f"these {len(models)} runs cannot be trained stacked: {refusal}")
    with intra_op_threads(configs[0].threads):
        device = resolve_device(configs[0].device)
        data = data.to(device)  # one copy on the device for all the runs
        trainers = [
            _Trainer(m, data, c, device, o, monitor, meta)
            for m, c, o, monitor, meta in zip(models, configs, outs, monitors, metas)
        ]
        for trainer in trainers:
            _start(trainer, resume, restart_mismatched)
        for group in _by_position(trainers):
            _Stack(group, trainers).train(on_epoch)
        return [trainer.finish() for trainer in trainers]


def stacking_speedup(
    models: Sequence[nn.Module], data: DataSplit, configs: Sequence[TrainConfig], steps: int = 3
) -> float:
    """How many times faster these runs' training steps are stacked than one after the
    other, measured here on copies of the models (their weights untouched): the median of
    ``steps`` timed steps each way, after one untimed step: whether stacking pays on this
    machine (the lab's default, :func:`resnorm.lab.runner.resolve_stack`, is a rule)."""
    with intra_op_threads(configs[0].threads):
        device = resolve_device(configs[0].device)
        copies = [copy.deepcopy(m) for m in models]
        trainers = [_Trainer(m, data, c, device, None, None, {}) for m, c in zip(copies, configs)]
        stack = _Stack(trainers, trainers)
        trainers = stack.active  # in the stack's order
        batches = [_batches(t.n, t.config.batch_size, t.config.seed, 0)[0] for t in trainers]

        def alone() -> None:
            for trainer, batch in zip(trainers, batches):
                trainer.train_step(trainer.model, batch, len(batch))

        try:
            stacked_seconds = _median_seconds(lambda: stack.step(batches), steps)
        except Exception:  # noqa: BLE001 - vmap cannot batch the model: not faster
            return 0.0
        return _median_seconds(alone, steps) / max(stacked_seconds, 1e-9)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _start(trainer: _Trainer, resume: bool, restart_mismatched: bool) -> None:
    """Start or resume one run, keeping the random-number state a run trained alone would
    have (its seed's, or its checkpoint's): stacked runs draw none, and a checkpoint
    records it."""
    try:
        trainer.start_or_resume(resume)
    except RunMismatchError:
        if not restart_mismatched:
            raise
        trainer.start_or_resume(False)
    trainer.rng_state = torch.get_rng_state()


def _unfinished(trainer: _Trainer) -> bool:
    return trainer.epoch < trainer.config.epochs and not trainer.result.diverged


def _by_position(trainers: list[_Trainer]) -> list[list[_Trainer]]:
    """The unfinished runs grouped by where they resume (epoch, step): the runs of one
    group take their steps together."""
    groups: dict[tuple[int, int], list[_Trainer]] = {}
    for trainer in trainers:
        if _unfinished(trainer):
            groups.setdefault((trainer.epoch, trainer.step_in_epoch), []).append(trainer)
    return list(groups.values())


class _Stack:
    """Runs at the same position trained together until each has finished or diverged."""

    def __init__(self, trainers: list[_Trainer], everyone: list[_Trainer]) -> None:
        self.everyone = everyone  # for the run numbers on_epoch reports
        # Runs of equal hyper-parameters adjacent: one optimizer call steps them all.
        trainers = sorted(trainers, key=lambda t: hyper_key(t.optimizer))
        # torch.nn's batch norms as resnorm's: on the CPU they normalize the runs as one.
        self.skeleton = convert_torch_batchnorm(copy.deepcopy(trainers[0].model).to("meta"))
        self.param_names = [name for name, _ in trainers[0].model.named_parameters()]
        self.buffer_names = [name for name, _ in trainers[0].model.named_buffers()]
        first = trainers[0].config
        self.label_smoothing = first.label_smoothing
        self.schedulers_started = False
        self._set_active(trainers)

    # ------------------------------------------------------------------ the runs' state
    def _set_active(self, trainers: list[_Trainer]) -> None:
        """Train ``trainers`` from now on: each parameter and buffer of theirs stacked into
        one tensor (``self.params``, ``self.buffers``), and each run's own tensors made
        views of their row of it, so that a run's optimizer steps its own parameters in
        place and batch norm updates its running statistics in place, with no copy."""
        self.active = trainers
        for module in self.skeleton.modules():
            if isinstance(module, BatchNorm):  # called under vmap: the runs as one norm
                module.vmapped_runs = len(trainers)
        self.params, self.buffers, self.members = {}, {}, {}
        self.optimizer, self.grads_handed_out = None, True
        if not trainers:
            return
        for kind, store in (("param", self.params), ("buffer", self.buffers)):
            named = [
                dict(t.model.named_parameters() if kind == "param" else t.model.named_buffers())
                for t in trainers
            ]
            for name in self.param_names if kind == "param" else self.buffer_names:
                members = [n[name] for n in named]
                stacked = torch.stack([m.detach() for m in members])
                for i, member in enumerate(members):
                    member.data = stacked[i]
                if kind == "param":
                    stacked.requires_grad_(members[0].requires_grad)
                store[name] = stacked
                self.members[(kind, name)] = members
        own_params = [
            {name: self.members[("param", name)][i] for name in self.param_names}
            for i in range(len(trainers))
        ]
        self.optimizer = StackedOptimizer.build(
            [t.optimizer for t in trainers], own_params, self.params
        )

    def _release_optimizer(self) -> None:
        """Each run's optimizer state back in its own optimizer (stepped run by run from
        now on, until :meth:`_set_active` stacks it again)."""
        if self.optimizer is not None:
            self.optimizer.release()
            self.optimizer = None

    def _release(self) -> None:
        """Each run's tensors back in storage of their own (before a checkpoint saves
        them, or a run leaves the stack); :meth:`_set_active` stacks them again. Each
        run's parameters hold their gradient of the last step, as after :func:`fit`."""
        self._release_optimizer()
        if not self.grads_handed_out:
            self._hand_out_gradients()
        for members in self.members.values():
            for member in members:
                member.data = member.data.clone()
        self.members = {}

    def _hand_out_gradients(self) -> None:
        """Each run's parameters get their row of the stacked gradient (a view)."""
        self.grads_handed_out = True
        for name, stacked in self.params.items():
            grads = stacked.grad
            for i, member in enumerate(self.members[("param", name)]):
                member.grad = None if grads is None else grads[i]

    # ------------------------------------------------------------------ computations
    def _loss_and_logits(self, params, buffers, x, y):
        logits = _full_precision(functional_call(self.skeleton, (params, buffers), (x,)))
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits

    def step(self, batches: list[torch.Tensor]) -> list[tuple[float, int, int] | None]:
        """One step of every active run on its batch: ``(summed loss, correct, samples)``
        per run, ``None`` for a run whose loss is not finite (its step not taken)."""
        x, y = self._batch(batches)
        for stacked in self.params.values():
            stacked.grad = None
        self.skeleton.train()
        losses, logits = vmap(self._loss_and_logits, randomness="error")(
            self.params, self.buffers, x, y
        )
        losses.sum().backward()
        losses = losses.detach()
        correct = (logits.detach().argmax(-1) == y).sum(-1)
        values, rights = torch.stack([losses, correct.to(losses.dtype)]).tolist()  # one sync
        finite = [math.isfinite(value) for value in values]
        self._apply_gradients(finite)
        taken, samples = [], y.shape[1]
        for i, (trainer, value, right) in enumerate(zip(self.active, values, rights)):
            if not finite[i]:
                taken.append(None)
                continue
            if trainer.monitor is not None:
                trainer.monitor.step(losses[i])
            taken.append((value * samples, int(right), samples))
        return taken

    def _batch(self, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The runs' batches stacked, ``(runs, batch, ...)``: one gather from the data the
        runs share (:func:`fit_stacked` puts one copy on the device), augmented per run."""
        first = self.active[0]
        index = torch.stack(batches).to(first.device)
        x, y = first.x_train[index], first.y_train[index]
        if first.config.augment:
            x = torch.stack(
                [
                    augment_images(
                        xb,
                        t.config.crop_padding,
                        torch.Generator().manual_seed(t.config.seed * 7919 + t.global_step),
                    )
                    for t, xb in zip(self.active, x)
                ]
            )
        return x, y

    def _apply_gradients(self, finite: list[bool]) -> None:
        """What :meth:`_Trainer.apply_gradients` does for each run whose loss is finite:
        all runs' optimizers as one (:class:`StackedOptimizer`) when every loss is finite
        and they can be, else run by run."""
        self.grads_handed_out = False
        as_one = self.optimizer is not None and all(finite)
        if not as_one or any(
            t.monitor is not None or t.config.grad_clip is not None for t in self.active
        ):
            self._hand_out_gradients()
        if not as_one:
            self._release_optimizer()  # a diverged run leaves the stack after this step
            for trainer, ok in zip(self.active, finite):
                if ok:
                    trainer.apply_gradients()
            return
        for trainer in self.active:
            if trainer.config.grad_clip is not None:
                nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.config.grad_clip)
        self.optimizer.step()
        # A scheduler's first step checks that its optimizer stepped; it cannot see the
        # stacked step, which did. Silenced on the first step only: catch_warnings resets
        # the registry of warnings already shown.
        with contextlib.nullcontext() if self.schedulers_started else warnings.catch_warnings():
            if not self.schedulers_started:
                warnings.filterwarnings(
                    "ignore", "Detected call of `lr_scheduler.step", UserWarning
                )
            for trainer in self.active:
                trainer.advance()
        self.schedulers_started = True

    @torch.no_grad()
    def evaluate(self) -> list[tuple[float, float]]:
        """``(mean test loss, test accuracy)`` of every active run, in eval mode, summed
        per chunk as :func:`resnorm.train.evaluate` sums them."""
        first = self.active[0]
        x, y, size = first.x_test, first.y_test, first.config.eval_batch_size
        params = self.params
        self.skeleton.eval()
        losses, correct = [0.0] * len(self.active), [0] * len(self.active)

        def sums(p, b, xb, yb):
            logits = _full_precision(functional_call(self.skeleton, (p, b), (xb,)))
            return (
                F.cross_entropy(logits, yb, reduction="sum"),
                (logits.argmax(1) == yb).sum(),
            )

        batched = vmap(sums, in_dims=(0, 0, None, None), randomness="error")
        for start in range(0, len(x), size):
            chunk_loss, chunk_correct = batched(
                params, self.buffers, x[start : start + size], y[start : start + size]
            )
            for i, (value, right) in enumerate(zip(chunk_loss.tolist(), chunk_correct.tolist())):
                losses[i] += value
                correct[i] += right
        self.skeleton.train()
        return [(loss / len(x), right / len(x)) for loss, right in zip(losses, correct)]

    # ------------------------------------------------------------------ the loop
    def train(self, on_epoch) -> None:
        try:
            self._train(on_epoch)
        finally:  # however it ends, each run's tensors are its own again
            self._release()

    def _train(self, on_epoch) -> None:
        first_step = True
        while self.active:
            epoch_start = time.perf_counter()
            epoch_batches = [
                _batches(t.n, t.config.batch_size, t.config.seed, t.epoch) for t in self.active
            ]
            steps = len(epoch_batches[0])
            for k in range(self.active[0].step_in_epoch, steps):
                # The forward of a step vmap cannot batch may have updated buffers in
                # place before failing (batch norm counts its batch first): kept to undo.
                before = {n: b.clone() for n, b in self.buffers.items()} if first_step else {}
                try:
                    taken = self.step([batches[k] for batches in epoch_batches])
                except Exception as exc:  # noqa: BLE001 - only before any step was taken
                    if not first_step:
                        raise
                    for name, buffer in before.items():
                        self.buffers[name].copy_(buffer)
                    return self._train_alone(exc, on_epoch)
                first_step = False
                self._account(taken, k, steps)
                keep = [i for i, t in enumerate(self.active) if _unfinished(t)]
                if len(keep) < len(self.active):  # diverged: the others go on
                    self._release()
                    epoch_batches = [epoch_batches[i] for i in keep]
                    self._set_active([self.active[i] for i in keep])
                if not self.active:
                    return
            self._end_epoch(epoch_start, on_epoch)

    def _account(self, taken, k: int, steps: int) -> None:
        """Record each run's step (or its divergence, as :func:`fit` records it) and
        checkpoint the runs that go on where due."""
        for trainer, step in zip(self.active, taken):
            trainer.result.stacked_with = max(trainer.result.stacked_with, len(self.active))
            trainer.record_step(step, k)
        every = self.active[0].config.checkpoint_every
        due = [t for t in self.active if _unfinished(t) and every and t.global_step % every == 0]
        if due and k + 1 < steps:
            self._release()
            for trainer in due:
                trainer.save(trainer.epoch, k + 1)
            self._set_active(self.active)

    def _end_epoch(self, epoch_start: float, on_epoch) -> None:
        evaluated = self.evaluate()
        self._release()
        for trainer, result in zip(self.active, evaluated):
            trainer.end_epoch(epoch_start, self._report(trainer, on_epoch), evaluated=result)
        self._set_active([t for t in self.active if _unfinished(t)])

    def _report(self, trainer: _Trainer, on_epoch):
        """``on_epoch`` for one run: ``on_epoch(i, row)`` with the run's number."""
        if on_epoch is None:
            return None
        index = self.everyone.index(trainer)
        return lambda row: on_epoch(index, row)

    def _train_alone(self, exc: Exception, on_epoch) -> None:
        """The model cannot be batched (found on the first step, before any was taken):
        each run trains alone, as :func:`fit` trains it."""
        self._release()
        warnings.warn(
            f"the runs train one after the other, not stacked: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
            stacklevel=4,
        )
        for trainer in self.active:
            torch.set_rng_state(trainer.rng_state)  # the generator it would train with
            trainer.rng_state = None
            trainer.run_epochs(False, "train", self._report(trainer, on_epoch))
