"""``run_lab``: a study from name to report."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from .runner import run_study
from .study import Study, load_study


@dataclass
class LabResult:
    study: Study
    results: list[dict]
    report: Path
    out: Path
    seconds: float


def run_lab(study: str | Path | Study = "depth", out=None, *, quick: bool = False,
            seeds: int | None = None, workers: int | None = None, device: str = "cpu",
            data_root=None, progress: bool | None = None, nproc: int | None = None,
            sync_bn: bool = False) -> LabResult:
    """Run a study (built-in name, TOML path or :class:`Study`) and write its report.

    ``out`` defaults to ``runs/lab-<study>`` (``-quick`` appended with ``quick``); running
    again with the same folder reuses finished runs and resumes the others. ``data_root``
    is the folder of a file-based data set's official files (CIFAR, MNIST). ``nproc``:
    train each run with DistributedDataParallel over that many processes (see
    :func:`~resnorm.lab.runner.run_study`); ``sync_bn``: with synchronized batch norm in
    the runs that have batch norm.
    """
    from .report import write_report

    start = time.perf_counter()
    if not isinstance(study, Study):
        study = load_study(study)
    if quick:
        study = study.quick_version()
    if sync_bn:
        study = dataclasses.replace(study, train={**study.train, "sync_bn": True})
    if data_root is not None:
        study = dataclasses.replace(study, dataset_options={**study.dataset_options,
                                                            "root": str(data_root)})
    out = Path(out) if out is not None else Path("runs") / (
        f"lab-{study.name}" + ("-quick" if quick else ""))
    results = run_study(study, out, seeds=seeds, workers=workers, device=device,
                        progress=progress, nproc=nproc)
    report = write_report(results, study.to_dict(), out)
    return LabResult(study, results, report, out, time.perf_counter() - start)
