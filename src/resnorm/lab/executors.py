"""Running a study's units on a Ray cluster or as a Slurm job array (submitit).

``run_study(executor="ray")`` sends every unit of :func:`~resnorm.lab.runner.plan_units`
(a run, or the runs of one grid point that differ only in their seed) as one Ray task;
``executor="submitit"`` as one job of a Slurm job array. Either way the task is
:func:`~resnorm.lab.runner.execute_unit`, which writes ``runs/<run_id>/`` under the lab's
folder exactly as a local worker does: that folder must be one every node sees (a shared
file system), and the reuse and resume rules are the local ones (the runs already done are
reused before anything is sent; a sent run resumes from its checkpoints).

A unit gets the threads a local lab would give it (:func:`~resnorm.lab.runner.plan_workers`:
the grid, ``workers`` and this machine's cores), so the three executors compute the same
numbers. A worker lost under a Ray task is retried (``max_retries``); a Slurm job that is
preempted or times out is requeued and resumes from its checkpoints. A task or job that
still fails is recorded as failed runs, never lost: running the lab again retries them.

The engines are optional extras: ``pip install 'resnorm[ray]'`` or ``'resnorm[submitit]'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
from pathlib import Path

from ..errors import MissingExtraError, UsageError
from . import runner

EXECUTORS = ("local", "ray", "submitit")
RAY_RETRIES = 3  # a task whose worker process (or node) died is run again this many times
SLURM_TIME = 60  # minutes a Slurm job may run, unless --slurm-time says otherwise
_SLURM_FLAGS = {"slurm_partition": "--slurm-partition", "slurm_time": "--slurm-time"}
# executor_options: ray_retries overrides RAY_RETRIES; slurm_options are more sbatch
# parameters (account, qos, mem, ...: submitit's slurm_additional_parameters); cluster is
# submitit's ("slurm", "local", "debug"; by default slurm where sbatch is, else local).
OPTIONS = (
    "ray_address",
    "ray_retries",
    "slurm_partition",
    "slurm_time",
    "slurm_options",
    "cluster",
)


def _engine(executor: str):
    """The engine's module, or an error naming the extra that installs it."""
    name = {"ray": "Ray", "submitit": "submitit"}[executor]
    try:
        return importlib.import_module(executor)
    except ImportError as exc:
        raise MissingExtraError(
            f"--executor {executor} needs {name}: pip install 'resnorm[{executor}]'"
        ) from exc


def check_executor(executor: str = "local", options: dict | None = None, nproc=None) -> None:
    """The executor and its options checked, before anything runs: a known executor, its
    engine installed, each option only with its executor, not with ``nproc > 1``."""
    options = options or {}
    if executor not in EXECUTORS:
        raise UsageError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UsageError(f"unknown executor option(s) {', '.join(unknown)}: not {OPTIONS}")
    if executor != "local" and nproc is not None and nproc > 1:
        raise UsageError(
            f"--executor {executor} cannot be combined with --nproc {nproc}: "
            "a remote run trains in one process"
        )
    if options.get("ray_address") is not None and executor != "ray":
        raise UsageError(
            f"--ray-address {options['ray_address']} needs --executor ray, not {executor}"
        )
    for key, flag in _SLURM_FLAGS.items():
        if options.get(key) is not None and executor != "submitit":
            raise UsageError(f"{flag} {options[key]} needs --executor submitit, not {executor}")
    time = options.get("slurm_time")
    if time is not None and (not isinstance(time, int) or time < 1):
        raise UsageError(f"--slurm-time {time} must be a whole number of minutes, at least 1")
    if executor != "local":
        _engine(executor)


def run_units(
    executor: str,
    units: list[tuple],
    study,
    out: Path,
    device: str,
    threads: int,
    bar,
    results: dict[str, dict],
    options: dict | None = None,
) -> None:
    """Run ``units`` with ``executor`` ("ray" or "submitit"), each with ``threads``
    threads, putting their summaries into ``results`` and telling ``bar`` as they arrive.
    Paths are made absolute: the workers do not share this process's folder."""
    options = dict(options or {})
    out = Path(out).expanduser().resolve()
    root = study.dataset_options.get("root")
    if root is not None:
        absolute = str(Path(root).expanduser().resolve())
        study = dataclasses.replace(
            study, dataset_options={**study.dataset_options, "root": absolute}
        )
    run = {"ray": _run_with_ray, "submitit": _run_with_submitit}[executor]
    run(units, study, out, device, threads, bar, results, **options)


