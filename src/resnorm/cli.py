"""The ``resnorm`` command line. Thin: it parses, calls the library, and prints."""
from __future__ import annotations

import errno
import json
import sys

import click

from . import __version__
from .errors import UsageError

MAX_DEPTH = 10_000
"""The deepest --depth accepted (the ResNet paper's deepest is 1202): a deeper model is
built module by module in Python before any memory check can refuse it."""


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


# Option checks that run while the command line is parsed, before any work starts.

def _writable(kind: str):
    """A callback: the option's path can be written as a ``kind`` ('dir' or 'file')."""
    def check(ctx, param, value):
        if value is not None:
            from ._io import check_writable_path

            check_writable_path(param.opts[0], value, kind)
        return value
    return check


def _check_device(ctx, param, value):
    from ._checks import check_device

    return check_device(param.opts[0], value, available=True)


def _check_finite(ctx, param, value):
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


def _check_seeds(ctx, param, value):
    from .lab.study import check_seeds

    return value if value is None else check_seeds(param.opts[0], value)


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

    table = Table(title=f"Seed-text MLP on MNIST-1D: {epochs} epochs, width {width}, batch norm")
    for column in ("MLP", "parameters", "test acc", "train loss", "seconds"):
        table.add_column(column, justify="left" if column == "MLP" else "right")
    for r in runs:
        acc = "diverged" if r.diverged else f"{100 * r.test_acc:.1f}%"
        table.add_row(r.label, f"{r.parameters:,}", acc, f"{r.train_loss:.3f}", f"{r.seconds:.1f}")
    console = Console()
    console.print(table)
    for line in summarize(runs):
        console.print(line)


def _parse_shape(ctx, param, value):
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of sizes "
                                 f"(e.g. 3,32,32)") from None
    if min(shape) < 1:
        raise click.BadParameter(f"{value!r}: sizes must be >= 1")
    return shape


def _parse_verdicts(ctx, param, value):
    from .diagnostics import Verdict

    if not value:
        return ()
    accepted = [v.value for v in Verdict if v is not Verdict.HEALTHY]
    chosen = tuple(v.strip() for v in value.split(","))
    for v in chosen:
        if v not in accepted:
            raise click.BadParameter(f"{v!r} is not a verdict; accepted: {', '.join(accepted)}")
    return chosen


@cli.command(short_help="Gradient flow and signal propagation of a model at initialization.")
@click.argument("model", required=False)
@click.option("--factory", help="Your own model: 'package.module:function' returning an nn.Module.")
@click.option("--input-shape", callback=_parse_shape,
              help="Shape of one input sample, e.g. 3,32,32 (registered models know theirs).")
@click.option("--norm", help="Normalization kind (batch, layer, rms, group, instance, dyt, none).")
@click.option("--depth", type=click.IntRange(min=1, max=MAX_DEPTH),
              help="Depth of the model family.")
@click.option("--width", type=click.IntRange(min=1), help="Width (MLPs).")
@click.option("--placement", type=click.Choice(["pre", "post"]), help="Norm placement.")
@click.option("--residual/--plain", default=None, help="With or without skip connections.")
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--figure", "figure_path", type=click.Path(dir_okay=False),
              callback=_writable("file"), help="Write the figure (PNG or SVG by suffix).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              callback=_writable("file"), help="Write a self-contained HTML page.")
@click.option("--json", "as_json", is_flag=True, help="Print the diagnosis as JSON on stdout.")
@click.option("--fail-on", callback=_parse_verdicts, default="",
              help="Exit with status 1 when the verdict is one of these "
                   "(e.g. vanishing,exploding,non-finite).")
