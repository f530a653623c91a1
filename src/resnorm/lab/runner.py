"""Running a study's grid: parallel worker processes, nothing lost, failures recorded.

Every run writes ``runs/<run_id>/`` under the lab's folder: the training files of
:func:`resnorm.train.fit` (checkpoints included) and ``summary.json`` when it ends. A lab
started again with the same folder skips the runs that have a summary and resumes the
others from their checkpoints. A run that raises is recorded as failed (its traceback in
``error.txt``) and the others go on; a diverged run is recorded as diverged.

With ``nproc=N`` each run is instead one torchrun launch of N processes training with
DistributedDataParallel, one run at a time; the study's batch sizes stay the global
batch, each process taking batch / N.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .._io import atomic_open
from .._progress import show_progress
from ..errors import UsageError
from ..train.run import identity_hash
from . import workers
from .progress import _LabProgress
from .study import RunSpec, Study
from .summary import RunSummary, _compact_init, _record_training, load_summary
from .units import MAX_STACK, plan_units, resolve_stack  # noqa: F401 - part of this API

INIT_BATCH = 128


def plan_workers(
    num_runs: int,
    workers: int | None = None,
    cores: int | None = None,
    *,
    runs_left: int | None = None,
) -> tuple[int, int]:
    """``(worker processes, threads per worker)`` for a study of ``num_runs`` runs that
    use the cores without oversubscribing them: by default one process per core (at most
    one per run), and the cores shared out as intra-op threads.

    ``num_runs`` is the whole grid, not the runs left to do: the threads of a run depend
    only on the grid, ``workers`` and the cores, so a run resumed by a later invocation
    trains with exactly the threads the uninterrupted lab gave it (the thread count sets
    the summation order of parallel kernels, hence the last bits of the weights).
    ``runs_left`` (default: all of them) only caps the processes started."""
    cores = cores or os.cpu_count() or 1
    if workers is None:
        workers = cores
    workers = max(1, min(workers, num_runs))
    threads = max(1, cores // workers)
    if runs_left is not None:
        workers = max(1, min(workers, runs_left))
    return workers, threads


def _run_in_worker(unit: tuple[RunSpec, ...], study: Study, out: str, device: str, threads: int):
    """:func:`execute_unit` in a worker process, reporting ``("started", run_id)`` and
    ``("epoch", run_id, epoch)`` to the lab's process when it shows progress."""
    reports = workers._progress_reports
    if reports is None:
        return execute_unit(unit, study, out, device, threads)
    for spec in unit:
        reports.put(("started", spec.run_id))
    return execute_unit(
        unit,
        study,
        out,
        device,
        threads,
        on_epoch=lambda run_id, row: reports.put(("epoch", run_id, row["epoch"])),
    )


def execute_unit(
    unit: tuple[RunSpec, ...],
    study: Study,
    out: str,
    device: str,
    threads: int,
    on_epoch: Callable[[str, dict], None] | None = None,
) -> list[dict]:
    """Run a unit of :func:`plan_units` (its runs' folders are ``out/runs/<run_id>``) and
    return its runs' summaries: one run as :func:`execute_run` does, several stacked.
    ``on_epoch(run_id, row)`` is called with the row of every epoch trained."""
    if len(unit) == 1:
        spec = unit[0]
        return [
            execute_run(
                spec,
                study,
                str(Path(out) / "runs" / spec.run_id),
                device,
                threads,
                on_epoch=None if on_epoch is None else lambda row: on_epoch(spec.run_id, row),
            )
        ]
    from .stacked import execute_stacked

    return execute_stacked(unit, study, Path(out), device, threads, on_epoch)


@lru_cache(maxsize=4)
def _dataset(name: str, options_json: str):
    """The data set, loaded once per worker process (keyed by its options as JSON)."""
    from ..data import load_dataset

    options = json.loads(options_json)
    if isinstance(options.get("shape"), list):
        options["shape"] = tuple(options["shape"])
    return load_dataset(name, **options)


