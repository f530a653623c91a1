"""``train_named``: a registered model trained on a named data set, the whole composition in
one place (device check -> data -> model -> sync-bn rule -> run folder -> Monitor -> fit).
``resnorm train`` and the lab's runner both call it, so they follow the same rules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import DEFAULT_DATASET, DataSplit, load_dataset
from ..data.base import resolve_root
from ..data.registry import dataset_options as data_options_of
from ..data.registry import resolved_dataset_options
from ..errors import UsageError
from ..norms import has_batch_norm
from .build import model_for_data, model_options_for_data, resolved_model_options
from .config import TrainConfig
from .distributed import world
from .loop import FitResult, fit, resolve_device
from .run import identity_hash, run_identity


@dataclass
class PreparedRun:
    """A named run with its data loaded, its model built and its folder chosen; call
    :meth:`fit` to train it. ``meta`` is what the run folder records about the model and
    the data (names and every option)."""

    model_name: str
    dataset: str
    model: nn.Module
    data: DataSplit
    config: TrainConfig
    out: Path
    meta: dict

    def fit(
        self,
        *,
        restart: bool = False,
        monitor_every: int | None = None,
        progress: bool | None = None,
        description: str | None = None,
        on_epoch: Callable[[dict], None] | None = None,
    ) -> FitResult:
        """Train (or resume) the run in :attr:`out`; see :func:`resnorm.train.fit`.
        ``monitor_every``: record gradient health every that many steps into
        ``monitor.jsonl``."""
        from ..diagnostics import Monitor

        monitor = (
            Monitor(self.model, every=monitor_every, path=self.out / "monitor.jsonl")
            if monitor_every
            else None
        )
        try:
            return fit(
                self.model,
                self.data,
                self.config,
                out=self.out,
                resume=not restart,
                monitor=monitor,
                progress=progress,
                on_epoch=on_epoch,
                meta=self.meta,
                description=description or f"{self.model_name} on {self.dataset}",
            )
        finally:
            if monitor is not None:
                monitor.close()


def prepare_run(
    model: str,
    dataset: str = DEFAULT_DATASET,
    *,
    model_options: dict | None = None,
    dataset_options: dict | None = None,
    config: TrainConfig = TrainConfig(),
    out=None,
    data: DataSplit | None = None,
    world_size: int | None = None,
) -> PreparedRun:
    """Check the device, load the data set (or take ``data``, already loaded with these
    options), seed and build the model, apply the one rule for ``sync_bn`` (an error when
    the model has no batch norm), and choose the run folder: ``out``, or
    ``runs/MODEL-DATASET-seedS-HASH`` where HASH is the short hash of the run's identity
    (model options, data, training configuration: see :mod:`resnorm.train.run`), so two
    different runs never share a default folder. ``world_size`` (default: this process
    group's) is the number of processes the run will train on."""
    if not isinstance(config, TrainConfig):
        raise UsageError(f"config must be a TrainConfig, got {type(config).__name__}")
    resolve_device(config.device)  # before anything is loaded or built
    model_options = dict(model_options or {})
    dataset_options = dict(dataset_options or {})
    if data is None:
        data = load_dataset(dataset, **dataset_options)
    torch.manual_seed(config.seed)
    net = model_for_data(model, data, **model_options)
    if config.sync_bn and not has_batch_norm(net):
        raise UsageError(
            f"sync_bn: {model} has no batch norm layer here "
            f"(norm={model_options.get('norm', 'its default')!r}); drop --sync-bn"
        )
    meta = {
        "model": model,
        "model_options": resolved_model_options(
            model, model_options_for_data(model, data, **model_options)
        ),
        "dataset": dataset,
        "dataset_options": resolved_dataset_options(dataset, dataset_options),
    }
    if "root" in data_options_of(dataset):  # a data set read from files: where they were
        meta["data_root"] = str(resolve_root(dataset_options.get("root")))
    if out is None:
        size = world_size if world_size is not None else world()[1]
        digest = identity_hash(run_identity(config, meta, net, data, size))
        out = Path("runs") / f"{model}-{dataset}-seed{config.seed}-{digest}"
    return PreparedRun(model, dataset, net, data, config, Path(out), meta)


def train_named(
    model: str,
    dataset: str = DEFAULT_DATASET,
    *,
    model_options: dict | None = None,
    dataset_options: dict | None = None,
    config: TrainConfig = TrainConfig(),
    out=None,
    restart: bool = False,
    monitor_every: int | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train the registered ``model`` on the data set ``dataset`` into a run folder, as
    ``resnorm train`` does::

        result = train_named("resnet1d_20", "mnist1d", model_options={"norm": "layer"},
                             config=TrainConfig(epochs=5), out="runs/r1d")

    Running it again resumes the run (a finished one is not trained again); a folder that
    holds another run raises :class:`~resnorm.train.RunMismatchError` naming what differs
    (``restart=True`` starts over). See :func:`prepare_run` for the steps and the default
    folder, :func:`resnorm.train.fit` for what the folder holds."""
    prepared = prepare_run(
        model,
        dataset,
        model_options=model_options,
        dataset_options=dataset_options,
        config=config,
        out=out,
    )
    return prepared.fit(
        restart=restart, monitor_every=monitor_every, progress=progress, on_epoch=on_epoch
    )
