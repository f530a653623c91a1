"""The figures of the claims study as data (the report draws them): a series is the mean
over seeds at each x with its 95% interval; see ``FIGURE`` in the report's schema."""

from __future__ import annotations

from .stats import mean_interval


def runs_of(chosen: dict, name: str) -> list[dict]:
    """The runs (one per seed) of variant ``name`` at its chosen learning rate."""
    return chosen[name]["runs"]


def series(label: str, xs: list, per_x: list[list]) -> dict:
    """A figure series: at each x the mean over seeds and its 95% interval."""
    stats = [mean_interval(v) for v in per_x]
    return {
        "label": label,
        "x": list(xs),
        "y": [s["mean"] for s in stats],
        "low": [s["low"] for s in stats],
        "high": [s["high"] for s in stats],
    }


def figure(name: str, title: str, kind: str, x_label: str, y_label: str, lines, **more) -> dict:
    return {
        "name": name,
        "title": title,
        "kind": kind,
        "x_label": x_label,
        "y_label": y_label,
        "x_log": more.pop("x_log", False),
        "y_log": more.pop("y_log", False),
        "series": lines,
        "reference": more.pop("reference", None),
        "reference_label": more.pop("reference_label", None),
        "metrics": more.pop("metrics", []),
    }


def bars(name: str, title: str, y_label: str, groups: dict, metric: str, labels: dict) -> dict:
    """One bar per group: ``groups[g][metric]`` over seeds."""
    lines = [series(labels.get(g, g), [labels.get(g, g)], [groups[g][metric]]) for g in labels]
    return figure(name, title, "bars", "", y_label, lines, metrics=[metric])


def val_curves(chosen: dict, names: dict) -> list[dict]:
    lines = []
    for name, label in names.items():
        runs = runs_of(chosen, name)
        epochs = max((len(r["history"]) for r in runs if r), default=0)
        per_epoch = [
            [
                100 * r["history"][e]["val_acc"] if r and e < len(r["history"]) else None
                for r in runs
            ]
            for e in range(epochs)
        ]
        lines.append(series(label, list(range(1, epochs + 1)), per_epoch))
    return lines
