"""Effects over seeds: the mean, its 95% Student-t interval, and the verdict a rule gives."""

from __future__ import annotations

import math


def finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean_interval(values, level: float = 0.95) -> dict:
    """``n``, ``mean``, ``low``, ``high`` of the finite values: the mean and its two-sided
    Student-t interval (``low``/``high`` are ``None`` below two values)."""
    from scipy import stats

    xs = finite(values)
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None}
    mean = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": mean, "low": None, "high": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def paired(a, b) -> list[float | None]:
    """``a - b`` seed by seed (``None`` where either is missing)."""
    return [
        x - y if x is not None and y is not None and math.isfinite(x - y) else None
        for x, y in zip(a, b, strict=True)
    ]


def verdict(interval: dict, direction: str, margin: float) -> str:
    """``supported`` when the whole interval lies beyond ``margin`` on the side
    ``direction`` (``">"`` or ``"<"``), ``not supported`` when it lies wholly on the other
    side, ``inconclusive`` when it contains ``margin``; ``not judged`` without an interval
    (fewer than two seeds)."""
    low, high = interval["low"], interval["high"]
    if low is None or high is None:
        return "not judged"
    if direction == "<":
        low, high, margin = -high, -low, -margin
    if low > margin:
        return "supported"
    if high < margin:
        return "not supported"
    return "inconclusive"


def combine(verdicts: list[str]) -> str:
    """A claim's verdict from its criteria's: supported when all are, not supported when
    any is not, not judged when any could not be judged, inconclusive otherwise."""
    if any(v == "not supported" for v in verdicts):
        return "not supported"
    if any(v == "not judged" for v in verdicts):
        return "not judged"
    if all(v == "supported" for v in verdicts):
        return "supported"
    return "inconclusive"
