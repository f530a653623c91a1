"""The claims study's report: :func:`write_claims_report` writes ``claims.json`` (strict
JSON), ``claims.csv`` (one row per criterion), ``figures/<name>.png`` and ``.svg`` (one per
FIGURE of the results) and a self-contained ``report.html`` (the claims table first, PNG
figures embedded as base64, every string escaped), each file atomically; and
:func:`claims_table` gives the rows of the terminal table.

The input is the results object of ``resnorm lab claims`` (claims, criteria and figures as
its schema describes them); a missing field or a null value is shown as missing, never an
error. The file helpers, figure saving and provenance rows are the lab report's."""

from __future__ import annotations

import base64
import csv
import io
import re
from concurrent.futures import BrokenExecutor
from pathlib import Path

from ...diagnostics.report import save_figure
from ..report.figures import _mpl, _style
from ..report.files import _csv_cell, _write_json, _write_text
from ..report.groups import _finite
from ..report.page import _provenance_rows

TEMPLATE = "claims.html.j2"
VERDICTS = ("supported", "not supported", "inconclusive", "not judged")
CSV_COLUMNS = tuple(
    "claim_id kind title verdict criterion_what effect holds_if unit n mean low high "
    "criterion_verdict".split()
)
FIGSIZE = (6.4, 3.8)  # saved at save_figure's 110 dpi


def write_claims_report(results: dict, out, pool=None) -> Path:
    """Write ``claims.json``, ``claims.csv``, ``figures/`` (PNG and SVG) and a
    self-contained ``report.html`` into the folder ``out``, each file atomically; return
    the path of ``report.html``. ``pool``: an executor (the lab's worker processes) that
    draws the figures in parallel, or ``None`` to draw them here (the same files)."""
    results = results if isinstance(results, dict) else {}
    out = Path(out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    _write_json(out / "claims.json", results)
    _write_text(out / "claims.csv", _csv_text(results))
    figures = _write_figures(_claims(results), figdir, pool)
    path = out / "report.html"
    _write_text(path, _render_page(results, figures))
    return path


def claims_table(results: dict) -> list[dict]:
    """Rows for the terminal table, claims then follow-ups: ``id``, ``title``,
    ``verdict`` and ``effect`` (the claim's headline sentence)."""
    return [
        {
            "id": _text(claim.get("id")),
            "title": _text(claim.get("title")),
            "verdict": _text(claim.get("verdict")) or "not judged",
            "effect": _text(claim.get("headline")),
        }
        for claim in _claims(results)
    ]


def _list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value) -> str:
    return "" if value is None else str(value)


def _is_follow_up(claim: dict) -> bool:
    return claim.get("kind") == "follow-up"


def _claims(results: dict) -> list[dict]:
    """The claims, in their order, then the follow-ups."""
    claims = [c for c in _list(_dict(results).get("claims")) if isinstance(c, dict)]
    return [c for c in claims if not _is_follow_up(c)] + [c for c in claims if _is_follow_up(c)]


def _num(value) -> str:
    """A number with three significant digits (``"-"`` when missing or not finite)."""
    value = _finite(value)
    if value is None:
        return "-"
    if value == 0 or 0.01 <= abs(value) < 100:
        return f"{value:.3g}"
    return f"{value:.0f}" if abs(value) < 1e6 else f"{value:.2e}"


def _lr(value) -> str:  # as written ("0.001"), "none" when missing
    value = _finite(value)
    return "none" if value is None else f"{value:g}"


def _css(verdict) -> str:
    verdict = _text(verdict)
    return verdict.replace(" ", "-") if verdict in VERDICTS else "not-judged"


