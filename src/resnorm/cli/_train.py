"""``resnorm train``: parse, compose (resnorm.train.prepare_run), print."""

from __future__ import annotations

import json

import click

from ..errors import UsageError
from ._app import MAX_DEPTH, _check_device, _check_finite, _UserError, _writable, cli

# The options of train that are TrainConfig fields of the same name (--compile: use_compile).
_CONFIG_OPTIONS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "label_smoothing",
    "augment",
    "amp",
    "device",
    "threads",
    "seed",
    "checkpoint_every",
    "sync_bn",
)
# The options that override the model's own defaults, when given.
_MODEL_OPTIONS = ("norm", "depth", "width", "placement", "residual")


@cli.command(short_help="Train a registered model on a data set, with checkpoints and resume.")
@click.option("--model", "model_name", required=True, help="A registered model (resnorm models).")
@click.option(
    "--dataset",
    default="mnist1d",
    show_default=True,
    help="mnist1d, digits, mnist-sample, cifar10, cifar100, mnist, fashion-mnist, synthetic.",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    help="Folder holding a file-based data set's official files.",
)
@click.option("--samples", type=click.IntRange(min=10), help="MNIST-1D: samples to generate.")
@click.option("--norm", help="Normalization kind.")
@click.option("--depth", type=click.IntRange(min=1, max=MAX_DEPTH))
@click.option("--width", type=click.IntRange(min=1))
@click.option("--placement", type=click.Choice(["pre", "post"]))
@click.option("--residual/--plain", default=None)
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1, max=2**24),
    default=128,
    show_default=True,
    help="Samples per step, per process under --nproc or torchrun (PyTorch's "
    "convention: the global batch is N x batch-size).",
)
@click.option(
    "--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option(
    "--momentum", type=click.FloatRange(0, 1, max_open=True), default=0.9, show_default=True
)
@click.option("--nesterov", is_flag=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-2, show_default=True)
@click.option(
    "--schedule",
    type=click.Choice(["cosine", "step", "constant"]),
    default="cosine",
    show_default=True,
)
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0)
@click.option("--augment", is_flag=True, help="Random crops with padding and flips (images).")
@click.option("--amp", is_flag=True, help="Mixed precision (bfloat16 on CPU, float16 on CUDA).")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the model.")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    callback=_check_device,
    help="cpu, cuda, cuda:N, mps or auto.",
)
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    help="Also checkpoint every N steps (every epoch always).",
)
@click.option(
    "--monitor-every",
    type=click.IntRange(min=1),
    help="Record gradient health every N steps into monitor.jsonl.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    callback=_writable("dir"),
    help="Run folder [default: runs/MODEL-DATASET-seedS]. Re-running resumes it.",
)
@click.option("--restart", is_flag=True, help="Start over even if --out holds a checkpoint.")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train with DistributedDataParallel over N processes on this machine "
    "(torchrun's launcher; gloo on CPU, nccl on CUDA). --batch-size is per "
    "process, as in PyTorch: a step sees N x batch-size samples. For several "
    "machines run torchrun -m resnorm train yourself.",
)
@click.option(
    "--sync-bn",
    is_flag=True,
    help="Synchronized batch norm: statistics of the whole N x batch-size batch, "
    "as in one process (without it each process normalizes its own slice). "
    "An error if the model has no batch norm.",
)
@click.option(
    "--dist-timeout",
    type=click.FloatRange(min=1),
    default=600,
    show_default=True,
    callback=_check_finite,
    help="Seconds a worker waits for the others before failing (a hung worker).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or per-epoch lines.")
@click.pass_context
def train(ctx: click.Context, **options) -> None:
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
    from ..train import TrainConfig, prepare_run
    from ..train.distributed import check_nproc, launched_by_torchrun

    in_worker = launched_by_torchrun()
    nproc, device = options["nproc"], options["device"]
    if nproc > 1 and in_worker:
        raise _UserError(
            "--nproc starts the worker processes itself; under torchrun, give "
            "torchrun --nproc-per-node instead"
        )
    config = TrainConfig(
        compile=options["use_compile"], **{name: options[name] for name in _CONFIG_OPTIONS}
    )
    if nproc > 1:
        check_nproc(nproc, device)
    data_options = {"num_samples": options["samples"], "root": options["data_root"]}
    run = prepare_run(
        options["model_name"],
        options["dataset"],
        model_options={k: options[k] for k in _MODEL_OPTIONS if options[k] is not None},
        dataset_options={k: v for k, v in data_options.items() if v is not None},
        config=config,
        out=options["out"],
        world_size=nproc if nproc > 1 else None,
    )
    if nproc > 1:  # the data set is cached above, before the workers load it
        _launch_workers(ctx, nproc, device, run.out)
        return
    _fit_here(run, in_worker, options)