def execute_run(
    spec: RunSpec,
    study: Study,
    run_dir: str,
    device: str,
    threads: int,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Diagnose ``spec``'s model at initialization, then train it (unless the study is
    init-only); write and return its summary. Runs in a worker process (or in the
    caller's with one worker: the thread count is restored afterwards). ``on_epoch`` is
    called with the row of every epoch trained (see :func:`resnorm.train.fit`)."""
    from ..train.threads import intra_op_threads

    with intra_op_threads(threads):  # restored: with one worker this is the lab's process
        return _execute(spec, study, Path(run_dir), device, on_epoch)


def execute_distributed_run(spec: RunSpec, study: Study, run_dir: str, device: str) -> dict:
    """:func:`execute_run` in one worker of a torchrun launch (the entry point that
    :func:`run_study` launches with ``nproc``): joins the process group, trains its
    share, leaves. An error is raised (after writing ``error.txt``) rather than recorded
    as a failed summary, so that torchrun stops the other workers instead of leaving them
    waiting for this one."""
    from ..train.distributed import init_distributed, shutdown_distributed

    init_distributed(device)
    summary = _execute(spec, study, Path(run_dir), device)
    shutdown_distributed()
    return summary


def run_config(spec: RunSpec, study: Study, device: str, nproc: int = 1) -> dict:
    """Everything that decides a lab run's result: the run (model, options, depth, norm,
    residual, placement, batch size, seed), the study's data set and its options (not
    where its files live), its training configuration, whether it only diagnoses at
    initialization, the device and the number of processes. A finished run is reused only
    when this is unchanged."""
    train = study.train_config(spec.batch_size, spec.seed, device).to_dict()
    train.pop("checkpoint_every", None)
    return {
        "run": {**asdict(spec), "options": dict(spec.options)},
        "dataset": study.dataset,
        "dataset_options": {k: v for k, v in study.dataset_options.items() if k != "root"},
        "train": train,
        "init_only": study.init_only,
        "nproc": nproc,
        "diagnose_batch": INIT_BATCH,
    }


def _execute(
    spec: RunSpec,
    study: Study,
    run_dir: Path,
    device: str,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    from ..train.distributed import world

    rank, world_size = world()
    start = time.perf_counter()
    summary = _new_summary(spec, study, device, world_size)
    try:
        run = _prepare(spec, study, device, run_dir, summary, world_size)
        if study.init_only:
            summary.status = "finished"
        else:
            _record_training(summary, _fit(run, on_epoch))
    except Exception as exc:  # recorded, and the lab goes on
        _record_error(summary, run_dir, exc)
        if world_size > 1:
            raise
    return _write_summary(summary, run_dir, time.perf_counter() - start, rank)


def _fit(run, on_epoch):
    """Train (or resume) a prepared run; a folder whose run the study's edits changed
    starts over."""
    from ..train import RunMismatchError

    try:
        return run.fit(progress=False, on_epoch=on_epoch)
    except RunMismatchError:
        return run.fit(progress=False, on_epoch=on_epoch, restart=True)


def _new_summary(spec: RunSpec, study: Study, device: str, world_size: int) -> RunSummary:
    config = run_config(spec, study, device, world_size)
    return RunSummary.of(spec, study, config_hash=identity_hash(config), config=config)


def _prepare(spec: RunSpec, study: Study, device: str, run_dir: Path, summary, world_size: int):
    """The run built and diagnosed at initialization (into ``summary``), ready to train."""
    import torch

    from ..diagnostics import diagnose
    from ..train import prepare_run

    data = _dataset(study.dataset, json.dumps(study.dataset_options, sort_keys=True))
    run = prepare_run(
        spec.model,
        study.dataset,
        model_options=spec.model_overrides(),
        dataset_options=study.dataset_options,
        config=_train_config(spec, study, device, world_size),
        out=run_dir,
        data=data,
    )
    summary.parameters = sum(p.numel() for p in run.model.parameters())
    generator = torch.Generator().manual_seed(spec.seed)
    index = torch.randperm(len(data.x_train), generator=generator)[:INIT_BATCH]
    summary.init = _compact_init(diagnose(run.model, data.x_train[index], data.y_train[index]))
    return run


def _record_error(summary: RunSummary, run_dir: Path, exc: BaseException) -> None:
    """A run that raised: its error in the summary, its traceback in ``error.txt``."""
    summary.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(run_dir / "error.txt", "w") as f:
        f.write(traceback.format_exc())


def _write_summary(summary: RunSummary, run_dir: Path, seconds: float, rank: int = 0) -> dict:
    summary.seconds = seconds
    summary = summary.to_dict()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2, default=str, allow_nan=False)
    return summary


def _train_config(spec: RunSpec, study: Study, device: str, world_size: int):
    """The training configuration of one of ``world_size`` processes training ``spec``:
    its share of the global batch. The study's sync_bn is for the runs that have batch
    norm (the rule of prepare_run, an error without batch norm, holds for what reaches it)."""
    train_config = study.train_config(spec.batch_size // world_size, spec.seed, device)
    return dataclasses.replace(train_config, sync_bn=train_config.sync_bn and spec.norm == "batch")


def run_study(
    study: Study,
    out,
    *,
    seeds: int | None = None,
    workers: int | None = None,
    device: str = "cpu",
    progress: bool | None = None,
    nproc: int | None = None,
    stack: bool | None = None,
    executor: str = "local",
    executor_options: dict | None = None,
) -> list[dict]:
    """Run every run of ``study`` (those already done in ``out`` are reused) and return
    their summaries in grid order. ``nproc > 1``: each run is a torchrun launch of
    ``nproc`` processes (DistributedDataParallel), one run at a time; it cannot be combined
    with ``workers > 1``, and must divide the study's batch sizes (global batches).
    ``stack``: the runs that differ only in their seed train together, stacked (see
    :func:`plan_units`); ``False`` trains every run alone; ``None``: :func:`resolve_stack`
    chooses by the device. ``executor``: "local" (worker
    processes), "ray" or "submitit" (each unit a Ray task or a Slurm array job; see
    :mod:`resnorm.lab.executors`, which takes ``executor_options``)."""
    from .executors import check_executor, run_units

    check_executor(executor, executor_options, nproc)
    out = Path(out)
    specs = study.runs(seeds)
    results, todo = _reuse_done(specs, study, out, device, nproc or 1)
    distributed = nproc is not None and nproc > 1
    if distributed:
        _check_distributed_plan(todo, nproc, workers, device)
    stack = resolve_stack(stack, device) and not distributed
    units = plan_units(todo, study, stack=stack)
    # Threads from the whole grid, not from the runs left: see plan_workers.
    n_workers, threads = plan_workers(
        len(plan_units(specs, study, stack=stack)), workers, runs_left=len(units)
    )
    show = show_progress(progress)
    epochs = (
        0
        if study.init_only
        else study.train_config(specs[0].batch_size, specs[0].seed, device).epochs
    )
    with _LabProgress(show, len(specs), len(specs) - len(todo), epochs, n_workers) as bar:
        if todo and distributed:
            _run_launched(todo, study, out, device, nproc, bar, results)
        elif todo and executor != "local":
            run_units(executor, units, study, out, device, threads, bar, results, executor_options)
        elif todo and n_workers == 1:
            _run_here(units, study, out, device, threads, bar, results)
        elif todo:
            _run_in_pool(units, study, out, device, n_workers, threads, bar, results)
    return [results[spec.run_id] for spec in specs]


def _reuse_done(
    specs: list[RunSpec], study: Study, out: Path, device: str, nproc: int
) -> tuple[dict[str, dict], list[RunSpec]]:
    """``(summaries of the runs already done with this configuration, marked reused, by
    run id; the runs left to do)``."""
    results: dict[str, dict] = {}
    todo = []
    for spec in specs:
        config_hash = identity_hash(run_config(spec, study, device, nproc))
        done = load_summary(out / "runs" / spec.run_id, config_hash)
        if done is not None:
            results[spec.run_id] = {**done, "reused": True}
        else:
            todo.append(spec)
    return results, todo


def _run_launched(
    todo: list[RunSpec],
    study: Study,
    out: Path,
    device: str,
    nproc: int,
    bar: _LabProgress,
    results: dict[str, dict],
) -> None:
    """Run ``todo`` one at a time, each a torchrun launch of ``nproc`` processes; a
    launch that fails is recorded as a failed run."""
    from ..train.distributed import LaunchError, launch

    for spec in todo:
        bar.started(spec.run_id)
        run_dir = str(out / "runs" / spec.run_id)
        try:
            results[spec.run_id] = launch(
                execute_distributed_run,
                (spec, study, run_dir, device),
                nproc=nproc,
                device=device,
            )[0]
        except LaunchError as exc:
            results[spec.run_id] = _worker_died(spec, study, f"launch failed: {exc}")
        bar.finished(spec.run_id)


def _run_here(
    units: list[tuple[RunSpec, ...]],
    study: Study,
    out: Path,
    device: str,
    threads: int,
    bar: _LabProgress,
    results: dict[str, dict],
) -> None:
    """Run ``units`` one after the other in this process (one worker)."""
    for unit in units:
        for spec in unit:
            bar.started(spec.run_id)
        summaries = execute_unit(
            unit,
            study,
            str(out),
            device,
            threads,
            on_epoch=lambda i, row: bar.epoch(i, row["epoch"]),
        )
        for spec, summary in zip(unit, summaries):
            results[spec.run_id] = summary
            bar.finished(spec.run_id)


def _run_in_pool(
    units: list[tuple[RunSpec, ...]],
    study: Study,
    out: Path,
    device: str,
    n_workers: int,
    threads: int,
    bar: _LabProgress,
    results: dict[str, dict],
) -> None:
    """Run ``units`` in ``n_workers`` spawned worker processes, which die with this one
    (see :func:`_init_worker`). On Ctrl-C, or any other exception here, the workers are
    ended at once (:func:`_stop_workers`) before the exception goes on."""
    # A SimpleQueue's put is written before it returns: a run's last epoch arrives
    # before its result does (a Queue's feeder thread could deliver it after).
    reports = multiprocessing.get_context("spawn").SimpleQueue() if bar.show else None
    pool = workers.spawn_pool(n_workers, reports)
    try:
        pending = {
            pool.submit(_run_in_worker, unit, study, str(out), device, threads): unit
            for unit in units
        }
        while pending:
            # Wake up now and then to show the workers' progress reports.
            done, _ = wait(
                pending, timeout=0.2 if reports is not None else None, return_when=FIRST_COMPLETED
            )
            _show_reports(reports, bar)
            for future in done:
                unit = pending.pop(future)
                try:
                    summaries = future.result()
                except Exception as exc:  # the worker process itself died
                    error = f"worker process died: {type(exc).__name__}: {exc}"
                    summaries = [_worker_died(spec, study, error) for spec in unit]
                for spec, summary in zip(unit, summaries):
                    results[spec.run_id] = summary
                    bar.finished(spec.run_id)
    except BaseException:
        workers._stop_workers(pool)
        raise
    pool.shutdown()
    if reports is not None:
        reports.close()


def _show_reports(reports, bar: _LabProgress) -> None:
    """Pass the progress reports the workers queued so far on to ``bar``."""
    while reports is not None and not reports.empty():
        report = reports.get()
        if report[0] == "started":
            bar.started(report[1])
        else:
            bar.epoch(report[1], report[2])


def _check_distributed_plan(
    todo: list[RunSpec], nproc: int, workers: int | None, device: str
) -> None:
    from ..train.distributed import check_nproc

    check_nproc(nproc, device)
    if workers is not None and workers > 1:
        raise UsageError(
            f"nproc={nproc} and workers={workers} cannot be combined: with nproc "
            f"each run takes {nproc} processes and runs go one at a time"
        )
    uneven = sorted({spec.batch_size for spec in todo if spec.batch_size % nproc})
    if uneven:
        raise UsageError(
            f"nproc={nproc} must divide the study's batch sizes (global batches, "
            f"shared out among the processes); it does not divide "
            f"{', '.join(map(str, uneven))}"
        )


def _worker_died(spec: RunSpec, study: Study, error: str) -> dict:
    return RunSummary.of(spec, study, error=error).to_dict()
