"""The lab's report: what a study's runs show, as files a reader can open anywhere.

:func:`write_report` writes into one folder ``results.json`` (every run, strict JSON),
``results.csv`` (one row per run), ``figures/*.png`` and ``figures/*.svg``, and a
self-contained ``report.html`` (images embedded as base64 PNG, no external resource, every
user-controlled string escaped), each written atomically. :func:`summarize_findings` says
in sentences what the numbers show, and :func:`summary_table` is the terminal's view.

Conventions, in one place:

- A *variant* is a result's ``variant`` label: everything but the swept axis (``study["x"]``,
  ``"depth"`` or ``"batch_size"``) and the seed. Runs sharing a variant and an x value are
  seeds of one point. Should one label cover runs that differ in anything else (the other
  axis, options, data set, ...), the differing fields are appended to the label so that
  different configurations are never averaged together.
- A point's accuracy is the mean ``final_test_acc`` of its *finished* runs; its seed spread
  is their max - min. Diverged and failed runs are never averaged in: they are drawn as
  crosses at their last accuracy (or noted when they have none) and counted.
- Along the axis, the *easy* end is the smallest depth or the largest batch and the *hard*
  end the largest depth or the smallest batch; changes are reported from easy to hard.
  A variant *degrades* when its hard-end mean is below its easy-end mean by more than
  both 1 point and the larger of the two seed spreads; otherwise it *holds*.
"""
from __future__ import annotations

import csv
import io
import json
import math
import numbers
from pathlib import Path

from ..errors import UsageError
from .._io import atomic_open
from ..diagnostics.report import figure_png_base64, save_figure

__all__ = ["summarize_findings", "summary_table", "write_report"]

AXES = ("depth", "batch_size")
_AXIS_WORD = {"depth": "depth", "batch_size": "batch size"}
CSV_COLUMNS = ("run_id", "variant", "family", "model", "depth", "norm", "residual", "placement",
               "batch_size", "seed", "dataset", "status", "final_test_acc", "best_test_acc",
               "final_train_loss", "parameters", "seconds", "init_verdict", "init_grad_ratio")
# What identifies a configuration besides the variant label, the swept axis and the seed.
_CONFIG_FIELDS = ("family", "model", "norm", "residual", "placement", "dataset", "options",
                  "depth", "batch_size")
FIGURES = (("accuracy", "Test accuracy"), ("loss_curves", "Training loss"),
           ("init_grad_norms", "Gradient norm by layer at initialization"),
           ("init_signal", "Signal propagation at initialization"))
_NOT_FINISHED = ("diverged", "failed")


# --- reading the results -------------------------------------------------------------

def _axis(study: dict) -> str:
    axis = (study or {}).get("x") or "depth"
    if axis not in AXES:
        raise UsageError(f"study x={axis!r} is not supported; accepted: {', '.join(AXES)}")
    return axis


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _acc(run: dict) -> float | None:
    """The final test accuracy of a finished run (the only ones averaged)."""
    return _finite(run.get("final_test_acc")) if run.get("status") == "finished" else None


def _last_acc(run: dict) -> float | None:
    """The last test accuracy a run recorded (for diverged and failed runs)."""
    acc = _finite(run.get("final_test_acc"))
    if acc is not None:
        return acc
    for row in reversed(run.get("history") or []):
        acc = _finite(row.get("test_acc"))
        if acc is not None:
            return acc
    return None


def _sort_key(value):
    return (0, value, "") if _finite(value) is not None else (1, 0, str(value))


def _ordered(xs, axis: str) -> list:
    """Easy end first: depth ascending, batch size descending."""
    xs = sorted(set(xs), key=_sort_key)
    return xs[::-1] if axis == "batch_size" else xs


def _fmt_x(value) -> str:
    return "?" if value is None else str(value)


def _signed(points: float) -> str:
    points = round(points, 1)
    return f"{0.0 if points == 0 else points:+.1f}"