def diagnose(model, factory, input_shape, norm, depth, width, placement, residual, batch_size,
             seed, figure_path, html_path, as_json, fail_on) -> None:
    """Measure gradient flow and signal propagation of MODEL (a registered name, see
    'resnorm models') or of --factory's model, on one random batch, and say whether
    gradients vanish or explode, where, and what to change.

    \b
    Examples:
      resnorm diagnose mlp --depth 48 --plain --norm none
      resnorm diagnose resnet56 --norm layer --figure diag.png
      resnorm diagnose --factory mypkg.models:build --input-shape 3,32,32 --fail-on vanishing
    """
    from .diagnostics.runner import diagnose_named

    if (model is None) == (factory is None):
        raise _UserError("give a registered MODEL name or --factory package.module:function")
    overrides = {k: v for k, v in {"norm": norm, "depth": depth, "width": width,
                                   "placement": placement, "residual": residual}.items()
                 if v is not None}
    result = diagnose_named(model, factory=factory, input_shape=input_shape,
                            batch_size=batch_size, seed=seed, **overrides)
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
        console.print(result.table())
        console.print(result.summary())
        for remedy in result.remedies:
            console.print(f"  - {remedy}")
        for path in (figure_path, html_path):
            if path:
                console.print(f"wrote {path}")
    if result.verdict.value in fail_on:
        raise click.exceptions.Exit(1)


@cli.command(short_help="Run a study (default: depth) and write a report with plots.")
@click.argument("study", default="depth")
@click.option("--quick", is_flag=True, help="A small version of the study (a smoke test).")
@click.option("--seeds", type=click.IntRange(min=1), callback=_check_seeds,
              help="Seeds per grid point (at most 1000).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Worker processes [default: one per core].")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train each run with DistributedDataParallel over N processes (a torchrun "
                   "launch per run, runs one at a time; not with --workers). The study's "
                   "batch sizes stay global: each process takes batch/N.")
@click.option("--sync-bn", is_flag=True,
              help="With --nproc: synchronized batch norm in the runs that have batch norm, "
                   "so they train as in one process.")
@click.option("--device", default="cpu", show_default=True, callback=_check_device,
              help="cpu, cuda, cuda:N, mps or auto.")
@click.option("--data-root", type=click.Path(file_okay=False),
              help="Folder of the official files of a file-based data set (CIFAR-10).")
@click.option("--out", type=click.Path(file_okay=False), callback=_writable("dir"),
              help="Lab folder [default: runs/lab-STUDY]. Running again resumes it.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def lab(study, quick, seeds, workers, nproc, sync_bn, device, data_root, out, as_json,
        quiet) -> None:
    """Run STUDY, a built-in study (depth, init, batch-size, placement, cifar10-resnet) or a
    study TOML file, and
    write report.html, figures, results.csv and results.json into the lab folder.
    Finished runs are kept: running the same command again resumes an interrupted lab.
    """
    from rich.console import Console

    from .lab import run_lab
    from .lab.report import summarize_findings, summary_table

    result = run_lab(study, out, quick=quick, seeds=seeds, workers=workers, device=device,
                     data_root=data_root, progress=False if (quiet or as_json) else None,
                     nproc=nproc, sync_bn=sync_bn)
    counts = result.counts
    if as_json:
        click.echo(json.dumps({"report": str(result.report), "seconds": result.seconds,
                               "counts": counts, "results": result.results},
                              indent=2, default=str))
    else:
        console = Console(soft_wrap=True)
        console.print(summary_table(result.results, result.study.to_dict()))
        for line in summarize_findings(result.results, result.study.to_dict()):
            console.print(f"- {line}")
        console.print(f"{counts['runs']} runs: {counts['reused']} reused, {counts['trained']} "
                      f"run now; {counts['finished']} finished, {counts['diverged']} diverged, "
                      f"{counts['failed']} failed; {result.seconds:.0f} s")
        console.print(f"report: {result.report}")
    if counts["failed"]:
        failed = [r["run_id"] for r in result.results if r["status"] == "failed"]
        click.echo(f"resnorm: error: {counts['failed']} of {counts['runs']} runs failed "
                   f"({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); their "
                   f"errors are in {result.out}/runs/RUN/error.txt; run the same command "
                   f"again to retry them", err=True)
        raise click.exceptions.Exit(1)


