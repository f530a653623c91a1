"""The :class:`~.monitor.Monitor` where people train: a PyTorch Lightning callback and a
Hugging Face ``Trainer`` callback.

Both create a Monitor on the model when training starts, record after each optimizer step
(while the gradients are still there), close it when training ends, and judge the run
with :func:`~.analyze.analyze` at the end (and every ``analyze_every`` optimizer steps
when set), printing the verdict in one line on rank 0 (and the remedies when it is not
healthy); the last judgement is the callback's ``diagnosis``::

    trainer = lightning.Trainer(callbacks=[lightning_callback(every=10)])
    trainer = transformers.Trainer(model, args, callbacks=[hf_callback(every=10)])

The callback classes subclass the libraries' own base classes, which are optional extras
(``pip install lightning``; ``pip install transformers accelerate``): they are built on
first use, so ``import resnorm`` never needs either library. ``MonitorCallback`` and
``HFMonitorCallback`` can also be imported from this module once the library is there.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .._checks import check_int
from ..errors import MissingExtraError, UsageError
from .analyze import analyze
from .diagnose import Diagnosis
from .monitor import Monitor
from .verdict import Verdict

LIGHTNING_PACKAGES = {
    "lightning": "lightning.pytorch.callbacks",
    "pytorch_lightning": "pytorch_lightning.callbacks",
}


def _import(module: str, install: str, feature: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs the {module.split('.')[0]} package: pip install {install}"
        ) from exc


def _scalar_loss(output) -> torch.Tensor | None:
    """The loss in what a model or a training step returns: a scalar tensor, a mapping
    (a dict, a transformers ``ModelOutput``) with ``"loss"``, or a tuple whose first item
    is a scalar tensor (transformers' ``return_dict=False``); None when there is none."""
    if isinstance(output, Mapping):
        output = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output.detach()
    return None


class _MonitorRun:
    """What both callbacks do, apart from the libraries' hooks: hold the Monitor, sum the
    losses of the batches of one optimizer step, record, judge and report."""

    def __init__(
        self,
        *,
        every: int = 1,
        path=None,
        tensorboard=None,
        analyze_every: int | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.every = check_int("every", every, minimum=1)
        self.path = path
        self.tensorboard = tensorboard
        self.analyze_every = (
            None if analyze_every is None else check_int("analyze_every", analyze_every, minimum=1)
        )
        self.verbose = bool(verbose)
        self.monitor: Monitor | None = None
        self.diagnosis: Diagnosis | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0

    def _start(self, model, default_dir) -> None:
        self._finish_monitor()
        path = self.path if self.path is not None else Path(default_dir) / "monitor.jsonl"
        self.monitor = Monitor(model, every=self.every, path=path, tensorboard=self.tensorboard)
        self.diagnosis = None
        self._loss_sum, self._loss_count = None, 0

    def _add_loss(self, loss: torch.Tensor | None) -> None:
        # Summed as tensors: the Monitor reads the value only on the steps it records, so
        # the other steps wait on no device.
        if loss is not None:
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1

    def _step(self, step: int, rank_zero: bool) -> None:
        if self.monitor is None:
            return
        loss = None if self._loss_sum is None else self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        self.monitor.step(loss)
        if self.analyze_every is not None and step % self.analyze_every == 0:
            self._judge(step, rank_zero, final=False)

    def _end(self, step: int, rank_zero: bool) -> None:
        if self.monitor is None:
            return
        self._finish_monitor()
        self._judge(step, rank_zero, final=True)

    def _finish_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def _judge(self, step: int, rank_zero: bool, *, final: bool) -> None:
        # Records without a loss (the model returned none) still carry the update ratios;
        # analyze reads their loss as unknown.
        records = self.monitor.records
        if len(records) < 2:
            if final and rank_zero and self.verbose:
                print(
                    f"resnorm Monitor, step {step}: {len(records)} record(s), too few to "
                    f"judge (every={self.every}; analyze needs 2)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        self.diagnosis = analyze(records, name=type(self.monitor.net).__name__)
        if rank_zero and self.verbose:
            print(self._report(step), file=sys.stderr, flush=True)

    def _report(self, step: int) -> str:
        d = self.diagnosis
        lines = [f"resnorm Monitor, step {step}: {d.verdict} - {d.summary()}"]
        if d.verdict is not Verdict.HEALTHY:
            lines += [f"  remedy: {remedy}" for remedy in d.remedies]
        return "\n".join(lines)


@functools.cache
def _lightning_class(package: str):
    callbacks = _import(
        LIGHTNING_PACKAGES[package], package, "the resnorm Lightning callback (MonitorCallback)"
    )

    class MonitorCallback(_MonitorRun, callbacks.Callback):
        """Monitor a LightningModule's training: records after each optimizer step (the
        loss is the mean of ``training_step``'s losses since the last step), writes
        ``monitor.jsonl`` to ``path`` (default: the trainer's ``log_dir``), judges the run
        at the end and every ``analyze_every`` optimizer steps; ``.diagnosis`` holds the
        last verdict."""

        def on_train_start(self, trainer, pl_module) -> None:
            self._start(pl_module, trainer.log_dir or trainer.default_root_dir)
            self._seen_step = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._add_loss(_scalar_loss(outputs))
            # global_step counts optimizer steps: with accumulate_grad_batches > 1 the
            # batches in between have taken none.
            if trainer.global_step != self._seen_step:
                self._seen_step = trainer.global_step
                self._step(trainer.global_step, trainer.is_global_zero)

        def on_train_end(self, trainer, pl_module) -> None:
            self._end(trainer.global_step, trainer.is_global_zero)

        def on_exception(self, trainer, pl_module, exception) -> None:
            self._finish_monitor()

    MonitorCallback.__module__ = __name__
    MonitorCallback.__qualname__ = "MonitorCallback"
    return MonitorCallback


@functools.cache
def _hf_class():
    transformers = _import(
        "transformers",
        "transformers accelerate",
        "the resnorm Hugging Face callback (HFMonitorCallback)",
    )

    class HFMonitorCallback(_MonitorRun, transformers.TrainerCallback):
        """Monitor a transformers ``Trainer``'s training: records after each optimizer step,
        before the gradients are zeroed (``on_optimizer_step``), with the loss the model's
        forward returned (``"loss"`` of its output; the mean over the accumulated
        micro-batches; None when the model returns none, e.g. a ``compute_loss_func``
        computes it), writes ``monitor.jsonl`` to ``path`` (default: ``args.output_dir``),
        judges the run at the end and every ``analyze_every`` optimizer steps;
        ``.diagnosis`` holds the last verdict."""

        _hook = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is None:
                raise UsageError("HFMonitorCallback: the Trainer passed no model to monitor")
            self._remove_hook()
            self._start(model, args.output_dir or ".")
            self._hook = model.register_forward_hook(self._catch_loss)

        def _catch_loss(self, module, inputs, output) -> None:
            if module.training and torch.is_grad_enabled():
                self._add_loss(_scalar_loss(output))

        def on_optimizer_step(self, args, state, control, **kwargs):
            # state.global_step is incremented after this event: this is step global_step + 1.
            self._step(state.global_step + 1, state.is_world_process_zero)

        def on_train_end(self, args, state, control, **kwargs):
            self._remove_hook()
            self._end(state.global_step, state.is_world_process_zero)

        def _remove_hook(self) -> None:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

    HFMonitorCallback.__module__ = __name__
    HFMonitorCallback.__qualname__ = "HFMonitorCallback"
    return HFMonitorCallback


def lightning_callback(
    *,
    every: int = 1,
    path=None,
    tensorboard=None,
    analyze_every: int | None = None,
    verbose: bool = True,
    package: str = "lightning",
):
    """A Lightning ``Callback`` that runs a :class:`~.monitor.Monitor` on the
    LightningModule: ``Trainer(callbacks=[lightning_callback(every=10)])``.

    ``path`` is the ``monitor.jsonl`` to write (default: in the trainer's ``log_dir``),
    ``tensorboard`` a log directory for TensorBoard, ``analyze_every`` judges the run every
    that many optimizer steps too, ``verbose=False`` prints nothing. ``package`` is the
    Lightning package whose Trainer runs it: ``"lightning"`` or ``"pytorch_lightning"``.
    Needs the package (``pip install lightning``)."""
    if package not in LIGHTNING_PACKAGES:
        raise UsageError(f"package must be one of {sorted(LIGHTNING_PACKAGES)}, got {package!r}")
    return _lightning_class(package)(
        every=every,
        path=path,
        tensorboard=tensorboard,
        analyze_every=analyze_every,
        verbose=verbose,
    )


def hf_callback(
    *,
    every: int = 1,
    path=None,
    tensorboard=None,
    analyze_every: int | None = None,
    verbose: bool = True,
):
    """A transformers ``TrainerCallback`` that runs a :class:`~.monitor.Monitor` on the
    Trainer's model: ``Trainer(model, args, callbacks=[hf_callback(every=10)])``.

    ``path`` is the ``monitor.jsonl`` to write (default: in ``args.output_dir``), the other
    options as :func:`lightning_callback`. Needs ``pip install transformers accelerate``."""
    return _hf_class()(
        every=every,
        path=path,
        tensorboard=tensorboard,
        analyze_every=analyze_every,
        verbose=verbose,
    )


def __getattr__(name: str):
    # The classes by name (and so for pickle), built when first asked for.
    if name == "MonitorCallback":
        return _lightning_class("lightning")
    if name == "HFMonitorCallback":
        return _hf_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["hf_callback", "lightning_callback"]
