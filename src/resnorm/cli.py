"""The ``resnorm`` command line. Thin: it parses, calls the library, and prints."""
from __future__ import annotations

import json
import sys

import click

from . import __version__


class _UserError(click.ClickException):
    exit_code = 2


def _parse_depths(ctx, param, value: str) -> tuple[int, ...]:
    try:
        depths = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers "
                                 f"(e.g. 1,16)") from None
    if not depths or min(depths) < 1:
        raise click.BadParameter(f"{value!r}: depths must be integers >= 1")
    return depths


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="resnorm")
def cli() -> None:
    """Residual connections and normalization for PyTorch: building blocks, diagnostics
    and experiments."""


@cli.command(short_help="Residual vs plain MLPs on MNIST-1D (the starter job).")
@click.option("--depths", default="1,16", show_default=True, callback=_parse_depths,
              help="Comma-separated numbers of residual blocks to compare.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--samples", type=click.IntRange(min=100), default=10_000, show_default=True,
              help="MNIST-1D samples to generate (80% train, 20% test).")
@click.option("--width", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(depths, epochs, samples, width, seed, as_json, quiet) -> None:
    """Train the seed texts' residual MLP and its plain twin on MNIST-1D and compare them."""
    from dataclasses import asdict

    from .demo import run_demo, summarize

    runs = run_demo(depths=depths, epochs=epochs, num_samples=samples, width=width, seed=seed,
                    progress=False if (quiet or as_json) else None)
    if as_json:
        click.echo(json.dumps({"runs": [asdict(r) for r in runs],
                               "summary": summarize(runs)}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MNIST-1D, {epochs} epochs, width {width}, batch norm (post)")
    for column in ("model", "parameters", "test acc", "final train loss", "seconds"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in runs:
        acc = "diverged" if r.diverged else f"{100 * r.test_acc:.1f}%"
        table.add_row(r.label, f"{r.parameters:,}", acc, f"{r.train_loss:.3f}", f"{r.seconds:.1f}")
    console = Console()
    console.print(table)
    for line in summarize(runs):
        console.print(line)


@cli.command(name="models", short_help="List the registered models.")
@click.argument("pattern", default="*")
@click.option("--params", is_flag=True, help="Build each model and count its parameters.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def models_command(pattern, params, as_json) -> None:
    """List the registered models (shell-style PATTERN, e.g. 'resnet*')."""
    from .models import create_model, get_model_entry, list_models

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
        cells = [row["name"]] + ([f"{row['parameters']:,}"] if params else []) + [row["description"]]
        table.add_row(*cells)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage errors and bad values print one line on stderr and exit 2."""
    try:
        cli.main(args=argv, prog_name="resnorm", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help())
        return 0
    except click.ClickException as exc:
        click.echo(f"resnorm: error: {exc.format_message()}", err=True)
        return 2
    except (ValueError, TypeError) as exc:
        click.echo(f"resnorm: error: {exc}", err=True)
        return 2
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("resnorm: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