@cli.command(short_help="Train a registered model on a data set, with checkpoints and resume.")
@click.option("--model", "model_name", required=True, help="A registered model (resnorm models).")
@click.option("--dataset", default="mnist1d", show_default=True,
              help="mnist1d, digits, mnist-sample, cifar10, cifar100, mnist, fashion-mnist, "
                   "synthetic.")
@click.option("--data-root", type=click.Path(file_okay=False),
              help="Folder holding a file-based data set's official files.")
@click.option("--samples", type=click.IntRange(min=10), help="MNIST-1D: samples to generate.")
@click.option("--norm", help="Normalization kind.")
@click.option("--depth", type=click.IntRange(min=1, max=MAX_DEPTH))
@click.option("--width", type=click.IntRange(min=1))
@click.option("--placement", type=click.Choice(["pre", "post"]))
@click.option("--residual/--plain", default=None)
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1, max=2**24), default=128,
              show_default=True,
              help="Samples per step, per process under --nproc or torchrun (PyTorch's "
                   "convention: the global batch is N x batch-size).")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=0.9, show_default=True)
@click.option("--nesterov", is_flag=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-2, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine",
              show_default=True)
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0)
@click.option("--augment", is_flag=True, help="Random crops with padding and flips (images).")
@click.option("--amp", is_flag=True, help="Mixed precision (bfloat16 on CPU, float16 on CUDA).")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the model.")
@click.option("--device", default="cpu", show_default=True, callback=_check_device,
              help="cpu, cuda, cuda:N, mps or auto.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=1),
              help="Also checkpoint every N steps (every epoch always).")
@click.option("--monitor-every", type=click.IntRange(min=1),
              help="Record gradient health every N steps into monitor.jsonl.")
@click.option("--out", type=click.Path(file_okay=False), callback=_writable("dir"),
              help="Run folder [default: runs/MODEL-DATASET-seedS]. Re-running resumes it.")
@click.option("--restart", is_flag=True, help="Start over even if --out holds a checkpoint.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train with DistributedDataParallel over N processes on this machine "
                   "(torchrun's launcher; gloo on CPU, nccl on CUDA). --batch-size is per "
                   "process, as in PyTorch: a step sees N x batch-size samples. For several "
                   "machines run torchrun -m resnorm train yourself.")
@click.option("--sync-bn", is_flag=True,
              help="Synchronized batch norm: statistics of the whole N x batch-size batch, "
                   "as in one process (without it each process normalizes its own slice). "
                   "An error if the model has no batch norm.")
@click.option("--dist-timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              callback=_check_finite,
              help="Seconds a worker waits for the others before failing (a hung worker).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or per-epoch lines.")
