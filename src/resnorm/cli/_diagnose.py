"""``resnorm diagnose`` and ``resnorm models``."""

from __future__ import annotations

import json

import click

from ._app import MAX_DEPTH, _parse_shape, _parse_verdicts, _UserError, _writable, cli


@cli.command(
    short_help="Will a model train? Gradient flow and signal propagation, at init or over a few steps."
)
@click.argument("model", required=False)
@click.option("--factory", help="Your own model: 'package.module:function' returning an nn.Module.")
@click.option(
    "--input-shape",
    callback=_parse_shape,
    help="Shape of one input sample, e.g. 3,32,32 (registered models know theirs).",
)
@click.option("--norm", help="Normalization kind (batch, layer, rms, group, instance, dyt, none).")
@click.option(
    "--depth", type=click.IntRange(min=1, max=MAX_DEPTH), help="Depth of the model family."
)
@click.option("--width", type=click.IntRange(min=1), help="Width (MLPs).")
@click.option("--placement", type=click.Choice(["pre", "post"]), help="Norm placement.")
@click.option("--residual/--plain", default=None, help="With or without skip connections.")
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(),
    help="Judge a training run instead: its Monitor records (DIR/monitor.jsonl, as "
    "'resnorm train' writes them, or the file itself).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=0, max=10_000),
    default=0,
    show_default=True,
    help="Also train this many optimizer steps on the batch (finds a learning rate far too "
    "large or small, first layers that do not train); the model is put back after.",
)
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "adam", "adamw"]),
    default="adam",
    show_default=True,
    help="The optimizer of --steps (sgd has momentum 0.9).",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-3,
    show_default=True,
    help="The learning rate of --steps.",
)
@click.option(
    "--figure",
    "figure_path",
    type=click.Path(dir_okay=False),
    callback=_writable("file"),
    help="Write the figure (PNG or SVG by suffix).",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    callback=_writable("file"),
    help="Write a self-contained HTML page.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the diagnosis as JSON on stdout.")
@click.option(
    "--fail-on",
    callback=_parse_verdicts,
    default="",
    help="Exit with status 1 when the verdict is one of these "
    "(e.g. vanishing,exploding,non-finite).",
)
def diagnose(model, factory, run_dir, figure_path, html_path, as_json, fail_on, **options):
    """Measure gradient flow and signal propagation of MODEL (a registered name, see
    'resnorm models') or of --factory's model, on one random batch, and say whether it
    will train: whether gradients vanish or explode, where, and what to change. --steps
    also trains a few optimizer steps on the batch; --run judges a training run's
    Monitor records instead.

    \b
    Examples:
      resnorm diagnose mlp --depth 48 --plain --norm none
      resnorm diagnose mlp --depth 8 --steps 20 --optimizer sgd --lr 10
      resnorm diagnose resnet56 --norm layer --figure diag.png
      resnorm diagnose --factory mypkg.models:build --input-shape 3,32,32 --fail-on vanishing
      resnorm diagnose --run runs/mlp-mnist1d-seed0-1a2b3c4d5e
    """
    if run_dir is not None:
        if model is not None or factory is not None:
            raise _UserError("--run judges a run's records: give no MODEL or --factory with it")
        from ..diagnostics import analyze

        _show(analyze(run_dir, name=str(run_dir)), figure_path, html_path, as_json, fail_on)
        return
    if (model is None) == (factory is None):
        raise _UserError(
            "give a registered MODEL name, --factory package.module:function, or --run DIR"
        )
    from ..diagnostics.runner import diagnose_named

    # The model's own options, when given; the rest are the measurement's.
    overrides = {k: options.pop(k) for k in _MODEL_OPTIONS if options[k] is not None}
    for k in _MODEL_OPTIONS:
        options.pop(k, None)
    result = diagnose_named(model, factory=factory, **options, **overrides)
    _show(result, figure_path, html_path, as_json, fail_on)


_MODEL_OPTIONS = ("norm", "depth", "width", "placement", "residual")


def _show(result, figure_path, html_path, as_json, fail_on) -> None:
    """Write the figure and page, print the diagnosis, and exit 1 on a --fail-on verdict."""
    if figure_path:
        import matplotlib.pyplot as plt

        plt.close(result.figure(figure_path))
    if html_path:
        result.write_html(html_path)
    if as_json:
        click.echo(result.to_json(indent=2))
    else:
        from rich.console import Console

        console = Console()
        if result.blocks or result.activations:
            console.print(result.table())
        console.print(result.summary())
        for remedy in result.remedies:
            console.print(f"  - {remedy}")
        for path in (figure_path, html_path):
            if path:
                console.print(f"wrote {path}")
    if result.verdict.value in fail_on:
        raise click.exceptions.Exit(1)


@cli.command(name="models", short_help="List the registered models.")
@click.argument("pattern", default="*")
@click.option("--params", is_flag=True, help="Build each model and count its parameters.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def models_command(pattern, params, as_json) -> None:
    """List the registered models (shell-style PATTERN, e.g. 'resnet*')."""
    from ..models import create_model, get_model_entry, list_models

    names = list_models(pattern)
    if not names:
        raise _UserError(f"no model matches {pattern!r}; try 'resnorm models' for all names")
    rows = []
    for name in names:
        row = {"name": name, "description": get_model_entry(name).description}
        if params:
            row["parameters"] = sum(p.numel() for p in create_model(name).parameters())
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("model")
    if params:
        table.add_column("parameters", justify="right")
    table.add_column("description")
    for row in rows:
        cells = (
            [row["name"]] + ([f"{row['parameters']:,}"] if params else []) + [row["description"]]
        )
        table.add_row(*cells)
    Console().print(table)
