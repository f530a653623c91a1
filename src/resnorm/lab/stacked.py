"""A unit of the lab's runs trained stacked: the runs of one grid point, one per seed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .runner import _fit, _new_summary, _prepare, _record_error, _write_summary
from .study import RunSpec, Study
from .summary import _record_training


def execute_stacked(
    unit: tuple[RunSpec, ...],
    study: Study,
    out: Path,
    device: str,
    threads: int,
    on_epoch: Callable[[str, dict], None] | None = None,
) -> list[dict]:
    """Build and diagnose each run of ``unit`` as :func:`~resnorm.lab.runner.execute_run`
    does, then train them: together with :func:`resnorm.train.fit_stacked` when they can
    be stacked (:func:`resnorm.train.stack_refusal`), else one after the other; write
    each run's summary. A run that fails to build is recorded as failed and the others
    train. A run's ``seconds`` are the unit's, shared out."""
    from ..train.threads import intra_op_threads

    start = time.perf_counter()
    with intra_op_threads(threads):
        summaries, prepared = {}, []
        for spec in unit:
            run_dir = out / "runs" / spec.run_id
            summary = summaries[spec.run_id] = _new_summary(spec, study, device, 1)
            try:
                prepared.append((spec, _prepare(spec, study, device, run_dir, summary, 1)))
            except Exception as exc:  # noqa: BLE001 - recorded, and the others go on
                _record_error(summary, run_dir, exc)
        if _stackable([run for _, run in prepared]):
            _train_stacked(prepared, summaries, on_epoch)
        else:
            _train_alone(prepared, summaries, on_epoch)
        seconds = (time.perf_counter() - start) / len(unit)
        return [
            _write_summary(summaries[spec.run_id], out / "runs" / spec.run_id, seconds)
            for spec in unit
        ]


def _stackable(runs: list) -> bool:
    from ..train import stack_refusal

    return (
        len(runs) > 1 and stack_refusal([r.model for r in runs], [r.config for r in runs]) is None
    )


def _train_alone(prepared: list, summaries: dict, on_epoch) -> None:
    """Train the prepared runs one after the other, as :func:`execute_run` trains one."""
    for spec, run in prepared:
        summary = summaries[spec.run_id]
        report = None if on_epoch is None else lambda row, i=spec.run_id: on_epoch(i, row)
        try:
            _record_training(summary, _fit(run, report))
        except Exception as exc:  # noqa: BLE001 - recorded, and the others go on
            _record_error(summary, run.out, exc)


def _train_stacked(prepared: list, summaries: dict, on_epoch) -> None:
    """Train the prepared runs stacked, recording each result (or the error, in each)."""
    from ..train import fit_stacked

    specs = [spec for spec, _ in prepared]
    runs = [run for _, run in prepared]
    try:
        results = fit_stacked(
            [r.model for r in runs],
            runs[0].data,
            [r.config for r in runs],
            outs=[r.out for r in runs],
            metas=[r.meta for r in runs],
            restart_mismatched=True,
            on_epoch=None if on_epoch is None else lambda i, row: on_epoch(specs[i].run_id, row),
        )
    except Exception as exc:  # noqa: BLE001 - recorded in every run of the unit
        for spec, run in prepared:
            _record_error(summaries[spec.run_id], run.out, exc)
        return
    for spec, result in zip(specs, results):
        _record_training(summaries[spec.run_id], result)