def _record(unit, summaries, bar, results) -> None:
    """A unit's summaries in ``results``; ``bar`` shows its runs done (remote runs do
    not report their epochs)."""
    for spec, summary in zip(unit, summaries):
        results[spec.run_id] = summary
        bar.started(spec.run_id)
        bar.finished(spec.run_id)


def _failed(unit, study, error: BaseException | str) -> list[dict]:
    """Every run of ``unit`` recorded as failed with ``error`` on one line (its first
    line and, for a traceback, its last: the exception)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = " ... ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)
    return [runner._worker_died(spec, study, line) for spec in unit]


def _run_with_ray(
    units, study, out, device, threads, bar, results, *, ray_address=None, ray_retries=None
) -> None:
    """One Ray task per unit, on the cluster at ``ray_address`` or, without one (and no
    Ray already started in this process), on a local cluster of this machine's cores that
    ends with the call."""
    ray = _engine("ray")
    started = _start_ray(ray, ray_address)
    pending = {}
    try:
        _check_ray_cpus(ray, threads)
        retries = RAY_RETRIES if ray_retries is None else ray_retries
        task = ray.remote(num_cpus=threads, max_retries=retries)(runner.execute_unit)
        study_ref = ray.put(study)
        for unit in units:
            pending[task.remote(unit, study_ref, str(out), device, threads)] = unit
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                unit = pending.pop(ref)
                try:
                    summaries = ray.get(ref)
                except Exception as exc:  # the retries spent: recorded, never lost
                    summaries = _failed(unit, study, f"Ray task failed: {exc}")
                _record(unit, summaries, bar, results)
    except BaseException:
        for ref in pending:
            with contextlib.suppress(Exception):  # the first exception is the one to see
                ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


def _start_ray(ray, address: str | None) -> bool:
    """Connect to the cluster (or start a local one); ``True`` when this call started Ray
    and so should shut it down."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(
            num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING
        )
        return True
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise UsageError(f"--ray-address {address}: cannot connect: {exc}") from None
    return True


def _check_ray_cpus(ray, threads: int) -> None:
    """A task asks for ``threads`` CPUs: a cluster without a node that has them would
    leave it waiting forever."""
    largest = max(
        (node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0
    )
    if largest < threads:
        raise UsageError(
            f"each run takes {threads} threads (CPUs) but the Ray cluster's largest node "
            f"has {largest:g}; pass --workers to share the cores out among more runs"
        )


class _SlurmUnit:
    """:func:`~resnorm.lab.runner.execute_unit` as a submitit job that, when Slurm
    preempts it or its time runs out, is requeued with the same arguments: the runs
    resume from their checkpoints."""

    def __call__(self, *args):
        return runner.execute_unit(*args)

    def checkpoint(self, *args):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)


def _run_with_submitit(
    units,
    study,
    out,
    device,
    threads,
    bar,
    results,
    *,
    slurm_partition=None,
    slurm_time=None,
    slurm_options=None,
    cluster=None,
) -> None:
    """The units as one Slurm job array (submitit's files in ``out/submitit``), or with
    ``cluster="local"`` as local processes (submitit's own, for tests)."""
    submitit = _engine("submitit")
    executor = submitit.AutoExecutor(folder=out / "submitit", cluster=cluster)
    if executor.cluster != "slurm" and (slurm_partition or slurm_options):
        raise UsageError(
            f"--slurm-partition {slurm_partition}: no Slurm on this machine (sbatch not found)"
        )
    executor.update_parameters(
        name=f"resnorm-lab-{study.name}",
        timeout_min=slurm_time or SLURM_TIME,
        nodes=1,
        tasks_per_node=1,
        cpus_per_task=threads,
        gpus_per_node=1 if device.startswith("cuda") else 0,
        **({"slurm_partition": slurm_partition} if slurm_partition else {}),
        **({"slurm_additional_parameters": dict(slurm_options)} if slurm_options else {}),
    )
    n = len(units)
    jobs = executor.map_array(
        _SlurmUnit(), units, [study] * n, [str(out)] * n, [device] * n, [threads] * n
    )
    unit_of = {id(job): unit for job, unit in zip(jobs, units)}
    poll = 10.0 if executor.cluster == "slurm" else 0.5
    try:
        for job in submitit.helpers.as_completed(jobs, poll_frequency=poll):
            unit = unit_of[id(job)]
            try:
                summaries = job.result()
            except Exception as exc:  # the job failed (or its requeues ran out): recorded
                summaries = _failed(unit, study, f"job {job.job_id} failed: {exc}")
            _record(unit, summaries, bar, results)
    except BaseException:
        for job in jobs:
            with contextlib.suppress(Exception):  # the first exception is the one to see
                if not job.done():
                    job.cancel(check=False)
        raise
