"""The terminal's view of a study's results: a compact rich table."""

from __future__ import annotations

from .groups import (
    _AXIS_WORD,
    _NOT_FINISHED,
    _at,
    _axis,
    _by_x,
    _fmt_x,
    _groups,
    _has_init,
    _Point,
    _sort_key,
    _unit,
    _verdict_summary,
)


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
    table = Table(
        title=Text(f"{name}: mean test accuracy over seeds"),
        box=box.SIMPLE_HEAD,
        caption="runs: finished/total; acc: final test accuracy, mean over seeds; "
        "±: max - min over seeds (points); bad: diverged or failed; "
        "init: verdict at initialization",
    )
    for column, justify in (
        ("variant", "left"),
        (_AXIS_WORD[axis], "right"),
        ("runs", "right"),
        ("acc", "right"),
        ("±", "right"),
        ("bad", "right"),
        ("init", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=True)
    for label, runs in _groups(list(results or []), axis).items():
        by_x = _by_x(runs, axis)
        for x in sorted(by_x, key=_sort_key):
            point = _Point(by_x[x])
            bad = sum(r.get("status") in _NOT_FINISHED for r in by_x[x])
            inits = [r for r in by_x[x] if _has_init(r)]
            table.add_row(
                Text(label),
                _x_text(x, _unit(runs, axis), axis),
                f"{sum(r.get('status') == 'finished' for r in by_x[x])}/{len(by_x[x])}",
                f"{point.mean * 100:.1f}%" if point.accs else "-",
                f"±{point.spread:.1f}" if len(point.accs) > 1 else "-",
                str(bad) if bad else "-",
                Text(_verdict_summary(inits)[0] if inits else "-"),
            )
    if not results:
        table.caption = "no runs"
    return table


def _x_text(x, unit: str | None, axis: str) -> str:
    """The x cell: ``"24 blocks"``, ``"20 weight layers"`` on a depth axis whose models
    say what depth counts, else the number."""
    return _at(axis, x, unit) if unit else _fmt_x(x)
