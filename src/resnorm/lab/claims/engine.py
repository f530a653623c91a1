"""``run_claims``: plan the claims study's runs, train the ones not on disk yet (in worker
processes), pick each variant's learning rate on the validation split, and judge every
claim by its rule."""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

from ..._io import atomic_open, json_safe
from ..._progress import StderrProgress, show_progress
from ...errors import UsageError
from .. import workers as pool_workers
from ..units import MAX_STACK
from .experiments import EXPERIMENTS, Variant
from .jobs import Job, run_job, run_jobs, stack_key
from .protocol import Claim, Protocol, Size, load_protocol
from .stats import combine, mean_interval, paired, verdict


def plan(protocol: Protocol, size: Size, device: str = "cpu") -> dict[str, dict[str, list]]:
    """``{experiment: {variant name: (variant, {lr: [job per seed]})}}`` for the
    experiments the protocol's claims use."""
    planned = {}
    for name in dict.fromkeys(c.experiment for c in protocol.claims):
        settings = size.of(name)
        planned[name] = {}
        for variant in EXPERIMENTS[name].variants(settings):
            s = {**settings, **variant.overrides}
            jobs = {
                float(lr): [
                    _job(variant, s, float(lr), seed, protocol.dataset, device)
                    for seed in range(s["seeds"])
                ]
                for lr in s["lrs"]
            }
            planned[name][variant.name] = (variant, jobs)
    return planned


def _job(variant: Variant, s: dict, lr: float, seed: int, dataset: str, device: str) -> Job:
    return Job(
        variant.model,
        tuple(
            sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in variant.options.items())
        ),
        lr,
        seed,
        int(s["epochs"]),
        int(s["batch_size"]),
        int(s["num_samples"]),
        float(s["val_fraction"]),
        variant.optimizer,
        tuple(variant.probes),
        dataset,
        device,
    )


def _unique_jobs(planned: dict) -> dict[str, Job]:
    jobs = {}
    for variants in planned.values():
        for _, by_lr in variants.values():
            for seeds in by_lr.values():
                for job in seeds:
                    jobs.setdefault(job.key, job)
    return jobs


def _load_record(path: Path) -> dict | None:
    """A finished job's record, or ``None`` when missing or unreadable (then it runs
    again). Records are small; anything over 16 MiB is not one."""
    try:
        if path.stat().st_size > 16 << 20:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _run_unit_safely(unit: tuple[Job, ...]) -> list[dict]:
    """The records of a unit's jobs (one job, or jobs trained stacked); a failure is
    recorded (a bug is not hidden: the error is kept). When the stacked training fails,
    each job trains alone, so that one job's error is its own, and its record keeps the
    stacked training's error (``stack_error``)."""
    if len(unit) > 1:
        try:
            return [{"status": "finished", **r} for r in run_jobs(list(unit))]
        except Exception as exc:  # noqa: BLE001 - each job's own error is found alone
            error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"{len(unit)} runs trained alone, not stacked: {error}", stacklevel=1)
            return [{**_run_job_safely(job), "stack_error": error} for job in unit]
    return [_run_job_safely(job) for job in unit]


def _run_job_safely(job: Job) -> dict:
    """The job's record; a failure is recorded (a bug is not hidden: the error is kept)."""
    try:
        return {"status": "finished", **run_job(job)}
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the study
        return _failed(f"{type(exc).__name__}: {exc}")


def _failed(error: str) -> dict:
    """A failed run's record: no value, its error kept (see :func:`_usable`)."""
    return {"status": "failed", "error": error}


def _write_record(path: Path, record: dict) -> None:
    text = json.dumps(json_safe(record, coerce=True), allow_nan=False)
    with atomic_open(path, "wb") as f:
        f.write(text.encode("utf-8"))


def plan_units(jobs: list[Job], stack: bool) -> list[tuple[Job, ...]]:
    """The units of work of ``jobs``, the costliest first: with ``stack``, the jobs that
    differ only in learning rate and seed (:func:`~.jobs.stack_key`) form one unit,
    trained together as one stacked computation, at most :data:`MAX_STACK` a unit;
    without, every job is a unit of its own."""
    if not stack:
        units = [(job,) for job in jobs]
    else:
        groups: dict[Job, list[Job]] = {}
        for job in jobs:
            groups.setdefault(stack_key(job), []).append(job)
        units = [
            tuple(group[i : i + MAX_STACK])
            for group in groups.values()
            for i in range(0, len(group), MAX_STACK)
        ]
    return sorted(units, key=lambda unit: sum(job.cost() for job in unit), reverse=True)


