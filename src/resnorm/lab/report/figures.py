"""The report's figures (matplotlib): test accuracy along the swept axis, training-loss
curves, and gradient norms and signal propagation at initialization."""

from __future__ import annotations

import math
from pathlib import Path

from ...diagnostics.report import figure_png_base64, save_figure
from .groups import (
    _NOT_FINISHED,
    _at,
    _axis_label,
    _by_unit,
    _by_x,
    _finite,
    _has_init,
    _last_acc,
    _points,
    _sort_key,
    _unit,
)

FIGURES = (
    ("accuracy", "Test accuracy"),
    ("loss_curves", "Training loss"),
    ("init_grad_norms", "Gradient norm by layer at initialization"),
    ("init_signal", "Signal propagation at initialization"),
)

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
    """Mean accuracy along the axis, one panel per thing the x value counts (a study with
    MLPs and ResNets on its depth axis gets a "blocks" and a "weight layers" panel)."""
    import matplotlib.pyplot as plt

    panels = _by_unit(groups, axis)
    if not panels:
        return None, "No run recorded a test accuracy (no training in these results)."
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.5 + 5.5 * len(panels), 5), constrained_layout=True, squeeze=False
    )
    styles = {label: _style(i) for i, label in enumerate(groups)}
    drawn = crosses = unplotted = 0
    for ax, (unit, panel) in zip(axes.flat, panels.items()):
        all_x = []
        for label, runs in panel.items():
            xs = _draw_means(ax, label, _points(runs, axis), styles[label])
            drawn += bool(xs)
            marked, missing = _draw_crosses(ax, runs, axis, styles[label]["color"])
            crosses, unplotted, all_x = (
                crosses + len(marked),
                unplotted + missing,
                all_x + xs + marked,
            )
        _axis_ticks(ax, axis, all_x)
        ax.set(
            xlabel=_axis_label(axis, unit) + (" (log2 scale)" if axis == "batch_size" else ""),
            ylabel="final test accuracy (%)",
        )
        ax.grid(alpha=0.3)
    if not drawn and not crosses:
        plt.close(fig)
        return None, "No run recorded a test accuracy (no training in these results)."
    fig.suptitle("Test accuracy: mean over seeds, bars from the lowest to the highest seed")
    _accuracy_legend(fig, axes.flat[-1], crosses)
    note = None
    if unplotted:
        note = (
            f"{unplotted} diverged or failed run{'s' if unplotted != 1 else ''} recorded "
            f"no test accuracy and {'are' if unplotted != 1 else 'is'} not plotted "
            f"(see the runs table)."
        )
    return fig, note


def _accuracy_legend(fig, ax, crosses: int) -> None:
    """One legend for all panels, the diverged/failed marker last."""
    if crosses:
        ax.plot(
            [],
            [],
            ls="none",
            marker="X",
            color="gray",
            markeredgecolor="black",
            label="diverged/failed run (last accuracy)",
        )
    entries = {}
    for panel in fig.axes:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels = sorted(entries, key=lambda label: label.startswith("diverged/"))
    ax.legend(
        [entries[k] for k in labels],
        labels,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0,
    )


def _draw_means(ax, label: str, points: dict, style: dict) -> list:
    """One variant's mean accuracy per x, with bars from its lowest to its highest seed;
    returns the x values drawn."""
    xs = sorted((x for x in points if _finite(x) is not None), key=float)
    if xs:
        means = [points[x].mean * 100 for x in xs]
        low = [m - min(points[x].accs) * 100 for m, x in zip(means, xs)]
        high = [max(points[x].accs) * 100 - m for m, x in zip(means, xs)]
        ax.errorbar(
            xs,
            means,
            yerr=[low, high],
            marker="o",
            ms=4,
            capsize=3,
            lw=1.4,
            label=_mpl(label),
            **style,
        )
    return xs


def _draw_crosses(ax, runs: list[dict], axis: str, color) -> tuple[list, int]:
    """A cross at the last accuracy of each diverged or failed run; returns the x values
    marked and the number of such runs with no accuracy or x to draw."""
    marked, missing = [], 0
    for run in runs:
        if run.get("status") not in _NOT_FINISHED:
            continue
        acc, x = _last_acc(run), _finite(run.get(axis))
        if acc is None or x is None:
            missing += 1
            continue
        ax.scatter(
            [x],
            [acc * 100],
            marker="X",
            s=70,
            color=color,
            edgecolors="black",
            linewidths=0.6,
            zorder=4,
        )
        marked.append(x)
    return marked, missing


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

    panels: dict = {}  # (unit, x) -> [(style index, label, curve)]
    for i, (label, runs) in enumerate(groups.items()):
        unit = _unit(runs, axis)
        for x, rs in _by_x(runs, axis).items():
            curve = _mean_curve(rs, "train_loss")
            if curve:
                panels.setdefault((unit, x), []).append((i, label, curve))
    if not panels:
        return None, "No training history in these results (the study did no training)."
    keys = sorted(panels, key=lambda key: (str(key[0]), _sort_key(key[1])))
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.6 * cols + 2.8, 3.3 * rows), constrained_layout=True, squeeze=False
    )
    handles = {}
    for ax, (unit, x) in zip(axes.flat, keys):
        for i, label, curve in panels[unit, x]:
            (line,) = ax.plot(
                *zip(*curve),
                marker="." if len(curve) < 30 else None,
                lw=1.3,
                label=_mpl(label),
                **_style(i),
            )
            handles.setdefault(i, line)
        ax.set_yscale("log")
        ax.set(title=_at(axis, x, unit), xlabel="epoch", ylabel="train loss (mean over seeds)")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    ordered = [handles[i] for i in sorted(handles)]
    fig.legend(ordered, [h.get_label() for h in ordered], loc="outside right upper", fontsize=7)
    return fig, None