def _norm_word(norm) -> str:
    return "no norm" if norm in (None, "none") else f"{norm} norm"


def _config(run: dict, axis: str) -> tuple:
    return tuple((field, json.dumps(run.get(field), sort_keys=True, default=str))
                 for field in _CONFIG_FIELDS if field != axis)


def _groups(results: list[dict], axis: str) -> dict[str, list[dict]]:
    """Runs by variant, in order of first appearance (see the module docstring)."""
    by_label: dict[str, dict[tuple, list[dict]]] = {}
    for run in results:
        label = str(run.get("variant") or _fallback_label(run))
        by_label.setdefault(label, {}).setdefault(_config(run, axis), []).append(run)
    groups: dict[str, list[dict]] = {}
    for label, configs in by_label.items():
        if len(configs) == 1:
            groups[label] = next(iter(configs.values()))
            continue
        differing = [i for i in range(len(_CONFIG_FIELDS) - 1)
                     if len({key[i] for key in configs}) > 1]
        for key, runs in configs.items():
            extra = ", ".join(f"{key[i][0]}={key[i][1]}" for i in differing)
            groups[f"{label} [{extra}]"] = runs
    return groups


def _fallback_label(run: dict) -> str:
    parts = [str(run.get("model") or run.get("family") or "model"),
             "residual" if run.get("residual") else "plain", _norm_word(run.get("norm"))]
    if run.get("placement") == "pre":
        parts.append("pre-norm")
    return ", ".join(parts)


class _Point:
    """The finished runs of one variant at one x value."""

    def __init__(self, runs: list[dict]):
        self.runs = runs
        self.accs = [a for a in map(_acc, runs) if a is not None]

    @property
    def mean(self) -> float:
        return sum(self.accs) / len(self.accs)

    @property
    def spread(self) -> float:
        """max - min over seeds, in points."""
        return (max(self.accs) - min(self.accs)) * 100


def _by_x(runs: list[dict], axis: str) -> dict:
    out: dict = {}
    for run in runs:
        out.setdefault(run.get(axis), []).append(run)
    return out


def _points(runs: list[dict], axis: str) -> dict:
    """x -> :class:`_Point` for the x values where at least one run finished."""
    points = {x: _Point(rs) for x, rs in _by_x(runs, axis).items() if x is not None}
    return {x: p for x, p in points.items() if p.accs}


def _has_init(run: dict) -> bool:
    init = run.get("init")
    return isinstance(init, dict) and bool(init.get("verdict") or init.get("layers")
                                           or init.get("blocks"))


# --- findings ------------------------------------------------------------------------

