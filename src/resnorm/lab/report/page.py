"""The self-contained HTML page: the data its template (``report.html.j2``, autoescaped,
every variable required) is rendered with."""

from __future__ import annotations

import json
from importlib import resources

from .findings import summarize_findings
from .groups import (
    _AXIS_WORD,
    _at,
    _by_x,
    _finite,
    _first_line,
    _fmt_x,
    _has_init,
    _sort_key,
    _unit,
    _verdict_summary,
)

TEMPLATE = "report.html.j2"


def _render_page(
    results: list[dict], study: dict, axis: str, groups: dict, figures: list[dict]
) -> str:
    """The text of ``report.html``."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    return env.from_string(template).render(
        quick=bool(study.get("quick")),
        provenance=_provenance_rows(study),
        name=str(study.get("name") or "study"),
        description=str(study.get("description") or ""),
        summary=_summary_line(results),
        findings=summarize_findings(results, study),
        figures=figures,
        verdicts=_verdict_table(groups),
        runs=_run_rows(results, axis),
        axis_word=_AXIS_WORD[axis],
    )


def _provenance_rows(study: dict) -> list[tuple[str, str]]:
    """(key, text) rows of "How this report was made": the study's provenance, then its
    configuration; none when no provenance was recorded."""
    made = study.get("provenance") or {}
    provenance = [
        (key, value if isinstance(value, str) else json.dumps(value, default=str))
        for key, value in made.items()
    ]
    if made:
        provenance.append(
            (
                "configuration",
                json.dumps({k: v for k, v in study.items() if k != "provenance"}, default=str),
            )
        )
    return provenance


def _verdict_table(groups: dict) -> dict | None:
    """Variant x depth -> initialization verdict(s) and gradient ratio over seeds."""
    depths, rows = set(), []
    for label, runs in groups.items():
        by_depth = _by_x([r for r in runs if _has_init(r)], "depth")
        if by_depth:
            depths |= set(by_depth)
            rows.append((label, by_depth))
    if not rows:
        return None
    columns = sorted(depths, key=_sort_key)
    body = []
    for label, by_depth in rows:
        cells = []
        for depth in columns:
            if depth in by_depth:
                verdict, ratio = _verdict_summary(by_depth[depth])
                css = (
                    verdict
                    if verdict in ("healthy", "vanishing", "exploding", "non-finite")
                    else "mixed"
                )
                cells.append({"verdict": verdict, "ratio": ratio, "css": css})
            else:
                cells.append(None)
        body.append({"variant": label, "cells": cells})
    return {"columns": [_fmt_x(d) for d in columns], "rows": body}


def _run_rows(results: list[dict], axis: str) -> list[dict]:
    rows = []
    for run in results:
        acc = _finite(run.get("final_test_acc"))
        note = ""
        if run.get("status") == "diverged" and run.get("diverged_at_step") is not None:
            note = f"diverged at step {run['diverged_at_step']}"
        if run.get("error"):
            note = _first_line(run["error"], 200)
        init = run.get("init") if isinstance(run.get("init"), dict) else {}
        rows.append(
            {
                "run_id": str(run.get("run_id", "")),
                "variant": str(run.get("variant", "")),
                "x": _x_cell(run, axis),
                "seed": _fmt_x(run.get("seed")),
                "status": str(run.get("status", "")),
                "acc": f"{acc * 100:.2f}" if acc is not None else "",
                "verdict": str(init.get("verdict") or ""),
                "note": note,
            }
        )
    return rows


def _x_cell(run: dict, axis: str) -> str:
    """The run's x value, with its unit on the depth axis (``"24 blocks"``)."""
    unit = _unit([run], axis)
    return _at(axis, run.get(axis), unit) if unit else _fmt_x(run.get(axis))


def _summary_line(results: list[dict]) -> str:
    count = {
        s: sum(r.get("status") == s for r in results) for s in ("finished", "diverged", "failed")
    }
    other = len(results) - sum(count.values())
    seconds = sum(s for s in (_finite(r.get("seconds")) for r in results) if s is not None)
    reused = sum(bool(r.get("reused")) for r in results)
    parts = [
        f"{len(results)} runs: {count['finished']} finished, {count['diverged']} diverged, "
        f"{count['failed']} failed ({reused} reused from an earlier invocation, "
        f"{len(results) - reused} run now)"
    ]
    if other:
        parts.append(f"{other} with another status")
    return ", ".join(parts) + f"; {seconds:.1f} s of run time in total."