def train_jobs(
    jobs: dict[str, Job], folder: Path, pool, progress: bool, stack: bool = True
) -> dict:
    """Every job's record: read from ``folder`` when a finished run wrote it there,
    trained otherwise (in units of work, :func:`plan_units`, the costliest first, in
    ``pool``'s worker processes, or here when ``None``) and written as its unit ends, so
    an interrupted study resumes where it stopped."""
    folder.mkdir(parents=True, exist_ok=True)
    records, todo = {}, []
    for key, job in jobs.items():
        record = _load_record(folder / f"{key}.json")
        if record is not None:
            records[key] = {**record, "reused": True}
        else:
            todo.append(job)
    units = plan_units(todo, stack)
    with _JobBar(progress, len(jobs), len(records)) as bar:
        advance = bar.advance
        if pool is None:
            for unit in units:
                for job, record in zip(unit, _run_unit_safely(unit), strict=True):
                    records[job.key] = _finish(folder, job, record)
                    advance()
        else:
            _in_pool(units, folder, pool, records, advance)
    return records


class _JobBar(StderrProgress):
    """Runs done of all, with the time elapsed and left, on stderr when shown."""

    def __init__(self, show: bool, total: int, done: int) -> None:
        super().__init__(show)
        self.total, self.done = total, done

    def columns(self) -> tuple:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return (
            "claims: runs",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )

    def on_start(self) -> None:
        self.task = self.progress.add_task("runs", total=self.total, completed=self.done)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)


def _finish(folder: Path, job: Job, record: dict) -> dict:
    """Keep a finished run's record on disk; a failed run is tried again next time."""
    if record.get("status") == "finished":
        _write_record(folder / f"{job.key}.json", record)
    return record


def _in_pool(units: list[tuple], folder: Path, pool, records: dict, advance) -> None:
    pending = {pool.submit(_run_unit_safely, unit): unit for unit in units}
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            unit = pending.pop(future)
            try:
                unit_records = future.result()
            except Exception as exc:  # the worker process itself died
                unit_records = [_failed(f"worker process died: {exc}")] * len(unit)
            for job, record in zip(unit, unit_records, strict=True):
                records[job.key] = _finish(folder, job, record)
                advance()


@contextlib.contextmanager
def _workers(n_workers: int):
    """The lab's worker processes (``None`` for one worker: all in this process), for
    the training and then the report's figures; ended at once if the lab stops early
    (Ctrl-C, an error), after their work otherwise."""
    if n_workers <= 1:
        yield None
        return
    pool = pool_workers.spawn_pool(n_workers)
    try:
        yield pool
    except BaseException:
        pool_workers._stop_workers(pool)
        raise
    pool.shutdown()


def _usable(record: dict | None) -> dict | None:
    """A record the measures can read (a failed run's is ``None``: it has no value)."""
    return record if record and record.get("status") == "finished" else None


def _score(record: dict | None) -> float:
    if not record or record.get("diverged") or record.get("val_acc") is None:
        return 0.0
    return float(record["val_acc"])


def choose(planned: dict, records: dict) -> dict:
    """Per experiment and variant: ``{"lr", "runs"}`` at the learning rate with the best
    mean validation accuracy over seeds (the smaller rate on a tie), or, for variants
    whose rate is the swept axis, ``{"lr": None, "by_lr": {lr: runs}}``."""
    chosen = {}
    for experiment, variants in planned.items():
        chosen[experiment] = {}
        for name, (variant, by_lr) in variants.items():
            runs = {lr: [_usable(records.get(j.key)) for j in jobs] for lr, jobs in by_lr.items()}
            if not variant.tune:
                chosen[experiment][name] = {"lr": None, "by_lr": runs}
                continue
            best = max(sorted(runs), key=lambda lr: sum(map(_score, runs[lr])) / len(runs[lr]))
            chosen[experiment][name] = {"lr": best, "runs": runs[best]}
    return chosen


def judge(claim: Claim, groups: dict) -> dict:
    """The claim's criteria with their per-seed effects, intervals and verdicts, and the
    claim's verdict."""
    criteria = []
    for c in claim.criteria:
        terms = [groups[g][m] for g, m in c.terms]
        effect = terms[0] if len(terms) == 1 else paired(terms[0], terms[1])
        interval = mean_interval(effect)
        criteria.append(
            {
                "what": c.what,
                "effect": c.effect,
                "holds_if": c.holds_if,
                "unit": c.unit,
                "values": effect,
                **interval,
                "verdict": verdict(interval, c.direction, c.margin),
            }
        )
    return {"criteria": criteria, "verdict": combine([c["verdict"] for c in criteria])}