SMOKE_NOTE = ("This is a smoke run (--quick): a smaller version of the study (fewer samples, depths "
              "or epochs), to "
              "check that everything runs. Its numbers are too small to support any finding; "
              "run the study without --quick for that.")


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
    word = _AXIS_WORD[axis]
    groups = _groups(results, axis)
    findings: list[str] = []

    changes, hard_end = [], {}
    for label, runs in groups.items():
        points = _points(runs, axis)
        if not points:
            continue
        xs = _ordered(points, axis)
        hard_end[label] = (xs[-1], points[xs[-1]])
        if len(xs) == 1:
            p = points[xs[0]]
            findings.append(f"{label}: {p.mean * 100:.1f}% at {word} {xs[0]} (the only "
                            f"{word} with a finished run).")
            continue
        a, b = points[xs[0]], points[xs[-1]]
        delta = (b.mean - a.mean) * 100
        left_out = "".join(f"; {_left_out(points[x].runs)} at {word} {x}, not averaged"
                           for x in (xs[0], xs[-1]) if _left_out(points[x].runs))
        findings.append(f"{label}: {a.mean * 100:.1f}% at {word} {xs[0]} -> "
                        f"{b.mean * 100:.1f}% at {word} {xs[-1]} ({_signed(delta)} points"
                        f"{left_out}).")
        changes.append((label, delta, max(1.0, a.spread, b.spread)))
    phrase = "with depth" if axis == "depth" else "as the batch shrinks"
    degrade = [c for c in changes if c[1] < -c[2]]
    hold = [c for c in changes if c[1] >= -c[2]]
    if degrade:
        findings.append(f"Degrade {phrase} (drop larger than 1 point and the seed spread): "
                        + "; ".join(f"{l} ({_signed(d)} points)" for l, d, _ in degrade) + ".")
    if hold:
        findings.append(f"Hold {phrase} (no drop beyond max(1 point, seed spread)): "
                        + "; ".join(f"{l} ({_signed(d)} points, allowance {t:.1f})"
                                    for l, d, t in hold) + ".")

    by_end: dict = {}
    for label, (x, point) in hard_end.items():
        by_end.setdefault(x, []).append((point.mean, label, len(point.accs)))
    for x in _ordered(by_end, axis):
        ranked = sorted(by_end[x], key=lambda t: -t[0])
        if len(ranked) < 2:
            continue
        (m1, l1, n1), (m2, l2, _) = ranked[0], ranked[1]
        findings.append(f"Best at {word} {x}: {l1} with {m1 * 100:.1f}% ({n1} "
                        f"seed{'s' if n1 != 1 else ''}), {(m1 - m2) * 100:.1f} points ahead of "
                        f"{l2} ({m2 * 100:.1f}%).")

    findings += _residual_gaps(groups, axis)
    if axis == "batch_size":
        findings += _norm_batch_changes(results)
    findings += _init_findings(groups, axis)
    findings += _status_findings(results)
    return findings


def _left_out(runs: list[dict]) -> str:
    """``"1 of 2 runs diverged"`` for the runs of a point that are not averaged."""
    bad = {s: sum(r.get("status") == s for r in runs) for s in _NOT_FINISHED}
    parts = [f"{n} {s}" for s, n in bad.items() if n]
    return f"{' and '.join(parts)} of {len(runs)} runs" if parts else ""


def _residual_gaps(groups: dict, axis: str) -> list[str]:
    """Residual minus plain for variants that differ only in ``residual``."""
    word = _AXIS_WORD[axis]
    pairs: dict[tuple, dict[bool, list[str]]] = {}
    for label, runs in groups.items():
        run = runs[0]
        if not isinstance(run.get("residual"), bool):
            continue
        key = tuple(item for item in _config(run, axis)
                    if item[0] not in ("residual", "model"))
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
        gaps = ", ".join(f"{_signed((p_res[x].mean - p_plain[x].mean) * 100)} points at "
                         f"{word} {x}" for x in common)
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
        parts.append(f"{_norm_word(norm)} {a * 100:.1f}% at batch size {big} -> "
                     f"{b * 100:.1f}% at batch size {small} ({_signed((b - a) * 100)} points)")
    if not parts:
        return []
    return ["By norm kind, from the largest to the smallest batch (mean over variants and "
            "seeds): " + "; ".join(parts) + "."]


def _verdict_summary(runs: list[dict]) -> tuple[str, str]:
    """(verdict, grad ratio) over the seeds of one point: ``"healthy"`` or
    ``"healthy/vanishing"``; one ratio or ``"low to high"``."""
    verdicts = []
    for run in runs:
        v = (run.get("init") or {}).get("verdict")
        if v and v not in verdicts:
            verdicts.append(str(v))
    ratios = [r for r in ((run.get("init") or {}).get("grad_ratio") for run in runs)
              if _finite(r) is not None]
    if not ratios:
        ratio = "n/a"
    elif min(ratios) == max(ratios):
        ratio = f"{ratios[0]:.1e}"
    else:
        ratio = f"{min(ratios):.1e} to {max(ratios):.1e}"
    return "/".join(verdicts) or "n/a", ratio


