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

import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from ..errors import UsageError
from .._io import atomic_open
from .study import RunSpec, Study

INIT_BATCH = 128


def plan_workers(num_runs: int, workers: int | None = None,
                 cores: int | None = None) -> tuple[int, int]:
    """``(worker processes, threads per worker)`` that use the cores without
    oversubscribing them: by default one process per core (at most one per run), and the
    cores shared out as intra-op threads."""
    cores = cores or os.cpu_count() or 1
    if workers is None:
        workers = cores
    workers = max(1, min(workers, num_runs))
    return workers, max(1, cores // workers)


@lru_cache(maxsize=4)
def _dataset(name: str, options_json: str):
    """The data set, loaded once per worker process (keyed by its options as JSON)."""
    from ..data import load_dataset

    options = json.loads(options_json)
    if isinstance(options.get("shape"), list):
        options["shape"] = tuple(options["shape"])
    return load_dataset(name, **options)


def _compact_init(diagnosis) -> dict:
    def finite(x):
        return x if isinstance(x, (int, float)) and math.isfinite(x) else None

    return {"verdict": diagnosis.verdict.value, "grad_ratio": finite(diagnosis.grad_ratio),
            "start_layer": diagnosis.start_layer,
            "layers": [{"name": l.name, "kind": l.kind, "grad_norm": finite(l.grad_norm)}
                       for l in diagnosis.layers],
            "blocks": [{"name": b.name, "sq_mean": finite(b.sq_mean), "var": finite(b.var),
                        "branch_var": finite(b.branch_var) if b.branch_var is not None else None}
                       for b in diagnosis.blocks]}


def execute_run(spec: RunSpec, study: Study, run_dir: str, device: str, threads: int) -> dict:
    """Diagnose ``spec``'s model at initialization, then train it (unless the study is
    init-only); write and return its summary. Runs in a worker process (or in the
    caller's with one worker: the thread count is restored afterwards)."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _execute(spec, study, Path(run_dir), device)
    finally:  # with one worker the run happens in the caller's process
        torch.set_num_threads(previous_threads)


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


def _execute(spec: RunSpec, study: Study, run_dir: Path, device: str) -> dict:
    import dataclasses

    import torch

    from ..diagnostics import diagnose
    from ..norms import has_batch_norm
    from ..train import fit, model_for_data
    from ..train.distributed import world

    rank, world_size = world()

    start = time.perf_counter()
    summary = {"run_id": spec.run_id, "variant": spec.variant, "family": spec.model,
               **asdict(spec), "options": dict(spec.options), "dataset": study.dataset,
               "status": "failed", "error": None, "diverged_at_step": None,
               "final_test_acc": None, "best_test_acc": None, "final_train_loss": None,
               "parameters": None, "seconds": None, "history": [], "init": None}
    try:
        data = _dataset(study.dataset, json.dumps(study.dataset_options, sort_keys=True))
        torch.manual_seed(spec.seed)
        model = model_for_data(spec.model, data, **spec.model_overrides())
        summary["parameters"] = sum(p.numel() for p in model.parameters())
        generator = torch.Generator().manual_seed(spec.seed)
        index = torch.randperm(len(data.x_train), generator=generator)[:INIT_BATCH]
        summary["init"] = _compact_init(diagnose(model, data.x_train[index],
                                                 data.y_train[index]))
        if study.init_only:
            summary["status"] = "finished"
        else:
            config = study.train_config(spec.batch_size // world_size, spec.seed, device)
            if config.sync_bn and not has_batch_norm(model):
                config = dataclasses.replace(config, sync_bn=False)
            result = fit(model, data, config, out=run_dir, progress=False,
                         meta={"model": spec.model, "overrides": spec.model_overrides(),
                               "dataset": study.dataset})
            history = result.history
            summary.update(
                status="diverged" if result.diverged else "finished",
                diverged_at_step=result.diverged_at_step, history=history,
                final_test_acc=history[-1]["test_acc"] if history else None,
                best_test_acc=max(h["test_acc"] for h in history) if history else None,
                final_train_loss=history[-1]["train_loss"] if history else None)
    except Exception as exc:  # recorded, and the lab goes on
        summary["error"] = f"{type(exc).__name__}: {exc}"
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(run_dir / "error.txt", "w") as f:
            f.write(traceback.format_exc())
        if world_size > 1:
            raise
    summary["seconds"] = time.perf_counter() - start
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return summary


def load_summary(run_dir: Path) -> dict | None:
    """The summary of a run that ended (finished, diverged or failed), else ``None``.
    A failed run is run again by a new lab invocation; finished and diverged ones are kept."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("status") in ("finished", "diverged") else None


def run_study(study: Study, out, *, seeds: int | None = None, workers: int | None = None,
              device: str = "cpu", progress: bool | None = None,
              nproc: int | None = None) -> list[dict]:
    """Run every run of ``study`` (those already done in ``out`` are reused) and return
    their summaries in grid order. ``nproc > 1``: each run is a torchrun launch of
    ``nproc`` processes (DistributedDataParallel), one run at a time; it cannot be combined
    with ``workers > 1``, and must divide the study's batch sizes (global batches)."""
    out = Path(out)
    specs = study.runs(seeds)
    results: dict[str, dict] = {}
    todo = []
    for spec in specs:
        done = load_summary(out / "runs" / spec.run_id)
        if done is not None:
            results[spec.run_id] = done
        else:
            todo.append(spec)
    distributed = nproc is not None and nproc > 1
    if distributed:
        _check_distributed_plan(todo, nproc, workers, device)
    n_workers, threads = plan_workers(len(todo), workers)
    show = sys.stderr.isatty() if progress is None else progress
    with _LabProgress(show, len(specs), len(specs) - len(todo)) as bar:
        if todo and distributed:
            from ..train.distributed import LaunchError, launch

            for spec in todo:
                bar.running(1)
                run_dir = str(out / "runs" / spec.run_id)
                try:
                    results[spec.run_id] = launch(execute_distributed_run,
                                                  (spec, study, run_dir, device), nproc=nproc,
                                                  device=device)[0]
                except LaunchError as exc:
                    results[spec.run_id] = _worker_died(spec, study, f"launch failed: {exc}")
                bar.finished()
        elif todo and n_workers == 1:
            for spec in todo:
                bar.running(1)
                results[spec.run_id] = execute_run(spec, study, str(out / "runs" / spec.run_id),
                                                   device, threads)
                bar.finished()
        elif todo:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(n_workers, mp_context=context) as pool:
                pending = {pool.submit(execute_run, spec, study,
                                       str(out / "runs" / spec.run_id), device, threads): spec
                           for spec in todo}
                try:
                    while pending:
                        bar.running(min(n_workers, len(pending)))
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            spec = pending.pop(future)
                            try:
                                results[spec.run_id] = future.result()
                            except Exception as exc:  # the worker process itself died
                                results[spec.run_id] = _worker_died(
                                    spec, study,
                                    f"worker process died: {type(exc).__name__}: {exc}")
                            bar.finished()
                except BaseException:
                    for future in pending:
                        future.cancel()
                    raise
    return [results[spec.run_id] for spec in specs]


def _check_distributed_plan(todo: list[RunSpec], nproc: int, workers: int | None,
                            device: str) -> None:
    from ..train.distributed import check_nproc

    check_nproc(nproc, device)
    if workers is not None and workers > 1:
        raise UsageError(f"nproc={nproc} and workers={workers} cannot be combined: with nproc "
                         f"each run takes {nproc} processes and runs go one at a time")
    uneven = sorted({spec.batch_size for spec in todo if spec.batch_size % nproc})
    if uneven:
        raise UsageError(f"nproc={nproc} must divide the study's batch sizes (global batches, "
                         f"shared out among the processes); it does not divide "
                         f"{', '.join(map(str, uneven))}")


def _worker_died(spec: RunSpec, study: Study, error: str) -> dict:
    return {"run_id": spec.run_id, "variant": spec.variant, "family": spec.model,
            **asdict(spec), "options": dict(spec.options), "dataset": study.dataset,
            "status": "failed", "error": error,
            "diverged_at_step": None, "final_test_acc": None, "best_test_acc": None,
            "final_train_loss": None, "parameters": None, "seconds": None, "history": [],
            "init": None}


class _LabProgress:
    """Runs done / running / left with an ETA, on stderr when it is a terminal."""

    def __init__(self, show: bool, total: int, done: int) -> None:
        self.show, self.total, self.done = show, total, done
        self.progress = self.task = None

    def __enter__(self) -> _LabProgress:
        if self.show:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.progress = Progress(TextColumn("lab"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("runs done, {task.fields[running]} running"),
                                     TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=Console(stderr=True))
            self.progress.start()
            self.task = self.progress.add_task("lab", total=self.total, completed=self.done,
                                               running=0)
        return self

    def running(self, count: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, running=count)

    def finished(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