def _number(value, unit: str) -> str:
    return "n/a" if value is None else f"{value:+.2f}" + (f" {unit}" if unit else "")


def _criterion_text(c: dict) -> str:
    if c["mean"] is None:
        return f"{c['what']}: no value (every run failed or the measure was undefined)"
    if c["low"] is None:
        return f"{c['what']}: {_number(c['mean'], c['unit'])} (one seed, no interval)"
    return (
        f"{c['what']}: {_number(c['mean'], c['unit'])}, 95% interval "
        f"[{c['low']:+.2f}, {c['high']:+.2f}] over {c['n']} seeds"
    )


_MEANING = {
    "supported": "The measurements support the claim in this setup.",
    "not supported": "The measurements contradict the claim in this setup: the effect lies on "
    "the other side of the rule's threshold.",
    "inconclusive": "Inconclusive: the interval contains the rule's threshold; more seeds or a "
    "larger setup would be needed to decide.",
    "not judged": "Not judged: an interval needs at least two seeds with a value.",
}


_FOLLOW_UP = {
    "supported": "The earlier result survives: with tuned learning rates and several seeds "
    "the effect is still there.",
    "not supported": "The earlier result does not survive: with tuned learning rates and "
    "several seeds the effect goes the other way.",
    "inconclusive": "Inconclusive: with tuned learning rates and several seeds the interval "
    "contains the threshold.",
    "not judged": _MEANING["not judged"],
}


def _term_text(group: str, metric: str, groups: dict, unit: str) -> str:
    i = mean_interval(groups[group][metric])
    if i["mean"] is None:
        return f"{group}.{metric}: no value"
    spread = "" if i["low"] is None else f" [{i['low']:.3g}, {i['high']:.3g}]"
    return f"{group}.{metric} {i['mean']:.3g}{spread}" + (f" {unit}" if unit else "")


def sentences(claim: Claim, judged: dict, groups: dict) -> list[str]:
    """Two or three sentences computed from the numbers: each criterion's effect, rule and
    verdict with the values it compares, then what the verdict means."""
    out = []
    for criterion, c in zip(claim.criteria, judged["criteria"], strict=True):
        terms = "; ".join(_term_text(g, m, groups, c["unit"]) for g, m in criterion.terms)
        out.append(
            f"{_criterion_text(c)} (rule: holds if {c['holds_if']}; {c['verdict']}). "
            f"Compared: {terms}."
        )
    meaning = _FOLLOW_UP if claim.kind == "follow-up" else _MEANING
    return out + [meaning[judged["verdict"]]]


def headline(judged: dict) -> str:
    """The criterion that decides the verdict (the first not supported, else the first
    not judged or inconclusive, else the first), in a few words."""
    criteria = judged["criteria"]
    for wanted in ("not supported", "not judged", "inconclusive"):
        deciding = [c for c in criteria if c["verdict"] == wanted]
        if deciding:
            return _criterion_text(deciding[0])
    return _criterion_text(criteria[0])


def _lr_table(chosen: dict) -> dict:
    return {name: c["lr"] for name, c in chosen.items()}


def assemble(protocol: Protocol, size: Size, planned: dict, records: dict) -> list[dict]:
    """Every claim of ``protocol`` judged from ``records``, in the report's shape."""
    chosen = choose(planned, records)
    measured = {name: EXPERIMENTS[name].measure(chosen[name], size.of(name)) for name in planned}
    claims = []
    for claim in protocol.claims:
        groups, figures = measured[claim.experiment]
        judged = judge(claim, groups)
        metrics = {m for c in claim.criteria for _, m in c.terms}
        shown = [f for f in figures if metrics & set(f["metrics"])] or figures[:1]
        claims.append(
            {
                "id": claim.id,
                "kind": claim.kind,
                "title": claim.title,
                "quote": claim.quote,
                "seeds": list(claim.seeds),
                "experiment": claim.experiment,
                "design": EXPERIMENTS[claim.experiment].design,
                "verdict": judged["verdict"],
                "headline": headline(judged),
                "criteria": judged["criteria"],
                "sentences": sentences(claim, judged, groups),
                "figures": [{**f, "name": f"claim-{claim.id}-{f['name']}"} for f in shown],
                "chosen_lr": _lr_table(chosen[claim.experiment]),
                "groups": {g: groups[g] for g in {g for c in claim.criteria for g, _ in c.terms}},
            }
        )
    return claims