def _init_findings(groups: dict, axis: str) -> list[str]:
    by_verdict: dict[str, list[str]] = {}
    changed = []
    for label, runs in groups.items():
        by_depth = _by_x([r for r in runs if _has_init(r)], "depth")
        depths = sorted((d for d in by_depth if d is not None), key=_sort_key)
        if not depths:
            continue
        verdict, ratio = _verdict_summary(by_depth[depths[-1]])
        by_verdict.setdefault(verdict, []).append(
            f"{label} (depth {depths[-1]}, grad ratio {ratio})")
        first = _verdict_summary(by_depth[depths[0]])[0]
        if len(depths) > 1 and first != verdict:
            changed.append(f"{label} {first} at depth {depths[0]} -> {verdict} at depth "
                           f"{depths[-1]}")
    out = []
    if by_verdict:
        out.append("At initialization, each variant at its largest depth (first/last layer "
                   "gradient ratio): " + "; ".join(f"{v}: {', '.join(labels)}"
                                                   for v, labels in by_verdict.items()) + ".")
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
        out.append(f"{len(diverged)} of {n} runs diverged: " + listing(
            diverged, lambda r: str(r.get("run_id")) + (
                f" (at step {r['diverged_at_step']})"
                if r.get("diverged_at_step") is not None else "")) + ".")
    if failed:
        out.append(f"{len(failed)} of {n} runs failed: " + listing(
            failed, lambda r: str(r.get("run_id")) + (
                f" ({_first_line(r.get('error'))})" if r.get("error") else "")) + ".")
    return out


def _first_line(text, limit: int = 120) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


# --- terminal table ------------------------------------------------------------------

