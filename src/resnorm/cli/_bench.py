"""``resnorm bench``."""

from __future__ import annotations

import json

import click

from ._app import _parse_bench_shapes, _parse_list, _writable, cli


@cli.command(short_help="Fused add+norm kernels vs eager, torch.compile and copy bandwidth.")
@click.option(
    "--shapes",
    callback=_parse_bench_shapes,
    help="ROWSxHIDDEN,... [default: 4096x768,16384x1024,8192x4096; --quick: small]",
)
@click.option(
    "--kinds", default="layer,rms", show_default=True, callback=_parse_list(("layer", "rms"))
)
@click.option(
    "--regimes",
    default="fresh,reuse",
    show_default=True,
    callback=_parse_list(("fresh", "reuse")),
    help="Allocator regimes: fresh pages per large allocation (glibc default) "
    "and/or reused memory.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=7,
    show_default=True,
    help="Timed rounds per peer at 16M elements or more; smaller shapes get "
    "proportionally more, up to 8x (their calls are short and noisier).",
)
@click.option("--no-compile", is_flag=True, help="Leave torch.compile out (it compiles per shape).")
@click.option("--no-end-to-end", is_flag=True, help="Leave the training-step rows out.")
@click.option("--quick", is_flag=True, help="Small shapes and models (a smoke test).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    callback=_writable("file"),
    help="Write the results as JSON here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def bench(
    shapes, kinds, regimes, repeats, no_compile, no_end_to_end, quick, out, as_json, quiet
) -> None:
    """Time resnorm's fused residual add + LayerNorm/RMSNorm against stock PyTorch eager
    and torch.compile, next to the memory-copy bandwidth of this machine, forward and
    forward+backward, and a training step of fused vs unfused models. Prints a table of
    milliseconds, effective GB/s, percent of copy bandwidth and speed-ups; --out writes JSON.
    """
    from rich.console import Console

    from .. import bench as bench_module
    from .._io import atomic_open

    if shapes is None:
        shapes = bench_module.QUICK_SHAPES if quick else bench_module.DEFAULT_SHAPES
    console = Console(stderr=True, quiet=quiet or as_json)
    with console.status("benchmarking...") as status:
        result = bench_module.run(
            shapes=shapes,
            kinds=kinds,
            regimes=regimes,
            repeats=repeats,
            use_compile=not no_compile,
            end_to_end=not no_end_to_end,
            quick=quick,
            progress=lambda text: status.update(text),
        )
    if out:
        with atomic_open(out, "w") as f:
            json.dump(result, f, indent=2)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    out_console = Console(width=max(Console().width, 120))  # a narrow pipe would cut cells
    out_console.print(_kernel_table(result))
    if result["end_to_end"]:
        out_console.print(_end_to_end_table(result["end_to_end"]))


def _kernel_table(result: dict):
    """The kernel rows: ms, GB/s, % of copy bandwidth and resnorm's speed-ups."""
    from rich.table import Table

    kernel = result["kernel"]
    table = Table(
        title=f"resnorm {result['resnorm']}, torch {result['torch']}, "
        f"{result['threads']} threads; kernel: "
        + ("compiled" if kernel["available"] else f"reference ({kernel['reason']})"),
        box=None,
    )
    for column in (
        "regime",
        "shape",
        "norm",
        "impl",
        "pass",
        "ms",
        "GB/s",
        "% copy",
        "x eager",
        "x compile",
    ):
        table.add_column(column, justify="right")
    for row in result["kernels"]:
        vs = [f"{row[key]:.2f}" if key in row else "" for key in ("x_vs_eager", "x_vs_compile")]
        table.add_row(
            row["regime"],
            row["shape"],
            row["kind"],
            row["impl"],
            row["pass"],
            f"{row['ms']:.2f}",
            f"{row['GB/s']:.1f}",
            f"{row['pct_copy']:.0f}%",
            *vs,
        )
    return table


def _end_to_end_table(rows: list[dict]):
    """The training steps of fused vs unfused models."""
    from rich.table import Table

    e2e = Table(title="training step (forward, backward, AdamW), medians", box=None)
    for column in ("model", "batch", "unfused ms", "fused ms", "speed-up"):
        e2e.add_column(column, justify="right")
    for row in rows:
        e2e.add_row(
            row["model"],
            str(row["batch"]),
            f"{row['unfused_ms']:.2f}",
            f"{row['fused_ms']:.2f}",
            f"{row['speedup']:.2f}x",
        )
    return e2e
