"""What a lab run leaves when it ends: its :class:`RunSummary` (``summary.json``), filled
from its diagnosis at initialization and its training, and read back to reuse it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._io import json_safe
from .study import RunSpec, Study


@dataclass
class RunSummary:
    """What one lab run leaves in ``summary.json`` and what the report reads: the run's
    grid point, how it ended (``status``: finished, diverged or failed, with ``error``),
    its numbers, its diagnosis at initialization, its configuration's hash (what reuse
    compares) and how many runs it trained with, stacked (``stacked_with``; 1: alone). Runs record it through :meth:`to_dict` (strict JSON)."""

    run_id: str
    variant: str
    family: str
    model: str
    depth: int
    norm: str
    residual: bool
    placement: str | None
    batch_size: int
    seed: int
    options: dict
    label: str
    dataset: str
    status: str = "failed"
    error: str | None = None
    diverged_at_step: int | None = None
    diverged_in: str | None = None
    final_test_acc: float | None = None
    best_test_acc: float | None = None
    final_train_loss: float | None = None
    parameters: int | None = None
    seconds: float | None = None
    history: list = field(default_factory=list)
    init: dict | None = None
    config_hash: str | None = None
    config: dict | None = None
    stacked_with: int = 1

    @classmethod
    def of(cls, spec: RunSpec, study: Study, **fields) -> RunSummary:
        grid = {**asdict(spec), "options": dict(spec.options)}
        return cls(
            run_id=spec.run_id,
            variant=spec.variant,
            family=spec.model,
            dataset=study.dataset,
            **grid,
            **fields,
        )

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def _compact_init(diagnosis) -> dict:
    """What a run's summary keeps of its diagnosis at initialization (non-finite numbers
    become null when the summary is written)."""
    return {
        "verdict": diagnosis.verdict.value,
        "grad_ratio": diagnosis.grad_ratio,
        "start_layer": diagnosis.start_layer,
        "layers": [
            {"name": layer.name, "kind": layer.kind, "grad_norm": layer.grad_norm}
            for layer in diagnosis.layers
        ],
        "blocks": [
            {"name": b.name, "sq_mean": b.sq_mean, "var": b.var, "branch_var": b.branch_var}
            for b in diagnosis.blocks
        ],
    }


def _record_training(summary: RunSummary, result) -> None:
    """How the training of a run ended (a :class:`~resnorm.train.FitResult`), in its
    summary: status, divergence, history and its final and best numbers."""
    history = result.history
    finite_acc = [h["test_acc"] for h in history if math.isfinite(h["test_acc"])]
    summary.status = "diverged" if result.diverged else "finished"
    summary.diverged_at_step = result.diverged_at_step
    summary.diverged_in = result.diverged_in
    summary.history = history
    summary.stacked_with = getattr(result, "stacked_with", 1)
    if history:
        summary.final_test_acc = history[-1]["test_acc"]
        summary.best_test_acc = max(finite_acc) if finite_acc else None
        summary.final_train_loss = history[-1]["train_loss"]


def load_summary(run_dir: Path, config_hash: str | None = None) -> dict | None:
    """The summary of a run that ended (finished or diverged) with the configuration
    whose hash is ``config_hash`` (any, when ``None``), else ``None``. A failed run, or
    one of another configuration (the study was edited), is run again."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") not in ("finished", "diverged"):
        return None
    if config_hash is not None and summary.get("config_hash") != config_hash:
        return None
    return summary