def summary_table(results: list[dict], study: dict):
    """A rich ``Table``: one row per variant and value of the swept axis, with the mean
    final test accuracy over finished seeds, the seed spread (max - min, points), the
    diverged/failed count and the initialization verdict."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    axis = _axis(study)
    name = str((study or {}).get("name") or "study")
    # Compact, so that it reads on an 80-column terminal: short headers, a light box, the
    # variant on one line; the caption says what the columns are.
    table = Table(title=Text(f"{name}: mean test accuracy over seeds"), box=box.SIMPLE_HEAD,
                  caption="runs: finished/total; acc: final test accuracy, mean over seeds; "
                          "±: max - min over seeds (points); bad: diverged or failed; "
                          "init: verdict at initialization")
    for column, justify in (("variant", "left"), (_AXIS_WORD[axis], "right"),
                            ("runs", "right"), ("acc", "right"), ("±", "right"),
                            ("bad", "right"), ("init", "left")):
        table.add_column(column, justify=justify, no_wrap=True)
    for label, runs in _groups(list(results or []), axis).items():
        by_x = _by_x(runs, axis)
        for x in sorted(by_x, key=_sort_key):
            point = _Point(by_x[x])
            bad = sum(r.get("status") in _NOT_FINISHED for r in by_x[x])
            inits = [r for r in by_x[x] if _has_init(r)]
            table.add_row(
                Text(label), _fmt_x(x),
                f"{sum(r.get('status') == 'finished' for r in by_x[x])}/{len(by_x[x])}",
                f"{point.mean * 100:.1f}%" if point.accs else "-",
                f"±{point.spread:.1f}" if len(point.accs) > 1 else "-",
                str(bad) if bad else "-",
                Text(_verdict_summary(inits)[0] if inits else "-"))
    if not results:
        table.caption = "no runs"
    return table


# --- figures -------------------------------------------------------------------------

_LINESTYLES = ("-", "--", ":", "-.")


def _style(i: int) -> dict:
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return {"color": colors[i % len(colors)], "ls": _LINESTYLES[(i // len(colors)) % 4]}


def _mpl(text) -> str:
    """A label that matplotlib draws as written (no mathtext from ``$``)."""
    return str(text).replace("$", r"\$")


def _axis_ticks(ax, axis: str, xs) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator

    xs = sorted({float(x) for x in xs if _finite(x) is not None})
    if axis == "batch_size" and xs and min(xs) > 0:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
    if xs and len(xs) <= 12:
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])


def _legend(ax, count: int) -> None:
    if count:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _accuracy_figure(groups: dict, axis: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), constrained_layout=True)
    drawn, crosses, unplotted, all_x = 0, 0, 0, []
    for i, (label, runs) in enumerate(groups.items()):
        style = _style(i)
        points = _points(runs, axis)
        xs = sorted((x for x in points if _finite(x) is not None), key=float)
        if xs:
            means = [points[x].mean * 100 for x in xs]
            low = [m - min(points[x].accs) * 100 for m, x in zip(means, xs)]
            high = [max(points[x].accs) * 100 - m for m, x in zip(means, xs)]
            ax.errorbar(xs, means, yerr=[low, high], marker="o", ms=4, capsize=3, lw=1.4,
                        label=_mpl(label), **style)
            drawn += 1
            all_x += xs
        for run in runs:
            if run.get("status") not in _NOT_FINISHED:
                continue
            acc, x = _last_acc(run), _finite(run.get(axis))
            if acc is None or x is None:
                unplotted += 1
                continue
            ax.scatter([x], [acc * 100], marker="X", s=70, color=style["color"],
                       edgecolors="black", linewidths=0.6, zorder=4)
            crosses += 1
            all_x.append(x)
    if not drawn and not crosses:
        plt.close(fig)
        return None, "No run recorded a test accuracy (no training in these results)."
    if crosses:
        ax.plot([], [], ls="none", marker="X", color="gray", markeredgecolor="black",
                label="diverged/failed run (last accuracy)")
    _axis_ticks(ax, axis, all_x)
    ax.set(xlabel=_AXIS_WORD[axis] + (" (log2 scale)" if axis == "batch_size" else ""),
           ylabel="final test accuracy (%)",
           title="Test accuracy: mean over seeds, bars from the lowest to the highest seed")
    ax.grid(alpha=0.3)
    if drawn + crosses:
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda k: labels[k].startswith("diverged/"))
        ax.legend([handles[k] for k in order], [labels[k] for k in order], fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    note = None
    if unplotted:
        note = (f"{unplotted} diverged or failed run{'s' if unplotted != 1 else ''} recorded "
                f"no test accuracy and {'are' if unplotted != 1 else 'is'} not plotted "
                f"(see the runs table).")
    return fig, note


def _mean_curve(runs: list[dict], key: str) -> list[tuple]:
    """(epoch, mean of the finite positive values of ``key``) over the runs."""
    by_epoch: dict = {}
    for run in runs:
        for i, row in enumerate(run.get("history") or [], 1):
            value = _finite(row.get(key))
            epoch = _finite(row.get("epoch"))
            if value is not None and value > 0:
                by_epoch.setdefault(epoch if epoch is not None else i, []).append(value)
    return [(e, sum(v) / len(v)) for e, v in sorted(by_epoch.items())]


def _loss_figure(groups: dict, axis: str):
    import matplotlib.pyplot as plt

    panels: dict = {}
    for i, (label, runs) in enumerate(groups.items()):
        for x, rs in _by_x(runs, axis).items():
            curve = _mean_curve(rs, "train_loss")
            if curve:
                panels.setdefault(x, []).append((i, label, curve))
    if not panels:
        return None, "No training history in these results (the study did no training)."
    keys = sorted(panels, key=_sort_key)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 2.8, 3.3 * rows),
                             constrained_layout=True, squeeze=False)
    handles = {}
    for ax, x in zip(axes.flat, keys):
        for i, label, curve in panels[x]:
            (line,) = ax.plot(*zip(*curve), marker="." if len(curve) < 30 else None, lw=1.3,
                              label=_mpl(label), **_style(i))
            handles.setdefault(i, line)
        ax.set_yscale("log")
        ax.set(title=f"{_AXIS_WORD[axis]} {_fmt_x(x)}", xlabel="epoch",
               ylabel="train loss (mean over seeds)")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    ordered = [handles[i] for i in sorted(handles)]
    fig.legend(ordered, [h.get_label() for h in ordered], loc="outside right upper",
               fontsize=7)
    return fig, None


def _init_picks(groups: dict, axis: str) -> dict:
    """Per variant, the run whose initialization is drawn: its largest depth, then the
    lowest seed, then the largest batch."""
    picks = {}
    for label, runs in groups.items():
        runs = [r for r in runs if _has_init(r)]
        if runs:
            picks[label] = max(runs, key=lambda r: (
                _finite(r.get("depth")) or -1, -(_finite(r.get("seed")) or 0),
                _finite(r.get("batch_size")) or -1))
    return picks


def _depth_note(picks: dict) -> tuple[str, bool]:
    depths = {p.get("depth") for p in picks.values()}
    if len(depths) == 1:
        return f"depth {_fmt_x(depths.pop())}", False
    return "each variant at its largest depth", True


def _init_label(label: str, run: dict, per_variant_depth: bool) -> str:
    suffix = f" (depth {_fmt_x(run.get('depth'))})" if per_variant_depth else ""
    return _mpl(label + suffix)


def _is_norm_kind(kind: str) -> bool:
    return "Norm" in kind or kind == "DyT"


def _grad_figure(groups: dict, axis: str):
    import matplotlib.pyplot as plt

    picks = _init_picks(groups, axis)
    lines = []
    order = list(groups)
    for label, run in picks.items():
        # Weight layers only (linear, conv, attention): normalization layers' scales sit
        # between them at another magnitude and would zigzag every line.
        weights = [layer for layer in run["init"].get("layers") or []
                   if not _is_norm_kind(layer.get("kind", ""))]
        points = [(i, max(v, 1e-45)) for i, layer in enumerate(weights, 1)
                  if (v := _finite(layer.get("grad_norm"))) is not None and v >= 0]
        if points:
            lines.append((order.index(label), label, run, points))
    if not lines:
        return None, "No per-layer gradient norms at initialization in these results."
    where, per_variant = _depth_note({l: picks[l] for _, l, _, _ in lines})
    fig, ax = plt.subplots(figsize=(10, 4.8), constrained_layout=True)
    for i, label, run, points in lines:
        ax.plot(*zip(*points), marker="." if len(points) < 60 else None, lw=1.2,
                label=_init_label(label, run, per_variant), **_style(i))
    ax.set_yscale("log")
    ax.set(title=f"Weight-gradient norm by layer at initialization ({where})",
           xlabel="weight layer (forward order; normalization layers left out)",
           ylabel="||grad||")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(lines))
    return fig, None


def _signal_figure(groups: dict, axis: str):
    import matplotlib.pyplot as plt

    picks = {l: r for l, r in _init_picks(groups, axis).items() if r["init"].get("blocks")}
    if not picks:
        return None, "No block statistics at initialization in these results."
    order = list(groups)
    where, per_variant = _depth_note(picks)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
    fig.suptitle(f"Signal propagation at initialization ({where})")
    handles = {}
    for ax, (key, title) in zip(axes, (("sq_mean", "average channel squared mean"),
                                       ("var", "average channel variance"),
                                       ("branch_var", "residual-branch variance"))):
        values = []
        for label, run in picks.items():
            points = [(d, v) for d, block in enumerate(run["init"]["blocks"], 1)
                      if (v := _finite(block.get(key))) is not None and v > 0]
            if points:
                i = order.index(label)
                (line,) = ax.plot(*zip(*points), marker="." if len(points) < 60 else None,
                                  lw=1.2, label=_init_label(label, run, per_variant), **_style(i))
                handles.setdefault(i, line)
                values += [v for _, v in points]
        if values:
            if max(values) > 10 * min(values):
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="block depth")
        ax.grid(alpha=0.3, which="both")
    ordered = [handles[i] for i in sorted(handles)]
    if ordered:
        fig.legend(ordered, [h.get_label() for h in ordered], loc="outside right upper",
                   fontsize=7)
    return fig, None


_FIGURE_MAKERS = {"accuracy": _accuracy_figure, "loss_curves": _loss_figure,
                  "init_grad_norms": _grad_figure, "init_signal": _signal_figure}


# --- tables --------------------------------------------------------------------------

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
                css = verdict if verdict in ("healthy", "vanishing", "exploding",
                                             "non-finite") else "mixed"
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
        rows.append({"run_id": str(run.get("run_id", "")), "variant": str(run.get("variant", "")),
                     "x": _fmt_x(run.get(axis)), "seed": _fmt_x(run.get("seed")),
                     "status": str(run.get("status", "")),
                     "acc": f"{acc * 100:.2f}" if acc is not None else "",
                     "verdict": str(init.get("verdict") or ""), "note": note})
    return rows


# --- files ---------------------------------------------------------------------------

def _strict(value):
    """``value`` as strict JSON data: NaN and infinities become ``None``."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "item"):  # numpy and torch scalars
        try:
            return _strict(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _csv_cell(value) -> str:
    value = _strict(value)
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
        row = {**{c: run.get(c) for c in CSV_COLUMNS},
               "init_verdict": init.get("verdict"), "init_grad_ratio": init.get("grad_ratio")}
        writer.writerow([_csv_cell(row[c]) for c in CSV_COLUMNS])
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path, "wb") as f:
        f.write(text.encode("utf-8"))


