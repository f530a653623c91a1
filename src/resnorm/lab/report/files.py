"""The report's files: ``results.json`` and ``lab.json`` (strict JSON), ``results.csv``
(one row per run), and :func:`write_report`, which writes them with the figures and the
HTML page, each atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..._io import atomic_open, json_safe
from .figures import _write_figures
from .groups import _axis, _groups
from .page import _render_page

CSV_COLUMNS = (
    "run_id",
    "variant",
    "family",
    "model",
    "depth",
    "norm",
    "residual",
    "placement",
    "batch_size",
    "seed",
    "dataset",
    "status",
    "final_test_acc",
    "best_test_acc",
    "final_train_loss",
    "parameters",
    "seconds",
    "init_verdict",
    "init_grad_ratio",
)


def _csv_cell(value) -> str:
    value = json_safe(value, coerce=True)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _csv_text(results: list[dict]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for run in results:
        init = run.get("init") if isinstance(run.get("init"), dict) else {}
        row = {
            **{c: run.get(c) for c in CSV_COLUMNS},
            "init_verdict": init.get("verdict"),
            "init_grad_ratio": init.get("grad_ratio"),
        }
        writer.writerow([_csv_cell(row[c]) for c in CSV_COLUMNS])
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path, "wb") as f:
        f.write(text.encode("utf-8"))


def _write_json(path: Path, data, **dumps_options) -> None:
    """``data`` as strict, indented JSON (NaN and infinities as ``null``)."""
    text = json.dumps(json_safe(data, coerce=True), indent=2, allow_nan=False, **dumps_options)
    _write_text(path, text + "\n")


def write_report(results: list[dict], study: dict, out) -> Path:
    """Write ``results.json``, ``results.csv``, ``figures/`` (PNG and SVG) and a
    self-contained ``report.html`` into the folder ``out``, each file atomically; return
    the path of ``report.html``. A figure without data is left out (and any stale copy of
    it removed), with a note in the page saying why."""
    import matplotlib

    matplotlib.use("Agg", force=False)

    axis = _axis(study)
    study = study or {}
    results = list(results or [])
    out = Path(out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)

    _write_json(out / "results.json", results)
    _write_text(out / "results.csv", _csv_text(results))
    groups = _groups(results, axis)
    figures = _write_figures(groups, axis, figdir)
    if study.get("provenance"):
        _write_json(
            out / "lab.json",
            {
                "study": {k: v for k, v in study.items() if k != "provenance"},
                "provenance": study["provenance"],
            },
            default=str,
        )
    path = out / "report.html"
    _write_text(path, _render_page(results, study, axis, groups, figures))
    return path
