"""How a :class:`~resnorm.diagnostics.Diagnosis` is shown: a rich table for the terminal, a
matplotlib figure, and a self-contained HTML section (image embedded) for reports."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from .._io import atomic_open
from .verdict import Verdict

_COLORS = {
    Verdict.HEALTHY: "green",
    Verdict.VANISHING: "yellow",
    Verdict.EXPLODING: "red",
    Verdict.NONFINITE: "red",
}


def diagnosis_table(diagnosis, max_rows: int = 16):
    """A rich ``Table`` of the gradient norm per layer (first, last and evenly spaced
    layers in between when there are more than ``max_rows``), with the verdict as title."""
    from rich.table import Table

    verdict = diagnosis.verdict
    table = Table(
        title=f"{diagnosis.model_name}: [{_COLORS[verdict]}]{verdict.value}[/] "
        f"(first/last gradient ratio {diagnosis.grad_ratio:.2e}, "
        f"loss {diagnosis.loss:.3g})"
    )
    for column in ("#", "layer", "kind", "grad norm", "grad / weight"):
        table.add_column(column, justify="right" if column not in ("layer", "kind") else "left")
    layers = diagnosis.layers
    keep = _spread(len(layers), max_rows)
    start = next((i for i, layer in enumerate(layers) if layer.name == diagnosis.start_layer), None)
    if start is not None and start not in keep:
        keep = sorted(set(keep) | {start})
    for i in keep:
        layer = layers[i]
        style = "bold" if i == start else None
        table.add_row(
            str(i + 1),
            layer.name,
            layer.kind,
            f"{layer.grad_norm:.2e}",
            f"{layer.relative:.2e}",
            style=style,
        )
    if len(keep) < len(layers):
        table.caption = f"{len(keep)} of {len(layers)} layers shown; to_json() has them all"
    return table


def _spread(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _measured_layers(diagnosis) -> bool:
    """Whether the diagnosis measured the model itself (one batch), not only a run's
    records (:func:`~.analyze.analyze` has no blocks and no weight norms)."""
    return bool(diagnosis.blocks) or any(
        math.isfinite(layer.weight_norm) for layer in diagnosis.layers
    )


def diagnosis_figure(diagnosis, path=None):
    """Four panels: gradient norm by layer (log scale), and by block depth the average
    channel squared mean, the average channel variance, and the residual-branch variance;
    for a run judged from its records only, the loss and update heat map
    (:func:`training_figure`). Saved to ``path`` (PNG or SVG by its suffix, written
    atomically) when given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not _measured_layers(diagnosis) and diagnosis.training is not None:
        fig = training_figure(diagnosis.training)
        if path is not None:
            save_figure(fig, path)
        return fig

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    fig.suptitle(f"{diagnosis.model_name}: {diagnosis.verdict.value}")
    ax = axes[0, 0]
    kinds: dict[str, list] = {}
    for i, layer in enumerate(diagnosis.layers, 1):
        kinds.setdefault(layer.kind, []).append((i, max(layer.grad_norm, 1e-45)))
    for kind, points in kinds.items():
        ax.semilogy(*zip(*points), marker=".", lw=1, label=kind)
    ax.set(title="weight-gradient norm by layer", xlabel="layer (forward order)", ylabel="||grad||")
    if diagnosis.start_layer is not None:
        index = [layer.name for layer in diagnosis.layers].index(diagnosis.start_layer)
        ax.axvline(index + 1, color="red", ls="--", lw=1, label=f"starts: {diagnosis.start_layer}")
    ax.legend(fontsize=8)
    blocks = diagnosis.blocks
    depth = list(range(1, len(blocks) + 1))
    panels = [
        (axes[0, 1], "average channel squared mean", [b.sq_mean for b in blocks]),
        (axes[1, 0], "average channel variance", [b.var for b in blocks]),
        (axes[1, 1], "residual-branch variance", [b.branch_var for b in blocks]),
    ]
    for ax, title, values in panels:
        points = [
            (d, v) for d, v in zip(depth, values) if v is not None and math.isfinite(v) and v > 0
        ]
        if points:
            ax.plot(*zip(*points), marker=".", lw=1)
            low, high = min(v for _, v in points), max(v for _, v in points)
            if high > 10 * low:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="block depth")
    if path is not None:
        save_figure(fig, path)
    return fig