@click.pass_context
def train(ctx, model_name, dataset, data_root, samples, norm, depth, width, placement, residual,
          epochs, batch_size, optimizer, lr, momentum, nesterov, weight_decay, schedule,
          warmup_epochs, label_smoothing, augment, amp, use_compile, device, threads, seed,
          checkpoint_every, monitor_every, out, restart, nproc, sync_bn, dist_timeout, as_json,
          quiet) -> None:
    """Train MODEL on DATASET; per-epoch metrics go to OUT/metrics.jsonl and metrics.csv,
    checkpoints to OUT/checkpoint.pt. Run the same command again to resume an interrupted
    run from its last checkpoint (a finished run is not trained again).

    \b
    Examples:
      resnorm train --model mlp --depth 8 --width 256 --norm batch --dataset mnist1d
      resnorm train --model resnet1d_20 --dataset mnist1d
      resnorm train --model resnet20 --dataset digits
      resnorm train --model resnet20 --dataset cifar10 --data-root ~/data --optimizer sgd \\
          --lr 0.1 --weight-decay 1e-4 --schedule step --augment --epochs 182
      resnorm train --model resnet1d_20 --nproc 2 --sync-bn --batch-size 64
      torchrun --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500 \\
          --nproc-per-node 4 -m resnorm train --model resnet20 --device cuda --sync-bn
    """
    from .train import TrainConfig, prepare_run
    from .train.distributed import (
        check_nproc,
        init_distributed,
        launched_by_torchrun,
        shutdown_distributed,
        world,
    )

    in_worker = launched_by_torchrun()
    if nproc > 1 and in_worker:
        raise _UserError("--nproc starts the worker processes itself; under torchrun, give "
                         "torchrun --nproc-per-node instead")
    config = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                         momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         schedule=schedule, warmup_epochs=warmup_epochs,
                         label_smoothing=label_smoothing, augment=augment, amp=amp,
                         compile=use_compile, device=device, threads=threads, seed=seed,
                         checkpoint_every=checkpoint_every, sync_bn=sync_bn)
    if nproc > 1:
        check_nproc(nproc, device)
    data_options = {}
    if samples is not None:
        data_options["num_samples"] = samples
    if data_root is not None:
        data_options["root"] = data_root
    overrides = {k: v for k, v in {"norm": norm, "depth": depth, "width": width,
                                   "placement": placement, "residual": residual}.items()
                 if v is not None}
    run = prepare_run(model_name, dataset, model_options=overrides, dataset_options=data_options,
                      config=config, out=out, world_size=nproc if nproc > 1 else None)
    if nproc > 1:  # the data set is cached above, before the workers load it
        _launch_workers(ctx, nproc, device, run.out)
        return
    if in_worker:
        init_distributed(device, dist_timeout)
    rank = world()[0]
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet or as_json or rank > 0,  # chatter: stderr
                      soft_wrap=True)
    results = Console(soft_wrap=True, quiet=rank > 0)                   # results: stdout
    console.print(f"{run.data.summary()}\n{model_name}: "
                  f"{sum(p.numel() for p in run.model.parameters()):,} parameters; "
                  f"run folder {run.out}")
    if batch_size * world()[1] > len(run.data.x_train):
        console.print(f"note: --batch-size {batch_size} is more than the "
                      f"{len(run.data.x_train):,} training samples: every step takes the whole "
                      f"training set")

    def report(row: dict) -> None:
        console.print(f"epoch {row['epoch']:>3}/{epochs}: train loss {row['train_loss']:.4f} "
                      f"acc {row['train_acc']:.2%} | test loss {row['test_loss']:.4f} "
                      f"acc {row['test_acc']:.2%} | {row['seconds']:.1f} s")

    try:
        result = run.fit(restart=restart, monitor_every=monitor_every,
                         progress=None if not (quiet or as_json) else False, on_epoch=report)
    except Exception as exc:
        if in_worker:
            _worker_error(exc, rank)
        raise
    shutdown_distributed()
    if rank > 0:
        return
    summary = result.to_dict()
    if as_json:
        click.echo(json.dumps({**summary, "out": str(run.out)}, indent=2, default=str))
        return
    if result.resumed_from_step is not None:
        results.print(f"resumed from step {result.resumed_from_step} (same configuration: "
                      f"{run.out}/config.json)")
    if result.diverged:
        where = "test loss" if result.diverged_in == "eval" else "loss"
        results.print(f"[red]diverged[/] at step {result.diverged_at_step} ({where} not finite)")
    elif result.history:
        best = max(r["test_acc"] for r in result.history)
        results.print(f"final test accuracy {result.final['test_acc']:.2%} (best {best:.2%}) "
                      f"in {result.seconds:.0f} s")
    results.print(f"files: {run.out}/metrics.csv, metrics.jsonl, checkpoint.pt, result.json")