def _init_picks(groups: dict, axis: str) -> dict:
    """Per variant, the run whose initialization is drawn: its largest depth, then the
    lowest seed, then the largest batch."""
    picks = {}
    for label, runs in groups.items():
        runs = [r for r in runs if _has_init(r)]
        if runs:
            picks[label] = max(
                runs,
                key=lambda r: (
                    _finite(r.get("depth")) or -1,
                    -(_finite(r.get("seed")) or 0),
                    _finite(r.get("batch_size")) or -1,
                ),
            )
    return picks


def _depth_note(picks: dict) -> tuple[str, bool]:
    depths = {(p.get("depth"), _unit([p], "depth")) for p in picks.values()}
    if len(depths) == 1:
        depth, unit = depths.pop()
        return _at("depth", depth, unit), False
    return "each variant at its largest depth", True


def _init_label(label: str, run: dict, per_variant_depth: bool) -> str:
    where = _at("depth", run.get("depth"), _unit([run], "depth"))
    return _mpl(label + (f" ({where})" if per_variant_depth else ""))


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
        weights = [
            layer
            for layer in run["init"].get("layers") or []
            if not _is_norm_kind(layer.get("kind", ""))
        ]
        points = [
            (i, max(v, 1e-45))
            for i, layer in enumerate(weights, 1)
            if (v := _finite(layer.get("grad_norm"))) is not None and v >= 0
        ]
        if points:
            lines.append((order.index(label), label, run, points))
    if not lines:
        return None, "No per-layer gradient norms at initialization in these results."
    where, per_variant = _depth_note({label: picks[label] for _, label, _, _ in lines})
    fig, ax = plt.subplots(figsize=(10, 4.8), constrained_layout=True)
    for i, label, run, points in lines:
        ax.plot(
            *zip(*points),
            marker="." if len(points) < 60 else None,
            lw=1.2,
            label=_init_label(label, run, per_variant),
            **_style(i),
        )
    ax.set_yscale("log")
    ax.set(
        title=f"Weight-gradient norm by layer at initialization ({where})",
        xlabel="weight layer (forward order; normalization layers left out)",
        ylabel="||grad||",
    )
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(lines))
    return fig, None


def _signal_figure(groups: dict, axis: str):
    import matplotlib.pyplot as plt

    picks = {label: r for label, r in _init_picks(groups, axis).items() if r["init"].get("blocks")}
    if not picks:
        return None, "No block statistics at initialization in these results."
    order = list(groups)
    where, per_variant = _depth_note(picks)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
    fig.suptitle(f"Signal propagation at initialization ({where})")
    handles = {}
    for ax, (key, title) in zip(
        axes,
        (
            ("sq_mean", "average channel squared mean"),
            ("var", "average channel variance"),
            ("branch_var", "residual-branch variance"),
        ),
    ):
        values = []
        for label, run in picks.items():
            points = [
                (d, v)
                for d, block in enumerate(run["init"]["blocks"], 1)
                if (v := _finite(block.get(key))) is not None and v > 0
            ]
            if points:
                i = order.index(label)
                (line,) = ax.plot(
                    *zip(*points),
                    marker="." if len(points) < 60 else None,
                    lw=1.2,
                    label=_init_label(label, run, per_variant),
                    **_style(i),
                )
                handles.setdefault(i, line)
                values += [v for _, v in points]
        if values:
            if max(values) > 10 * min(values):
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="block (forward order)")
        ax.grid(alpha=0.3, which="both")
    ordered = [handles[i] for i in sorted(handles)]
    if ordered:
        fig.legend(ordered, [h.get_label() for h in ordered], loc="outside right upper", fontsize=7)
    return fig, None


_FIGURE_MAKERS = {
    "accuracy": _accuracy_figure,
    "loss_curves": _loss_figure,
    "init_grad_norms": _grad_figure,
    "init_signal": _signal_figure,
}


def _write_figures(groups: dict, axis: str, figdir: Path) -> list[dict]:
    """Draw every figure of :data:`FIGURES` and save it as PNG and SVG in ``figdir``; a
    figure without data is left out (any stale copy removed) with a note saying why.
    Returns, per figure, its name, title, base64 PNG (or ``None``) and note."""
    import matplotlib.pyplot as plt

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
    return figures
