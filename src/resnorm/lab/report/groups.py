"""Reading a study's results: the swept axis, variants (runs grouped by configuration),
points (the finished seeds of one variant at one x value) and the small formatting rules
every part of the report shares. The conventions are in the package docstring."""

from __future__ import annotations

import json
import math
import numbers

from ...errors import UsageError
from ...models.registry import depth_unit
from ..study import AXES

_AXIS_WORD = {"depth": "depth", "batch_size": "batch size"}
# What identifies a configuration besides the variant label, the swept axis and the seed.
_CONFIG_FIELDS = (
    "family",
    "model",
    "norm",
    "residual",
    "placement",
    "dataset",
    "options",
    "depth",
    "batch_size",
)
_NOT_FINISHED = ("diverged", "failed")


def _axis(study: dict) -> str:
    axis = (study or {}).get("x") or "depth"
    if axis not in AXES:
        raise UsageError(f"study x={axis!r} is not supported; accepted: {', '.join(AXES)}")
    return axis


def _unit(runs: list[dict], axis: str) -> str | None:
    """What the x value counts for these runs: on the depth axis the model's
    :func:`~resnorm.models.registry.depth_unit` ("blocks", "weight layers") when all the
    runs agree on one, else ``None`` (batch sizes need no unit)."""
    if axis != "depth":
        return None
    units = {depth_unit(str(r.get("model") or r.get("family"))) for r in runs}
    return units.pop() if len(units) == 1 else None


def _axis_label(axis: str, unit: str | None = None) -> str:
    """An axis title: ``"depth (weight layers)"``, or the plain word without a unit."""
    return f"{_AXIS_WORD[axis]} ({unit})" if unit else _AXIS_WORD[axis]


def _at(axis: str, x, unit: str | None = None) -> str:
    """Where a point sits, for sentences: ``"24 blocks"``, ``"20 weight layers"``, or
    ``"depth 8"`` / ``"batch size 64"`` without a unit."""
    if unit:
        one = _finite(x) == 1
        return f"{_fmt_x(x)} {unit[:-1] if one and unit.endswith('s') else unit}"
    return f"{_AXIS_WORD[axis]} {_fmt_x(x)}"


def _by_unit(groups: dict, axis: str) -> dict:
    """The variants split by what their x value counts: unit -> {label: runs}, in order
    of first appearance (one entry, ``None`` or the unit, when they all agree)."""
    out: dict = {}
    for label, runs in groups.items():
        out.setdefault(_unit(runs, axis), {})[label] = runs
    return out


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
    return tuple(
        (field, json.dumps(run.get(field), sort_keys=True, default=str))
        for field in _CONFIG_FIELDS
        if field != axis
    )


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
        differing = [
            i for i in range(len(_CONFIG_FIELDS) - 1) if len({key[i] for key in configs}) > 1
        ]
        for key, runs in configs.items():
            extra = ", ".join(f"{key[i][0]}={key[i][1]}" for i in differing)
            groups[f"{label} [{extra}]"] = runs
    return groups


def _fallback_label(run: dict) -> str:
    parts = [
        str(run.get("model") or run.get("family") or "model"),
        "residual" if run.get("residual") else "plain",
        _norm_word(run.get("norm")),
    ]
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
    return isinstance(init, dict) and bool(
        init.get("verdict") or init.get("layers") or init.get("blocks")
    )


def _verdict_summary(runs: list[dict]) -> tuple[str, str]:
    """(verdict, grad ratio) over the seeds of one point: ``"healthy"`` or
    ``"healthy/vanishing"``; one ratio or ``"low to high"``."""
    verdicts = []
    for run in runs:
        v = (run.get("init") or {}).get("verdict")
        if v and v not in verdicts:
            verdicts.append(str(v))
    ratios = [
        r
        for r in ((run.get("init") or {}).get("grad_ratio") for run in runs)
        if _finite(r) is not None
    ]
    if not ratios:
        ratio = "n/a"
    elif min(ratios) == max(ratios):
        ratio = f"{ratios[0]:.1e}"
    else:
        ratio = f"{min(ratios):.1e} to {max(ratios):.1e}"
    return "/".join(verdicts) or "n/a", ratio


def _first_line(text, limit: int = 120) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
