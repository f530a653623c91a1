"""The findings: English sentences computed from the numbers only, following the
conventions in the package docstring (what a variant and a point are, the easy and hard
ends of the axis, when a variant degrades or holds)."""

from __future__ import annotations

from .groups import (
    _AXIS_WORD,
    _NOT_FINISHED,
    _acc,
    _at,
    _axis,
    _by_x,
    _config,
    _finite,
    _first_line,
    _groups,
    _has_init,
    _norm_word,
    _ordered,
    _points,
    _signed,
    _sort_key,
    _unit,
    _verdict_summary,
)

SMOKE_NOTE = (
    "This is a smoke run (--quick): a smaller version of the study (fewer samples, depths "
    "or epochs), to "
    "check that everything runs. Its numbers are too small to support any finding; "
    "run the study without --quick for that."
)


def summarize_findings(results: list[dict], study: dict) -> list[str]:
    """Sentences computed from the numbers only: per variant the change in mean test
    accuracy from the easy to the hard end of the axis, which variants degrade and which
    hold, the best variant at the hard end, residual-minus-plain gaps, per norm kind the
    change from the largest to the smallest batch (batch-size studies), the initialization
    verdicts, and how many runs diverged or failed."""
    axis = _axis(study)
    results = list(results or [])
    if not results:
        return ["No runs in these results."]
    if (study or {}).get("quick"):
        return [SMOKE_NOTE, *_status_findings(results)]
    groups = _groups(results, axis)
    findings, changes, hard_end = _variant_changes(groups, axis)
    findings += _trend_findings(changes, axis)
    findings += _best_at_hard_end(hard_end, axis)
    findings += _residual_gaps(groups, axis)
    if axis == "batch_size":
        findings += _norm_batch_changes(results)
    findings += _init_findings(groups, axis)
    findings += _status_findings(results)
    return findings


def _variant_changes(groups: dict, axis: str) -> tuple[list[str], list[tuple], dict]:
    """Per variant, a sentence on its mean accuracy from the easy to the hard end; also
    the (label, change in points, allowance) of each variant measured at both ends, and
    each variant's hard end as label -> (x, :class:`_Point`)."""
    word = _AXIS_WORD[axis]
    findings, changes, hard_end = [], [], {}
    for label, runs in groups.items():
        points = _points(runs, axis)
        if not points:
            continue
        unit = _unit(runs, axis)
        xs = _ordered(points, axis)
        hard_end[label] = (xs[-1], unit, points[xs[-1]])
        if len(xs) == 1:
            p = points[xs[0]]
            findings.append(
                f"{label}: {p.mean * 100:.1f}% at {_at(axis, xs[0], unit)} (the "
                f"only {word} with a finished run)."
            )
            continue
        a, b = points[xs[0]], points[xs[-1]]
        delta = (b.mean - a.mean) * 100
        left_out = "".join(
            f"; {_left_out(points[x].runs)} at {_at(axis, x, unit)}, not averaged"
            for x in (xs[0], xs[-1])
            if _left_out(points[x].runs)
        )
        findings.append(
            f"{label}: {a.mean * 100:.1f}% at {_at(axis, xs[0], unit)} -> "
            f"{b.mean * 100:.1f}% at {_at(axis, xs[-1], unit)} "
            f"({_signed(delta)} points{left_out})."
        )
        changes.append((label, delta, max(1.0, a.spread, b.spread)))
    return findings, changes, hard_end


def _trend_findings(changes: list[tuple], axis: str) -> list[str]:
    """Which variants degrade along the axis and which hold (see the package docstring)."""
    phrase = "with depth" if axis == "depth" else "as the batch shrinks"
    degrade = [c for c in changes if c[1] < -c[2]]
    hold = [c for c in changes if c[1] >= -c[2]]
    findings = []
    if degrade:
        findings.append(
            f"Degrade {phrase} (drop larger than 1 point and the seed spread): "
            + "; ".join(f"{label} ({_signed(d)} points)" for label, d, _ in degrade)
            + "."
        )
    if hold:
        findings.append(
            f"Hold {phrase} (no drop beyond max(1 point, seed spread)): "
            + "; ".join(f"{label} ({_signed(d)} points, allowance {t:.1f})" for label, d, t in hold)
            + "."
        )
    return findings


def _best_at_hard_end(hard_end: dict, axis: str) -> list[str]:
    """At each hard-end x shared by two variants or more (the same x counting the same
    thing), the best one and its lead."""
    by_end: dict = {}
    for label, (x, unit, point) in hard_end.items():
        by_end.setdefault((x, unit), []).append((point.mean, label, len(point.accs)))
    findings = []
    order = _ordered({x for x, _ in by_end}, axis)
    for x, unit in sorted(by_end, key=lambda key: (str(key[1]), order.index(key[0]))):
        ranked = sorted(by_end[x, unit], key=lambda t: -t[0])
        if len(ranked) < 2:
            continue
        (m1, l1, n1), (m2, l2, _) = ranked[0], ranked[1]
        findings.append(
            f"Best at {_at(axis, x, unit)}: {l1} with {m1 * 100:.1f}% ({n1} "
            f"seed{'s' if n1 != 1 else ''}), {(m1 - m2) * 100:.1f} points ahead of "
            f"{l2} ({m2 * 100:.1f}%)."
        )
    return findings