def _forwarded_args(ctx: click.Context, drop: tuple[str, ...]) -> list[str]:
    """The options of this command as the user gave them (defaults left out), for running
    the same command in worker processes."""
    from click.core import ParameterSource

    args: list[str] = []
    for param in ctx.command.params:
        if (not isinstance(param, click.Option) or param.name in drop
                or ctx.get_parameter_source(param.name) in (None, ParameterSource.DEFAULT)):
            continue
        value = ctx.params[param.name]
        if param.is_flag and param.secondary_opts:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            if value:
                args.append(param.opts[0])
        elif value is not None:
            args += [param.opts[0], repr(value) if isinstance(value, float) else str(value)]
    return args


def _launch_workers(ctx: click.Context, nproc: int, device: str, out) -> None:
    """``resnorm train ... --nproc N``: the same command in N torchrun workers, with the
    run folder the parent chose (so every worker uses it)."""
    from .train.distributed import LaunchError, launch_train

    args = [*_forwarded_args(ctx, drop=("nproc", "out")), "--out", str(out)]
    try:
        launch_train(args, nproc=nproc, device=device, out=out)
    except LaunchError as exc:
        click.echo(f"resnorm: error: {exc}", err=True)
        raise click.exceptions.Exit(exc.exit_code) from None


def _worker_error(exc: Exception, rank: int) -> None:
    """In a torchrun worker: one line for a lost peer, and the rank on other errors."""
    from .train.distributed import worker_error_line

    line = worker_error_line(exc, rank)
    if line is not None:
        click.echo(f"resnorm: error: {line}", err=True)
        raise click.exceptions.Exit(2 if isinstance(exc, UsageError) else 1) from None


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



def _parse_bench_shapes(ctx, param, value):
    if value is None:
        return None
    from .bench import parse_shapes

    try:
        return parse_shapes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _parse_list(choices):
    def parse(ctx, param, value):
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        for item in items:
            if item not in choices:
                raise click.BadParameter(f"{item!r} is not one of {', '.join(choices)}", ctx, param)
        if not items:
            raise click.BadParameter(f"give at least one of {', '.join(choices)}", ctx, param)
        return items
    return parse


@cli.command(short_help="Fused add+norm kernels vs eager, torch.compile and copy bandwidth.")
@click.option("--shapes", callback=_parse_bench_shapes,
              help="ROWSxHIDDEN,... [default: 4096x768,16384x1024,8192x4096; --quick: small]")
@click.option("--kinds", default="layer,rms", show_default=True,
              callback=_parse_list(("layer", "rms")))
@click.option("--regimes", default="fresh,reuse", show_default=True,
              callback=_parse_list(("fresh", "reuse")),
              help="Allocator regimes: fresh pages per large allocation (glibc default) "
                   "and/or reused memory.")
@click.option("--repeats", type=click.IntRange(min=1), default=7, show_default=True,
              help="Timed rounds per peer at 16M elements or more; smaller shapes get "
                   "proportionally more, up to 8x (their calls are short and noisier).")