_PAGE = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>resnorm lab: {{ name }}{% if quick %} (smoke run){% endif %}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.description { white-space: pre-line; color: #444; } .summary { font-weight: 600; }
.note { color: #666; font-style: italic; } figure { margin: 1em 0; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.healthy { color: #1a7f37; } .vanishing { color: #9a6700; } .mixed { color: #555; }
.exploding, .non-finite { color: #cf222e; }
.status-diverged, .status-failed { color: #cf222e; font-weight: 600; }
.ratio { color: #666; font-size: 0.9em; }
</style></head><body>
<h1>{{ name }}{% if quick %}: smoke run (--quick), no conclusions{% endif %}</h1>
{% if description %}<p class="description">{{ description }}</p>{% endif %}
<p class="summary">{{ summary }}</p>
<h2>What this run shows</h2>
<ul class="findings">{% for f in findings %}<li>{{ f }}</li>
{% endfor %}</ul>
<h2>Figures</h2>
{% for fig in figures %}<figure id="figure-{{ fig.name }}">
<h3>{{ fig.title }}</h3>
{% if fig.png %}<img alt="{{ fig.title }}" src="data:image/png;base64,{{ fig.png }}">
{% if fig.note %}<figcaption class="note">{{ fig.note }}</figcaption>{% endif %}
{% else %}<p class="note">Not drawn: {{ fig.note }}</p>{% endif %}
</figure>
{% endfor %}
<h2>Verdicts at initialization</h2>
{% if verdicts %}<table id="verdicts">
<tr><th>variant</th>{% for d in verdicts.columns %}<th>depth {{ d }}</th>{% endfor %}</tr>
{% for row in verdicts.rows %}<tr><td>{{ row.variant }}</td>{% for c in row.cells %}<td>{% if c %}<span class="{{ c.css }}">{{ c.verdict }}</span><br><span class="ratio">grad ratio {{ c.ratio }}</span>{% else %}-{% endif %}</td>{% endfor %}</tr>
{% endfor %}</table>
<p class="note">Grad ratio: first/last layer weight-gradient norm at initialization (a range when seeds differ).</p>
{% else %}<p class="note">No initialization diagnostics in these results.</p>{% endif %}
<h2>Runs</h2>
{% if runs %}<table id="results">
<tr><th>run_id</th><th>variant</th><th>{{ axis_word }}</th><th>seed</th><th>status</th><th>final test acc (%)</th><th>init verdict</th><th>note</th></tr>
{% for r in runs %}<tr><td>{{ r.run_id }}</td><td>{{ r.variant }}</td><td class="num">{{ r.x }}</td><td class="num">{{ r.seed }}</td><td class="status-{{ r.status }}">{{ r.status }}</td><td class="num">{{ r.acc }}</td><td>{{ r.verdict }}</td><td>{{ r.note }}</td></tr>
{% endfor %}</table>
{% else %}<p class="note">No runs.</p>{% endif %}
<h2>How this report was made</h2>
{% if provenance %}<table id="provenance">
{% for key, value in provenance %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>{% else %}<p class="note">Not recorded.</p>{% endif %}
<p class="note">Files beside this page: lab.json (the study's full configuration and this
provenance), results.json, results.csv, figures/ (PNG and SVG); each run's folder under
runs/ holds its own config.json.</p>
</body></html>
"""


def _summary_line(results: list[dict]) -> str:
    count = {s: sum(r.get("status") == s for r in results)
             for s in ("finished", "diverged", "failed")}
    other = len(results) - sum(count.values())
    seconds = sum(s for s in (_finite(r.get("seconds")) for r in results) if s is not None)
    reused = sum(bool(r.get("reused")) for r in results)
    parts = [f"{len(results)} runs: {count['finished']} finished, {count['diverged']} diverged, "
             f"{count['failed']} failed ({reused} reused from an earlier invocation, "
             f"{len(results) - reused} run now)"]
    if other:
        parts.append(f"{other} with another status")
    return ", ".join(parts) + f"; {seconds:.1f} s of run time in total."


def write_report(results: list[dict], study: dict, out) -> Path:
    """Write ``results.json``, ``results.csv``, ``figures/`` (PNG and SVG) and a
    self-contained ``report.html`` into the folder ``out``, each file atomically; return
    the path of ``report.html``. A figure without data is left out (and any stale copy of
    it removed), with a note in the page saying why."""
    import jinja2
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    axis = _axis(study)
    study = study or {}
    results = list(results or [])
    out = Path(out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)

    _write_text(out / "results.json",
                json.dumps(_strict(results), indent=2, allow_nan=False) + "\n")
    _write_text(out / "results.csv", _csv_text(results))

    groups = _groups(results, axis)
    figures = []
    for name, title in FIGURES:
        fig, note = _FIGURE_MAKERS[name](groups, axis)
        png = None
        if fig is None:
            for suffix in (".png", ".svg"):
                (figdir / f"{name}{suffix}").unlink(missing_ok=True)
        else:
            try:
                save_figure(fig, figdir / f"{name}.png")
                save_figure(fig, figdir / f"{name}.svg")
                png = figure_png_base64(fig)
            finally:
                plt.close(fig)
        figures.append({"name": name, "title": title, "png": png, "note": note})

    made = study.get("provenance") or {}
    provenance = [(key, value if isinstance(value, str) else json.dumps(value, default=str))
                  for key, value in made.items()]
    if made:
        provenance.append(("configuration", json.dumps(
            {k: v for k, v in study.items() if k != "provenance"}, default=str)))
        _write_text(out / "lab.json", json.dumps(
            _strict({"study": {k: v for k, v in study.items() if k != "provenance"},
                     "provenance": made}), indent=2, allow_nan=False, default=str) + "\n")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.from_string(_PAGE).render(
        quick=bool(study.get("quick")), provenance=provenance,
        name=str(study.get("name") or "study"), description=str(study.get("description") or ""),
        summary=_summary_line(results), findings=summarize_findings(results, study),
        figures=figures, verdicts=_verdict_table(groups), runs=_run_rows(results, axis),
        axis_word=_AXIS_WORD[axis])
    path = out / "report.html"
    _write_text(path, page)
    return path