def _left_out(runs: list[dict]) -> str:
    """``"1 of 2 runs diverged"`` for the runs of a point that are not averaged."""
    bad = {s: sum(r.get("status") == s for r in runs) for s in _NOT_FINISHED}
    parts = [f"{n} {s}" for s, n in bad.items() if n]
    return f"{' and '.join(parts)} of {len(runs)} runs" if parts else ""


def _residual_gaps(groups: dict, axis: str) -> list[str]:
    """Residual minus plain for variants that differ only in ``residual``."""
    pairs: dict[tuple, dict[bool, list[str]]] = {}
    for label, runs in groups.items():
        run = runs[0]
        if not isinstance(run.get("residual"), bool):
            continue
        key = tuple(item for item in _config(run, axis) if item[0] not in ("residual", "model"))
        pairs.setdefault(key, {}).setdefault(run["residual"], []).append(label)
    out = []
    for sides in pairs.values():
        if len(sides.get(True, [])) != 1 or len(sides.get(False, [])) != 1:
            continue
        res, plain = sides[True][0], sides[False][0]
        p_res, p_plain = _points(groups[res], axis), _points(groups[plain], axis)
        common = _ordered(set(p_res) & set(p_plain), axis)
        if not common:
            continue
        if len(common) > 4:
            common = [common[0], common[-1]]
        unit = _unit(groups[res] + groups[plain], axis)
        gaps = ", ".join(
            f"{_signed((p_res[x].mean - p_plain[x].mean) * 100)} points at {_at(axis, x, unit)}"
            for x in common
        )
        out.append(f"{res} vs {plain}: residual minus plain {gaps}.")
    return out


def _norm_batch_changes(results: list[dict]) -> list[str]:
    """Per norm kind, the pooled mean accuracy at its largest and smallest batch size."""
    by_norm: dict = {}
    for run in results:
        acc, batch = _acc(run), run.get("batch_size")
        if acc is not None and _finite(batch) is not None:
            by_norm.setdefault(run.get("norm"), {}).setdefault(batch, []).append(acc)
    parts = []
    for norm, by_batch in by_norm.items():
        if len(by_batch) < 2:
            continue
        big, small = max(by_batch), min(by_batch)
        a = sum(by_batch[big]) / len(by_batch[big])
        b = sum(by_batch[small]) / len(by_batch[small])
        parts.append(
            f"{_norm_word(norm)} {a * 100:.1f}% at batch size {big} -> "
            f"{b * 100:.1f}% at batch size {small} ({_signed((b - a) * 100)} points)"
        )
    if not parts:
        return []
    return [
        "By norm kind, from the largest to the smallest batch (mean over variants and "
        "seeds): " + "; ".join(parts) + "."
    ]


def _init_findings(groups: dict, axis: str) -> list[str]:
    by_verdict: dict[str, list[str]] = {}
    changed = []
    for label, runs in groups.items():
        by_depth = _by_x([r for r in runs if _has_init(r)], "depth")
        depths = sorted((d for d in by_depth if d is not None), key=_sort_key)
        if not depths:
            continue
        unit = _unit(runs, "depth")
        verdict, ratio = _verdict_summary(by_depth[depths[-1]])
        by_verdict.setdefault(verdict, []).append(
            f"{label} ({_at('depth', depths[-1], unit)}, grad ratio {ratio})"
        )
        first = _verdict_summary(by_depth[depths[0]])[0]
        if len(depths) > 1 and first != verdict:
            changed.append(
                f"{label} {first} at {_at('depth', depths[0], unit)} -> {verdict} at "
                f"{_at('depth', depths[-1], unit)}"
            )
    out = []
    if by_verdict:
        out.append(
            "At initialization, each variant at its largest depth (first/last layer "
            "gradient ratio): "
            + "; ".join(f"{v}: {', '.join(labels)}" for v, labels in by_verdict.items())
            + "."
        )
    if changed:
        out.append("Initialization verdict changes with depth: " + "; ".join(changed) + ".")
    return out


def _status_findings(results: list[dict]) -> list[str]:
    n = len(results)
    diverged = [r for r in results if r.get("status") == "diverged"]
    failed = [r for r in results if r.get("status") == "failed"]
    finished = sum(r.get("status") == "finished" for r in results)
    if not diverged and not failed:
        return [f"{finished} of {n} runs finished; none diverged or failed."]

    def listing(runs, describe):
        shown = [describe(r) for r in runs[:6]]
        more = f", and {len(runs) - 6} more" if len(runs) > 6 else ""
        return ", ".join(shown) + more

    out = []
    if diverged:
        out.append(
            f"{len(diverged)} of {n} runs diverged: "
            + listing(
                diverged,
                lambda r: (
                    str(r.get("run_id"))
                    + (
                        f" (at step {r['diverged_at_step']})"
                        if r.get("diverged_at_step") is not None
                        else ""
                    )
                ),
            )
            + "."
        )
    if failed:
        out.append(
            f"{len(failed)} of {n} runs failed: "
            + listing(
                failed,
                lambda r: (
                    str(r.get("run_id"))
                    + (f" ({_first_line(r.get('error'))})" if r.get("error") else "")
                ),
            )
            + "."
        )
    return out
