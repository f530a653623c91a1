"""``analyze(records)``: the training-time verdict from a :class:`~.monitor.Monitor`'s
records (its ``monitor.jsonl``, or ``monitor.records``), during or after a run.

The records become a :class:`~.training.TrainingTrace` (the loss per record; per layer the
update ratio, divided by the steps between records so that it reads per step) and are
judged by the same training signals as ``diagnose(steps=K)``: the loss rising or turning
non-finite, the loss not moving while the weights barely do, first layers that do not
train, updates far from ~1e-3 of the weights per step; and units dying during training.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path

from ..errors import MissingFileError, UsageError, UsageTypeError
from .diagnose import Diagnosis
from .training import TrainingTrace
from .verdict import Evidence, LayerGrad, Signal, Thresholds, Verdict, judge

# What a run's records cannot tell about the model: remedies then assume nothing of it.
_RUN_STRUCTURE = {
    "has_skip": None,
    "has_norm": True,
    "post_norm": False,
    "norm_kinds": [],
    "closed_gates": 0,
    "zero_init": False,
}

# A monitor.jsonl line is small (a number per layer); a longer one is not a record.
MAX_LINE_BYTES = 16 * 1024 * 1024


def read_records(path) -> list[dict]:
    """The records of a ``monitor.jsonl`` (or of the run folder holding one), one JSON
    object per line; a line that is not one is an error naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / "monitor.jsonl"
    if not path.is_file():
        raise MissingFileError(f"{path}: no Monitor records here (a run's monitor.jsonl)")
    records = []
    with path.open("rb") as f:
        for number, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(line) > MAX_LINE_BYTES:
                raise UsageError(f"{path}:{number}: a line longer than {MAX_LINE_BYTES} bytes")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise UsageError(f"{path}:{number}: not a JSON record ({exc})") from None
            if not isinstance(record, dict) or "step" not in record:
                raise UsageError(f"{path}:{number}: not a Monitor record (no 'step')")
            records.append(record)
    return records


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def trace_from_records(records: list[dict]) -> TrainingTrace:
    """The loss and per-step update ratios of the records, as a :class:`TrainingTrace`."""
    names: list[str] = []
    for record in records:
        for name in record.get("grad_norm") or {}:
            if name not in names:
                names.append(name)
    trace = TrainingTrace(layer_names=names, updates=[[] for _ in names])
    previous = None
    for record in records:
        loss = _number(record.get("loss"))
        if loss is not None or record.get("nonfinite"):  # a record without a loss: unknown
            trace.losses.append(loss if loss is not None else float("nan"))
        step = _number(record.get("step")) or 0.0
        gap = max(1.0, step - previous) if previous is not None else 1.0
        previous = step
        for i, name in enumerate(names):
            ratio = _number((record.get("update_ratio") or {}).get(name))
            if ratio is not None:
                trace.updates[i].append(ratio / gap)
    per_layer = [statistics.median(u) for u in trace.updates if u]
    if trace.updates and trace.updates[0] and trace.updates[-1]:
        trace.first_update = statistics.median(trace.updates[0])
        trace.last_update = statistics.median(trace.updates[-1])
    trace.median_update = statistics.median(per_layer) if per_layer else None
    return trace


def _dying_units(records: list[dict], t: Thresholds) -> list[Signal]:
    counted = [r["dead_fraction"] for r in records if isinstance(r.get("dead_fraction"), dict)]
    if len(counted) < 2:
        return []
    first = max((_number(v) or 0.0 for v in counted[0].values()), default=0.0)
    last_values = {k: _number(v) or 0.0 for k, v in counted[-1].items()}
    worst = max(last_values, key=last_values.get, default=None)
    last = last_values.get(worst, 0.0)
    fired = last >= t.dead_fraction and last >= first + 0.2
    return [
        Signal(
            "dying_units",
            last,
            f"< {t.dead_fraction:.0%} dead, or no rise",
            fired,
            Verdict.VANISHING if fired else None,
            1.0 if fired else 0.0,
            f"Dead ReLU units rise from {first:.0%} to {last:.0%} during training (worst: {worst}).",
        )
    ]


def analyze(records, thresholds: Thresholds | None = None, *, name: str = "run") -> Diagnosis:
    """Judge a run from its Monitor records (a list of dicts, a ``monitor.jsonl`` path or
    its run folder). The :class:`~.diagnose.Diagnosis` it returns has the verdict, the
    signals, findings and remedies, ``training`` (the trace: losses and per-layer update
    ratios per record) and, as ``layers``, the last record's gradient norms."""
    if isinstance(records, (str, Path)):
        records = read_records(records)
    if not isinstance(records, Iterable) or isinstance(records, dict):
        raise UsageTypeError(
            f"records must be a list of Monitor records or a path, got {type(records).__name__}"
        )
    records = list(records)
    if len(records) < 2:
        raise UsageError(f"analyze needs 2 Monitor records or more, got {len(records)}")
    thresholds = thresholds or Thresholds()
    trace = trace_from_records(records)
    last = records[-1].get("grad_norm") or {}
    layers = [
        LayerGrad(n, "", _number(last.get(n)) or 0.0, float("nan")) for n in trace.layer_names
    ]
    structure = dict(_RUN_STRUCTURE)
    # Judged from the training trace only: the first finite loss stands for the start.
    start = next((v for v in trace.losses if math.isfinite(v)), float("nan"))
    if not trace.losses:  # no record has a loss: nothing to judge it by, not a NaN
        start = 0.0
    judgement = judge([], [], {}, start, thresholds, structure, Evidence(training=trace))
    signals = [s for s in judgement.signals] + _dying_units(records, thresholds)
    verdict, confidence, findings, remedies = _with_dying_units(judgement, signals)
    return Diagnosis(
        verdict,
        start,
        float("nan"),
        None,
        layers,
        [],
        {},
        findings,
        remedies,
        thresholds,
        name,
        structure,
        signals,
        confidence,
        trace,
    )


def _with_dying_units(judgement, signals: list[Signal]):
    """The verdict, confidence, findings and remedies, with units dying during training
    turning a healthy verdict into vanishing (dead ReLUs pass no gradient back)."""
    verdict, confidence = judgement.verdict, judgement.confidence
    findings, remedies = list(judgement.findings), judgement.remedies
    dying = [s for s in signals if s.name == "dying_units" and s.fired]
    if dying:
        findings.append(dying[0].text)
        if verdict is Verdict.HEALTHY:
            verdict, confidence = Verdict.VANISHING, "medium"
        if not remedies:
            remedies = [
                "Many ReLU units die during training: lower the learning rate, use a leaky "
                "or smooth activation (activation='gelu'), or normalize before the ReLU."
            ]
    return verdict, confidence, findings, remedies