def _duration(seconds) -> str:
    seconds = _finite(seconds)
    if seconds is None:
        return "not recorded"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min {int(seconds % 60):02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _csv_text(results: dict) -> str:
    """One row per criterion (a claim without criteria: one row, the criterion cells
    empty)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for claim in _claims(results):
        head = [claim.get(k) for k in ("id", "kind", "title", "verdict")]
        criteria = [c for c in _list(claim.get("criteria")) if isinstance(c, dict)] or [{}]
        for c in criteria:
            keys = ("what", "effect", "holds_if", "unit", "n", "mean", "low", "high", "verdict")
            writer.writerow([_csv_cell(v) for v in head + [c.get(k) for k in keys]])
    return buffer.getvalue()


def _points(series: dict, log_x: bool, log_y: bool) -> list[tuple]:
    """(x, y, low, high) where x and y are finite (and positive on a log axis); low and
    high are ``None`` unless both are finite."""
    xs, ys = _list(series.get("x")), _list(series.get("y"))
    lows, highs = _list(series.get("low")), _list(series.get("high"))
    points = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        x, y = _finite(x), _finite(y)
        if x is None or y is None or (log_x and x <= 0) or (log_y and y <= 0):
            continue
        low = _finite(lows[i]) if i < len(lows) else None
        high = _finite(highs[i]) if i < len(highs) else None
        ok = low is not None and high is not None and not (log_y and min(low, high) <= 0)
        points.append((x, y, low if ok else None, high if ok else None))
    return points


def _draw_lines(ax, figure: dict) -> int:
    """One line per series with markers and a band over its interval; returns the number
    of series drawn."""
    log_x, log_y = bool(figure.get("x_log")), bool(figure.get("y_log"))
    drawn = 0
    for i, series in enumerate(_list(figure.get("series"))):
        points = sorted(_points(_dict(series), log_x, log_y), key=lambda p: p[0])
        if not points:
            continue
        style = _style(i)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", ms=4, lw=1.4, label=_mpl(series.get("label", "")), **style)
        band = [p for p in points if p[2] is not None]
        if band:
            x_band, lows, highs = zip(*[(p[0], p[2], p[3]) for p in band])
            ax.fill_between(x_band, lows, highs, color=style["color"], alpha=0.18, lw=0)
        drawn += 1
    if drawn:
        ax.set_yscale("log" if log_y else "linear")
        if log_x:
            _log_x_ticks(ax, {x for line in ax.get_lines() for x in line.get_xdata()})
    return drawn


def _log_x_ticks(ax, xs: set) -> None:
    """A log x axis labelled at the x values drawn (``2, 8, 32``), when they are few."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    if len(xs) <= 12:
        ax.set_xticks(sorted(xs), [f"{x:g}" for x in sorted(xs)])
        ax.xaxis.set_minor_formatter(NullFormatter())


def _categories(series: list[dict]) -> list[str]:  # first series' x, then later ones
    out: list[str] = []
    for s in series:
        out += [c for c in map(_text, _list(s.get("x"))) if c not in out]
    return out


def _draw_bars(ax, figure: dict) -> int:
    """Grouped bars, one colour per series, error bars over the intervals; returns the
    number of series drawn."""
    series = [_dict(s) for s in _list(figure.get("series"))]
    cats, log_y = _categories(series), bool(figure.get("y_log"))
    width, drawn = 0.8 / max(len(series), 1), 0
    for i, s in enumerate(series):
        ys, lows, highs = (_list(s.get(k)) for k in ("y", "low", "high"))
        bars = []
        for j, cat in enumerate(map(_text, _list(s.get("x")))):
            y = _finite(ys[j]) if j < len(ys) else None
            if y is None or (log_y and y <= 0):
                continue
            low = _finite(lows[j]) if j < len(lows) else None
            high = _finite(highs[j]) if j < len(highs) else None
            err = (max(y - low, 0), max(high - y, 0)) if None not in (low, high) else None
            bars.append((cats.index(cat) - 0.4 + width * (i + 0.5), y, err))
        if bars:
            xs, heights, _ = zip(*bars)
            label = _mpl(s.get("label", ""))
            ax.bar(xs, heights, width=width * 0.95, color=_style(i)["color"], label=label)
            drawn += 1
        if errs := [b for b in bars if b[2] is not None]:
            xs, heights, yerr = zip(*errs)
            ax.errorbar(xs, heights, yerr=list(zip(*yerr)), fmt="none", ecolor="black", capsize=3)
    if drawn:
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([_mpl(c) for c in cats], rotation=20 if len(cats) > 4 else 0)
        ax.set_yscale("log" if log_y else "linear")
    return drawn


def _draw(figure: dict):
    """The matplotlib figure of one FIGURE (``"no data"`` written on it when no series
    has a point to draw)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE, constrained_layout=True)
    draw = _draw_bars if figure.get("kind") == "bars" else _draw_lines
    drawn = draw(ax, figure)
    reference = _finite(figure.get("reference"))
    if drawn and reference is not None and not (figure.get("y_log") and reference <= 0):
        label = _mpl(figure.get("reference_label") or f"reference {_num(reference)}")
        ax.axhline(reference, color="gray", ls="--", lw=1, label=label)
    if drawn:
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3, which="both")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(_mpl(figure.get("title") or ""), fontsize=10)
    ax.set(xlabel=_mpl(figure.get("x_label") or ""), ylabel=_mpl(figure.get("y_label") or ""))
    return fig


def _file_name(name: str, used: set) -> str:
    """``name`` safe as a file name and not yet ``used`` (``-2``, ``-3``... appended)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "figure"
    unique, k = base, 2
    while unique in used:
        unique, k = f"{base}-{k}", k + 1
    used.add(unique)
    return unique


def _write_figures(claims: list[dict], figdir: Path, pool=None) -> list[list[dict]]:
    """Draw every FIGURE and save it as PNG and SVG in ``figdir`` (in ``pool``'s processes
    when given: a figure takes ~0.5 s, most of it in the two encoders); returns, per
    claim, per figure, its file name, title and the PNG as base64."""
    drawn, used, pending = [], set(), []
    for claim in claims:
        drawn.append([])
        for figure in map(_dict, _list(claim.get("figures"))):
            name = _file_name(_text(figure.get("name")) or f"claim-{claim.get('id')}", used)
            entry = {"name": name, "title": _text(figure.get("title")) or name}
            args = (figure, str(figdir), name)
            pending.append((entry, _submit(pool, args) if pool else None, args))
            drawn[-1].append(entry)
    for entry, future, args in pending:  # all submitted first, then collected
        entry["png"] = _result(future, args)
    return drawn


def _submit(pool, args):
    """``draw_figure(*args)`` sent to ``pool``; ``None`` when the pool is broken (a worker
    died during the study): the figure is then drawn here."""
    try:
        return pool.submit(draw_figure, *args)
    except BrokenExecutor:
        return None


def _result(future, args) -> str:
    if future is not None:
        try:
            return future.result()
        except BrokenExecutor:  # a worker died: draw it here
            pass
    return draw_figure(*args)


def draw_figure(figure: dict, figdir: str, name: str) -> str:
    """Draw one FIGURE, save it as ``figdir/name.png`` and ``.svg``; return the PNG as
    base64 (a top-level function: the lab's worker processes run it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = _draw(figure)
    try:
        save_figure(fig, Path(figdir) / f"{name}.png")
        save_figure(fig, Path(figdir) / f"{name}.svg")
    finally:
        plt.close(fig)
    return base64.b64encode((Path(figdir) / f"{name}.png").read_bytes()).decode("ascii")


def _effect_text(c: dict) -> str:
    """``"what: mean [low, high] unit (holds if ...)"``."""
    unit = f" {c['unit']}" if c.get("unit") else ""
    if _finite(c.get("mean")) is None:
        value = "no value"
    elif _finite(c.get("low")) is None or _finite(c.get("high")) is None:
        value = f"{_num(c.get('mean'))}{unit}, n={_text(c.get('n'))}, no interval"
    else:
        value = f"{_num(c.get('mean'))} [{_num(c.get('low'))}, {_num(c.get('high'))}]{unit}"
    rule = f" (holds if {c['holds_if']})" if c.get("holds_if") else ""
    return f"{_text(c.get('what'))}: {value}{rule}"


def _criterion_row(c: dict) -> dict:
    interval = "-"
    if _finite(c.get("low")) is not None and _finite(c.get("high")) is not None:
        interval = f"[{_num(c.get('low'))}, {_num(c.get('high'))}]"
    return {
        "what": _text(c.get("what")),
        "rule": f"{_text(c.get('effect'))} {_text(c.get('holds_if'))}".strip(),
        "unit": _text(c.get("unit")),
        "n": _text(c.get("n")),
        "mean": _num(c.get("mean")),
        "interval": interval,
        "verdict": _text(c.get("verdict")) or "not judged",
        "css": _css(c.get("verdict")),
        "effect": _effect_text(c),
    }


def _claim_view(claim: dict, figures: list[dict]) -> dict:
    cid = _text(claim.get("id"))
    lrs = _dict(claim.get("chosen_lr"))
    return {
        "id": cid,
        "anchor": f"claim-{cid}",
        "label": f"{'Follow-up' if _is_follow_up(claim) else 'Claim'} {cid}",
        "follow_up": _is_follow_up(claim),
        "title": _text(claim.get("title")),
        "quote": _text(claim.get("quote")),
        "seeds": ", ".join(map(_text, _list(claim.get("seeds")))),
        "experiment": _text(claim.get("experiment")),
        "design": _text(claim.get("design")),
        "verdict": _text(claim.get("verdict")) or "not judged",
        "css": _css(claim.get("verdict")),
        "headline": _text(claim.get("headline")),
        "criteria": [
            _criterion_row(c) for c in _list(claim.get("criteria")) if isinstance(c, dict)
        ],
        "sentences": " ".join(map(_text, _list(claim.get("sentences")))),
        "lrs": [(_text(k), _lr(v)) for k, v in lrs.items()],
        "figures": figures,
    }


def _counts_text(claims: list[dict]) -> str:
    verdicts = [c.get("verdict") if c.get("verdict") in VERDICTS else "not judged" for c in claims]
    parts = [f"{verdicts.count(v)} {v}" for v in VERDICTS[:3]]
    if verdicts.count("not judged"):
        parts.append(f"{verdicts.count('not judged')} not judged")
    return ", ".join(parts)


def _summary(claims: list[dict]) -> str:
    """``"N claims: a supported, b not supported, c inconclusive"`` (+ the follow-ups)."""
    main = [c for c in claims if not _is_follow_up(c)]
    follow = [c for c in claims if _is_follow_up(c)]
    text = f"{len(main)} claim{'s' if len(main) != 1 else ''}: {_counts_text(main)}"
    if follow:
        s = "s" if len(follow) != 1 else ""
        text += f"; {len(follow)} follow-up{s}: {_counts_text(follow)}"
    return text + "."


def _settings_rows(settings: dict, size) -> list[tuple[str, str]]:
    lrs = _list(settings.get("lrs"))
    rows = [
        ("size", size),
        ("seeds", settings.get("seeds")),
        ("learning-rate grid", ", ".join(_lr(lr) for lr in lrs)),
        ("epochs", settings.get("epochs")),
        ("samples", settings.get("num_samples")),
        ("validation fraction", settings.get("val_fraction")),
        ("dataset", settings.get("dataset")),
        ("batch size", settings.get("batch_size")),
    ]
    return [(key, _text(value)) for key, value in rows if value not in (None, "")]


def _counts_line(counts: dict) -> str:
    if not counts:
        return ""
    parts = [f"{_text(counts.get(k, 0))} {k}" for k in ("reused", "trained", "diverged", "failed")]
    return f"{_text(counts.get('jobs', 0))} jobs: {', '.join(parts)}."


def _render_page(results: dict, figures: list[list[dict]]) -> str:
    """The text of ``report.html``."""
    import jinja2

    claims = _claims(results)
    views = [_claim_view(claim, shown) for claim, shown in zip(claims, figures)]
    settings = _dict(results.get("settings"))
    made = {k: results.get(k) for k in ("size", "quick", "seconds", "settings", "counts")}
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = Path(__file__).with_name(TEMPLATE).read_text(encoding="utf-8")
    return env.from_string(template).render(
        quick=bool(results.get("quick")),
        description=_text(results.get("description")),
        summary=_summary(claims),
        wall_time=_duration(results.get("seconds")),
        claims=[v for v in views if not v["follow_up"]],
        follow_ups=[v for v in views if v["follow_up"]],
        methodology=[_text(s) for s in _list(results.get("methodology"))],
        settings=_settings_rows(settings, results.get("size")),
        provenance=_provenance_rows({"provenance": _dict(results.get("provenance")), **made}),
        counts=_counts_line(_dict(results.get("counts"))),
    )