def _fit_here(run, in_worker: bool, options: dict) -> None:
    """Train ``run`` in this process, alone or as one torchrun worker, with the per-epoch
    lines on stderr and the outcome on stdout (rank 0 only)."""
    from rich.console import Console

    from ..train.distributed import init_distributed, shutdown_distributed, world

    quiet, as_json, epochs = options["quiet"], options["as_json"], options["epochs"]
    if in_worker:
        init_distributed(options["device"], options["dist_timeout"])
    rank = world()[0]
    console = Console(
        stderr=True,
        quiet=quiet or as_json or rank > 0,  # chatter: stderr
        soft_wrap=True,
    )
    results = Console(soft_wrap=True, quiet=rank > 0)  # results: stdout
    _print_start(console, run, options["batch_size"] * world()[1])

    def report(row: dict) -> None:
        console.print(
            f"epoch {row['epoch']:>3}/{epochs}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.2%} | test loss {row['test_loss']:.4f} "
            f"acc {row['test_acc']:.2%} | {row['seconds']:.1f} s"
        )

    try:
        result = run.fit(
            restart=options["restart"],
            monitor_every=options["monitor_every"],
            progress=None if not (quiet or as_json) else False,
            on_epoch=report,
        )
    except Exception as exc:
        if in_worker:
            _worker_error(exc, rank)
        raise
    shutdown_distributed()
    if rank > 0:
        return
    _print_result(result, run.out, as_json, results)


def _print_start(console, run, global_batch: int) -> None:
    console.print(
        f"{run.data.summary()}\n{run.model_name}: "
        f"{sum(p.numel() for p in run.model.parameters()):,} parameters; "
        f"run folder {run.out}"
    )
    if global_batch > len(run.data.x_train):
        console.print(
            f"note: the batch of {global_batch} is more than the "
            f"{len(run.data.x_train):,} training samples: every step takes the whole "
            f"training set"
        )


def _print_result(result, out, as_json: bool, results) -> None:
    """The run's outcome on stdout: JSON, or a few lines."""
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "out": str(out)}, indent=2, default=str))
        return
    if result.resumed_from_step is not None:
        results.print(
            f"resumed from step {result.resumed_from_step} (same configuration: {out}/config.json)"
        )
    if result.diverged:
        where = "test loss" if result.diverged_in == "eval" else "loss"
        results.print(f"[red]diverged[/] at step {result.diverged_at_step} ({where} not finite)")
    elif result.history:
        best = max(r["test_acc"] for r in result.history)
        results.print(
            f"final test accuracy {result.final['test_acc']:.2%} (best {best:.2%}) "
            f"in {result.seconds:.0f} s"
        )
    results.print(f"files: {out}/metrics.csv, metrics.jsonl, checkpoint.pt, result.json")


def _forwarded_args(ctx: click.Context, drop: tuple[str, ...]) -> list[str]:
    """The options of this command as the user gave them (defaults left out), for running
    the same command in worker processes."""
    from click.core import ParameterSource

    args: list[str] = []
    for param in ctx.command.params:
        if (
            not isinstance(param, click.Option)
            or param.name in drop
            or ctx.get_parameter_source(param.name) in (None, ParameterSource.DEFAULT)
        ):
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
    from ..train.distributed import LaunchError, launch_train

    args = [*_forwarded_args(ctx, drop=("nproc", "out")), "--out", str(out)]
    try:
        launch_train(args, nproc=nproc, device=device, out=out)
    except LaunchError as exc:
        click.echo(f"resnorm: error: {exc}", err=True)
        raise click.exceptions.Exit(exc.exit_code) from None


def _worker_error(exc: Exception, rank: int) -> None:
    """In a torchrun worker: one line for a lost peer, and the rank on other errors."""
    from ..train.distributed import worker_error_line

    line = worker_error_line(exc, rank)
    if line is not None:
        click.echo(f"resnorm: error: {line}", err=True)
        raise click.exceptions.Exit(2 if isinstance(exc, UsageError) else 1) from None