@click.option("--no-compile", is_flag=True, help="Leave torch.compile out (it compiles per shape).")
@click.option("--no-end-to-end", is_flag=True, help="Leave the training-step rows out.")
@click.option("--quick", is_flag=True, help="Small shapes and models (a smoke test).")
@click.option("--out", type=click.Path(dir_okay=False), callback=_writable("file"),
              help="Write the results as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def bench(shapes, kinds, regimes, repeats, no_compile, no_end_to_end, quick, out, as_json,
          quiet) -> None:
    """Time resnorm's fused residual add + LayerNorm/RMSNorm against stock PyTorch eager
    and torch.compile, next to the memory-copy bandwidth of this machine, forward and
    forward+backward, and a training step of fused vs unfused models. Prints a table of
    milliseconds, effective GB/s, percent of copy bandwidth and speed-ups; --out writes JSON.
    """
    from rich.console import Console
    from rich.table import Table

    from . import bench as bench_module
    from ._io import atomic_open

    if shapes is None:
        shapes = bench_module.QUICK_SHAPES if quick else bench_module.DEFAULT_SHAPES
    console = Console(stderr=True, quiet=quiet or as_json)
    with console.status("benchmarking...") as status:
        result = bench_module.run(shapes=shapes, kinds=kinds, regimes=regimes, repeats=repeats,
                                  use_compile=not no_compile, end_to_end=not no_end_to_end,
                                  quick=quick, progress=lambda text: status.update(text))
    if out:
        with atomic_open(out, "w") as f:
            json.dump(result, f, indent=2)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    kernel = result["kernel"]
    table = Table(title=f"resnorm {result['resnorm']}, torch {result['torch']}, "
                        f"{result['threads']} threads; kernel: "
                        + ("compiled" if kernel["available"] else f"reference ({kernel['reason']})"),
                  box=None)
    for column in ("regime", "shape", "norm", "impl", "pass", "ms", "GB/s", "% copy",
                   "x eager", "x compile"):
        table.add_column(column, justify="right")
    for row in result["kernels"]:
        vs = [f"{row[key]:.2f}" if key in row else "" for key in ("x_vs_eager", "x_vs_compile")]
        table.add_row(row["regime"], row["shape"], row["kind"], row["impl"], row["pass"],
                      f"{row['ms']:.2f}", f"{row['GB/s']:.1f}", f"{row['pct_copy']:.0f}%", *vs)
    out_console = Console(width=max(Console().width, 120))  # a narrow pipe would cut cells
    out_console.print(table)
    if result["end_to_end"]:
        e2e = Table(title="training step (forward, backward, AdamW), medians", box=None)
        for column in ("model", "batch", "unfused ms", "fused ms", "speed-up"):
            e2e.add_column(column, justify="right")
        for row in result["end_to_end"]:
            e2e.add_row(row["model"], str(row["batch"]), f"{row['unfused_ms']:.2f}",
                        f"{row['fused_ms']:.2f}", f"{row['speedup']:.2f}x")
        out_console.print(e2e)

# Failures of the machine rather than of the user or of resnorm: one line, exit 1.
_ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO",
                                      "ENOTDIR", "EISDIR", "ENAMETOOLONG", "EMFILE", "ENOMEM")
    if hasattr(errno, name))


def _os_error_line(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def main(argv: list[str] | None = None) -> int:
    """Entry point. Usage errors (:class:`resnorm.errors.UsageError`, click's bad options)
    print one line on stderr and exit 2; a failure of the machine (disk full, read-only
    file system, permission denied) prints one line and exits 1; anything else is a bug in
    resnorm: its traceback, a line saying so, and exit 1."""
    try:
        # Without standalone mode click returns (rather than raises) the code of an Exit.
        code = cli.main(args=argv, prog_name="resnorm", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help())
        return 0
    except click.ClickException as exc:
        click.echo(f"resnorm: error: {exc.format_message()}", err=True)
        return 2
    except UsageError as exc:
        click.echo(f"resnorm: error: {_one_line(exc)}", err=True)
        return 2
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("resnorm: interrupted (run the same command again to resume: finished "
                   "work is kept)", err=True)
        return 130
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            return _internal_error(exc)
        click.echo(f"resnorm: error: {_os_error_line(exc)}", err=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - the one place that reports bugs
        return _internal_error(exc)
    return code if isinstance(code, int) else 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _internal_error(exc: BaseException) -> int:
    import traceback

    traceback.print_exception(type(exc), exc, exc.__traceback__, limit=-8, file=sys.stderr)
    click.echo(f"resnorm: internal error: {type(exc).__name__}: {_one_line(exc)}\n"
               f"This is a bug in resnorm (or in code it ran, such as a --factory model), not "
               f"a problem with your command; please report it with the traceback above.",
               err=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