def training_figure(trace):
    """Two panels from a :class:`~.training.TrainingTrace`: the loss per step, and a heat
    map of each layer's relative weight update per step (log10; layers in forward order,
    first at the top), where frozen first layers or an update far from ~1e-3 show."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_loss, ax_map) = plt.subplots(
        1, 2, figsize=(12, 4.2), constrained_layout=True, gridspec_kw={"width_ratios": [1, 2]}
    )
    losses = [v if math.isfinite(v) else np.nan for v in trace.losses]
    ax_loss.plot(range(len(losses)), losses, marker=".", lw=1)
    if all(v > 0 for v in losses if v == v):
        ax_loss.set_yscale("log")
    ax_loss.set(title="loss", xlabel="step (or record)")
    steps = max((len(u) for u in trace.updates), default=0)
    grid = np.full((max(1, len(trace.updates)), max(1, steps)), np.nan)
    for i, row in enumerate(trace.updates):
        for j, value in enumerate(row):
            grid[i, j] = math.log10(value) if value > 0 else -12.0
    image = ax_map.imshow(
        grid, aspect="auto", cmap="viridis", vmin=-8, vmax=0, interpolation="nearest"
    )
    fig.colorbar(image, ax=ax_map, label="log10 ||dW|| / ||W|| per step (~ -3 is typical)")
    names = trace.layer_names
    ticks = _spread(len(names), 12)
    ax_map.set_yticks(ticks)
    ax_map.set_yticklabels([names[i] for i in ticks], fontsize=7)
    ax_map.set(title="relative weight update per layer", xlabel="step (or record)")
    return fig


def save_figure(fig, path) -> None:
    """Write a matplotlib figure atomically, in the format its suffix names (png, svg, pdf)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, dpi=110)


def figure_png_base64(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_SECTION = """\
<section class="resnorm-diagnosis">
<h2>{{ d.model_name }}: <span class="verdict {{ d.verdict.value }}">{{ d.verdict.value }}</span></h2>
<p>{{ summary }}</p>
{% if d.remedies %}<h3>What to change</h3>
<ul>{% for r in d.remedies %}<li>{{ r }}</li>{% endfor %}</ul>{% endif %}
<h3>Signals (confidence: {{ d.confidence }})</h3>
<table>
<tr><th>signal</th><th>value</th><th>healthy when</th><th>fired</th><th>says</th></tr>
{% for s in d.signals %}<tr{% if s.fired %} class="start"{% endif %}><td>{{ s.name }}</td><td>{{ "%.2e"|format(s.value) if s.value is not none else "-" }}</td><td>{{ s.limit }}</td><td>{{ s.verdict.value if s.fired and s.verdict else "" }}</td><td>{{ s.text }}</td></tr>
{% endfor %}</table>
{% if training_png %}<h3>Training steps</h3>
<img alt="loss and per-layer update heat map over the steps" src="data:image/png;base64,{{ training_png }}">{% endif %}
{% if png %}<img alt="gradient norm by layer and signal propagation by block" src="data:image/png;base64,{{ png }}">{% endif %}
<table>
<tr><th>#</th><th>layer</th><th>kind</th><th>grad norm</th><th>grad / weight</th></tr>
{% for layer in d.layers %}<tr{% if layer.name == d.start_layer %} class="start"{% endif %}><td>{{ loop.index }}</td><td>{{ layer.name }}</td><td>{{ layer.kind }}</td><td>{{ "%.2e"|format(layer.grad_norm) }}</td><td>{{ "%.2e"|format(layer.relative) }}</td></tr>
{% endfor %}</table>
</section>
"""

_PAGE = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>resnorm diagnosis: {{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
.verdict.healthy { color: #1a7f37; } .verdict.vanishing { color: #9a6700; }
.verdict.exploding, .verdict.non-finite { color: #cf222e; }
img { max-width: 100%; } table { border-collapse: collapse; font-size: 0.85em; }
td, th { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }
td:nth-child(2), td:nth-child(3) { text-align: left; } tr.start { background: #fff3cd; }
</style></head><body>
{{ section }}
</body></html>
"""


def _env():
    import jinja2

    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def diagnosis_html_section(diagnosis) -> str:
    """A ``<section>`` with the verdict, findings, remedies, the signals, the training
    steps' loss and update heat map (when it trained), the figure (embedded PNG) and the
    per-layer table; every user-controlled string is escaped."""
    import matplotlib.pyplot as plt

    png = training_png = None
    if _measured_layers(diagnosis):
        fig = diagnosis_figure(diagnosis)
        try:
            png = figure_png_base64(fig)
        finally:
            plt.close(fig)
    if diagnosis.training is not None and diagnosis.training.losses:
        fig = training_figure(diagnosis.training)
        try:
            training_png = figure_png_base64(fig)
        finally:
            plt.close(fig)
    return (
        _env()
        .from_string(_SECTION)
        .render(d=diagnosis, summary=diagnosis.summary(), png=png, training_png=training_png)
    )


def write_diagnosis_html(diagnosis, path) -> None:
    """A standalone page holding :func:`diagnosis_html_section`, written atomically."""
    import markupsafe

    page = (
        _env()
        .from_string(_PAGE)
        .render(
            title=diagnosis.model_name, section=markupsafe.Markup(diagnosis_html_section(diagnosis))
        )
    )
    with atomic_open(path, "w") as f:
        f.write(page)
