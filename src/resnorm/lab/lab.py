"""``run_lab``: a study from name to report."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .._progress import show_progress
from .._progress import status as status_spinner
from ..errors import UsageError
from .runner import resolve_stack, run_study
from .study import Study, check_run_count, load_study


@dataclass
class LabResult:
    study: Study
    results: list[dict]
    report: Path
    out: Path
    seconds: float

    @property
    def counts(self) -> dict[str, int]:
        """How many runs were reused from an earlier invocation and run now, and how many
        finished, diverged and failed."""
        counts = {
            "runs": len(self.results),
            "reused": sum(bool(r.get("reused")) for r in self.results),
        }
        counts["trained"] = counts["runs"] - counts["reused"]
        for status in ("finished", "diverged", "failed"):
            counts[status] = sum(r.get("status") == status for r in self.results)
        return counts


def check_study(study: Study, device: str = "cpu", seeds: int | None = None) -> None:
    """What makes every run of ``study`` fail, found before any run starts, as a
    :class:`~resnorm.errors.UsageError`: a device this machine does not have, a data-set
    folder that does not exist, data-set options the loader rejects (the data set is
    loaded once, here, and cached), and model options a model of the grid rejects (each
    model is built on the meta device: no memory, no time)."""
    import torch

    from ..train import model_for_data
    from ..train.loop import resolve_device
    from .runner import _dataset

    resolve_device(device)
    root = study.dataset_options.get("root")
    if root is not None and not Path(root).expanduser().is_dir():
        raise UsageError(
            f"data_root={str(root)!r} is not a folder; give the folder that "
            f"holds the {study.dataset} files"
        )
    try:
        data = _dataset(study.dataset, json.dumps(study.dataset_options, sort_keys=True))
    except UsageError as exc:
        raise type(exc)(f"study {study.source}: data set {study.dataset!r}: {exc}") from None
    checked = set()
    for spec in study.runs(seeds):
        key = (spec.model, tuple(sorted(spec.model_overrides().items(), key=str)))
        if key in checked:
            continue
        checked.add(key)
        try:
            with torch.device("meta"):
                model_for_data(spec.model, data, **spec.model_overrides())
        except UsageError as exc:
            raise UsageError(f"study {study.source}: run {spec.run_id}: {exc}") from None
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta is built later
            pass


def _prepared(study, out, quick: bool, sync_bn: bool, data_root) -> tuple[Study, Path]:
    """The study as run_lab runs it (loaded, ``--quick``, ``--sync-bn``, ``--data-root``)
    and its lab folder (by default ``runs/lab-<study>``, ``-quick`` appended)."""
    if not isinstance(study, Study):
        study = load_study(study)
    if quick:
        study = study.quick_version()
    if sync_bn:
        study = dataclasses.replace(study, train={**study.train, "sync_bn": True})
    if data_root is not None:
        study = dataclasses.replace(
            study, dataset_options={**study.dataset_options, "root": str(data_root)}
        )
    if out is None:
        out = Path("runs") / (f"lab-{study.name}" + ("-quick" if quick else ""))
    return study, Path(out)


def run_lab(
    study: str | Path | Study = "depth",
    out=None,
    *,
    quick: bool = False,
    seeds: int | None = None,
    workers: int | None = None,
    device: str = "cpu",
    data_root=None,
    progress: bool | None = None,
    nproc: int | None = None,
    sync_bn: bool = False,
    executor: str = "local",
    executor_options: dict | None = None,
    stack: bool | None = None,
) -> LabResult:
    """Run a study (built-in name, TOML path or :class:`Study`) and write its report.

    ``out`` defaults to ``runs/lab-<study>`` (``-quick`` appended with ``quick``); running
    again with the same folder reuses the runs whose whole configuration is unchanged
    (see :func:`~resnorm.lab.runner.run_config`), resumes the interrupted ones and runs
    again those the study's edits changed. ``data_root`` is the folder of a file-based
    data set's official files (CIFAR, MNIST). ``nproc``: train each run with
    DistributedDataParallel over that many processes (see
    :func:`~resnorm.lab.runner.run_study`); ``sync_bn``: with synchronized batch norm in
    the runs that have batch norm. :func:`check_study` runs first: a wrong device, data
    folder or option is an error before anything runs. ``executor``, ``executor_options``:
    where the runs train (local processes, Ray, Slurm: see :mod:`resnorm.lab.executors`).
    ``stack``: the seeds of a grid point train stacked (``None``: on CUDA, see
    :func:`~resnorm.lab.runner.resolve_stack`); ``False`` trains every run alone.
    """
    from ..train import provenance
    from .executors import check_executor
    from .report import write_report

    start = time.perf_counter()
    check_executor(executor, executor_options, nproc)
    study, out = _prepared(study, out, quick, sync_bn, data_root)
    check_run_count(study, seeds)
    check_study(study, device, seeds)
    results = run_study(
        study,
        out,
        seeds=seeds,
        workers=workers,
        device=device,
        progress=progress,
        nproc=nproc,
        executor=executor,
        executor_options=executor_options,
        stack=stack,
    )
    made = {**provenance(device), "seeds": seeds or study.seeds, "workers": workers}
    made.update(nproc=nproc or 1, executor=executor, stack=resolve_stack(stack, device))
    with status_spinner(
        show_progress(progress), f"writing the report into {out} (figures, tables)..."
    ):
        report = write_report(results, {**study.to_dict(), "provenance": made}, out)
    return LabResult(study, results, report, out, time.perf_counter() - start)