def _counts(records: dict) -> dict:
    values = list(records.values())
    return {
        "jobs": len(values),
        "reused": sum(bool(r.get("reused")) for r in values),
        "trained": sum(not r.get("reused") for r in values),
        "diverged": sum(bool(r.get("diverged")) for r in values),
        "failed": sum(r.get("status") == "failed" for r in values),
    }


METHODOLOGY = (
    "Every variant is trained with every seed at every learning rate of the grid; its "
    "learning rate is the one with the best mean accuracy on a validation split carved "
    "from the training data (the same stratified split for every run); the test set is "
    "used only for the accuracies reported.",
    "Effects are means over seeds with a two-sided 95% Student-t interval; differences "
    "between variants are paired by seed (same data order and initialization seed).",
    "Each verdict rule is fixed in the protocol file before the run: supported when the "
    "whole interval lies beyond the threshold on the claim's side, not supported when it "
    "lies wholly on the other side, inconclusive otherwise; a claim with several criteria "
    "is supported only when all are.",
)


def run_claims(
    size: str = "default",
    out=None,
    *,
    protocol=None,
    workers: int | None = None,
    progress: bool | None = None,
    seeds: int | None = None,
    device: str = "cpu",
    stack: bool | None = None,
) -> dict:
    """Run the claims study at ``size`` (``"default"``, ``"quick"``, ``"full"``, or a
    size of a custom ``protocol`` file), write its report into ``out`` (default
    ``runs/lab-<protocol name>``, e.g. ``runs/lab-claims``, ``-<size>`` appended for other
    sizes) and return its results
    (the ``claims.json`` object). Runs already on disk there are reused.

    ``stack``: the jobs of a variant (its learning rates and seeds) train together as one
    stacked computation (:func:`~.jobs.run_jobs`); ``False`` trains every job alone;
    ``None`` (the default) stacks, on every device: the study's models are small, and on
    two CPU cores stacking them measured 1.3-2x the steps per second of one job at a time
    for the MLPs, 1.0-1.2x for the 1-D ResNets, GRUs and Transformers (README). A rule,
    not a timing taken at run time, so the same command computes the same numbers."""
    from ...train import provenance
    from .report import write_claims_report

    start = time.perf_counter()
    protocol = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    if size not in protocol.sizes:
        raise UsageError(
            f"size={size!r} is not a size of {protocol.source}; accepted: {', '.join(protocol.sizes)}"
        )
    chosen_size = protocol.sizes[size]
    if seeds is not None:
        if not 1 <= seeds <= 100:
            raise UsageError(f"seeds={seeds} must be between 1 and 100 for the claims study")
        chosen_size = Size(**{**chosen_size.__dict__, "seeds": seeds})
    out = (
        Path(out)
        if out is not None
        else Path("runs") / (f"lab-{protocol.name}" + ("" if size == "default" else f"-{size}"))
    )
    from ...train.loop import resolve_device

    n_workers = workers or os.cpu_count() or 1
    resolve_device(device)
    planned = plan(protocol, chosen_size, device)
    jobs = _unique_jobs(planned)
    stack = True if stack is None else bool(stack)
    with _workers(n_workers) as pool:
        records = train_jobs(jobs, out / "runs", pool, show_progress(progress), stack)
        results = _results(protocol, size, chosen_size, planned, records, jobs)
        results["provenance"].update(provenance(device), workers=n_workers, stack=stack)
        results["seconds"] = time.perf_counter() - start
        results["provenance"]["seconds"] = round(results["seconds"], 1)
        results["report"] = str(write_claims_report(results, out, pool))
    return results


def _results(protocol: Protocol, size: str, chosen: Size, planned, records, jobs) -> dict:
    """The results object (``claims.json``) but its provenance and time."""
    settings = {k: v for k, v in chosen.__dict__.items() if k not in ("name", "experiments")}
    return {
        "name": protocol.name,
        "description": protocol.description,
        "size": size,
        "quick": size == "quick",
        "settings": {**settings, "dataset": protocol.dataset, "experiments": chosen.experiments},
        "methodology": list(METHODOLOGY),
        "provenance": {"protocol": protocol.source},
        "counts": _counts(records),
        "failures": [
            {"run": key, **jobs[key].describe(), "error": r["error"]}
            for key, r in records.items()
            if r.get("status") == "failed"
        ],
        "claims": assemble(protocol, chosen, planned, records),
    }
