"""``resnorm demo`` and ``resnorm lab``."""

from __future__ import annotations

import json

import click

from ._app import _check_device, _check_seeds, _parse_depths, _writable, cli


@cli.command(short_help="Residual vs plain MLPs on MNIST-1D (the starter job).")
@click.option(
    "--depths",
    default="1,16",
    show_default=True,
    callback=_parse_depths,
    help="Comma-separated numbers of residual blocks to compare.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--samples",
    type=click.IntRange(min=100),
    default=10_000,
    show_default=True,
    help="MNIST-1D samples to generate (80% train, 20% test).",
)
@click.option("--width", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(depths, epochs, samples, width, seed, as_json, quiet) -> None:
    """Train the seed texts' residual MLP and its plain twin on MNIST-1D and compare them."""
    from dataclasses import asdict

    from ..demo import run_demo, summarize

    runs = run_demo(
        depths=depths,
        epochs=epochs,
        num_samples=samples,
        width=width,
        seed=seed,
        progress=False if (quiet or as_json) else None,
    )
    if as_json:
        click.echo(
            json.dumps({"runs": [asdict(r) for r in runs], "summary": summarize(runs)}, indent=2)
        )
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


@cli.command(
    short_help="Test the seed texts' claims (default), or run a study, and write a report."
)
@click.argument("study", default="claims")
@click.option("--quick", is_flag=True, help="A small version of the study (a smoke test).")
@click.option(
    "--size",
    help="claims only: the study's size, default (~5 min on 2 cores), quick (= --quick) "
    "or full (5 seeds, more data and epochs) [default: default].",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    callback=_check_seeds,
    help="Seeds per grid point (at most 1000); for claims, per variant (at most 100).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Worker processes [default: one per core]. With --executor ray or submitit, "
    "each run's threads: this machine's cores / N, as a local lab would give it.",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train each run with DistributedDataParallel over N processes (a torchrun "
    "launch per run, runs one at a time; not with --workers). The study's "
    "batch sizes stay global: each process takes batch/N.",
)
@click.option(
    "--sync-bn",
    is_flag=True,
    help="With --nproc: synchronized batch norm in the runs that have batch norm, "
    "so they train as in one process.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    callback=_check_device,
    help="cpu, cuda, cuda:N, mps or auto.",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    help="Folder of the official files of a file-based data set (CIFAR-10).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    callback=_writable("dir"),
    help="Lab folder [default: runs/lab-STUDY]. Running again resumes it.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray", "submitit"]),
    default="local",
    show_default=True,
    help="Where the runs train: local worker processes, a Ray cluster (a task per run, "
    "or per stack of seeds) or a Slurm job array (submitit). --out must be a folder "
    "every node sees. Ray and submitit are extras: pip install 'resnorm[ray]'.",
)
@click.option(
    "--ray-address",
    help="With --executor ray: the cluster to join (an address or 'auto') "
    "[default: a local cluster started for the lab].",
)
@click.option("--slurm-partition", help="With --executor submitit: the Slurm partition.")
@click.option(
    "--slurm-time",
    type=click.IntRange(min=1),
    help="With --executor submitit: minutes each job may run; a job that runs out is "
    "requeued and resumes [default: 60].",
)
@click.option(
    "--stack/--no-stack",
    default=None,
    help="Train the runs that differ only in seed (claims: in seed and learning rate) "
    "together as one stacked computation, or every run alone [default: claims stacked; "
    "a grid study stacked on CUDA, alone on the CPU, where it measured 0.9-1.3x].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def lab(
    study,
    quick,
    size,
    seeds,
    workers,
    nproc,
    sync_bn,
    device,
    data_root,
    out,
    as_json,
    quiet,
    **how,
) -> None:
    """Run STUDY and write report.html, figures and the results (JSON, CSV) into the lab
    folder. STUDY is claims (the default: every claim of the seed texts, with seeds, tuned
    learning rates, intervals and a verdict each), a grid study (depth, init, batch-size,
    placement, cifar10-resnet) or a study TOML file. Finished runs are kept: running the
    same command again resumes an interrupted lab.
    """
    from ..lab.claims.protocol import is_protocol_file

    if study == "claims" or is_protocol_file(study):
        stack = how.pop("stack")
        _claims_only(nproc=nproc, sync_bn=sync_bn, data_root=data_root, **how)
        protocol = None if study == "claims" else study
        return _lab_claims(
            quick, size, seeds, workers, device, out, as_json, quiet, protocol, stack
        )
    if size is not None:
        raise click.UsageError(
            f"--size={size!r} applies to the claims study only, not to {study!r}"
        )

    _lab_grid(
        study, quick, seeds, workers, nproc, sync_bn, device, data_root, out, as_json, quiet, how
    )


def _lab_grid(
    study, quick, seeds, workers, nproc, sync_bn, device, data_root, out, as_json, quiet, how
) -> None:
    """``resnorm lab`` for a grid study (built-in or a TOML file)."""
    from rich.console import Console

    from ..lab import run_lab
    from ..lab.report import summarize_findings, summary_table

    result = run_lab(
        study,
        out,
        quick=quick,
        seeds=seeds,
        workers=workers,
        device=device,
        data_root=data_root,
        progress=False if (quiet or as_json) else None,
        nproc=nproc,
        sync_bn=sync_bn,
        **_run_options(**how),
    )
    counts = result.counts
    if as_json:
        click.echo(
            json.dumps(
                {
                    "report": str(result.report),
                    "seconds": result.seconds,
                    "counts": counts,
                    "results": result.results,
                },
                indent=2,
                default=str,
            )
        )
    else:
        console = Console(soft_wrap=True)
        console.print(summary_table(result.results, result.study.to_dict()))
        for line in summarize_findings(result.results, result.study.to_dict()):
            console.print(f"- {line}")
        console.print(
            f"{counts['runs']} runs: {counts['reused']} reused, {counts['trained']} "
            f"run now; {counts['finished']} finished, {counts['diverged']} diverged, "
            f"{counts['failed']} failed; {result.seconds:.0f} s"
        )
        console.print(f"report: {result.report}")
    if counts["failed"]:
        failed = [r["run_id"] for r in result.results if r["status"] == "failed"]
        click.echo(
            f"resnorm: error: {counts['failed']} of {counts['runs']} runs failed "
            f"({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); their "
            f"errors are in {result.out}/runs/RUN/error.txt; run the same command "
            f"again to retry them",
            err=True,
        )
        raise click.exceptions.Exit(1)


def _run_options(executor: str, stack: bool | None, **flags) -> dict:
    """run_lab's ``stack``, ``executor`` and ``executor_options`` from ``lab``'s
    --stack/--no-stack, --executor, --ray-address and --slurm-* flags (those given)."""
    options = {key: value for key, value in flags.items() if value is not None}
    return {"stack": stack, "executor": executor, "executor_options": options}


def _claims_only(nproc, sync_bn, data_root, executor, **flags) -> None:
    """What the claims study does not take, as a usage error naming the option."""
    given = {
        "--nproc": nproc != 1,
        "--sync-bn": sync_bn,
        "--data-root": data_root is not None,
        "--executor": executor != "local",
        **{f"--{k.replace('_', '-')}": v is not None for k, v in flags.items()},
    }
    for option, used in given.items():
        if used:
            raise click.UsageError(
                f"{option} is not supported by the claims study (it trains on MNIST-1D in "
                f"local worker processes); use it with a grid study (depth, init, batch-size, "
                f"placement, cifar10-resnet or a study file)"
            )


def _lab_claims(quick, size, seeds, workers, device, out, as_json, quiet, protocol, stack) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..lab.claims import run_claims
    from ..lab.claims.report import claims_table

    if quick and size not in (None, "quick"):
        raise click.UsageError(f"--quick and --size={size!r} contradict each other; give one")
    size = "quick" if quick else (size or "default")
    results = run_claims(
        size,
        out,
        protocol=protocol,
        workers=workers,
        seeds=seeds,
        device=device,
        progress=False if (quiet or as_json) else None,
        stack=stack,
    )
    counts = results["counts"]
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str))
    else:
        table = Table(title=f"claims ({size}): verdicts", show_lines=False)
        for column in ("#", "claim", "verdict", "effect"):
            table.add_column(column, overflow="fold")
        for row in claims_table(results):
            table.add_row(row["id"], row["title"], row["verdict"], row["effect"])
        console = Console(soft_wrap=True)
        console.print(table)
        console.print(
            f"{counts['jobs']} runs: {counts['reused']} reused, {counts['trained']} run now, "
            f"{counts['diverged']} diverged, {counts['failed']} failed; {results['seconds']:.0f} s"
        )
        console.print(f"report: {results['report']}")
    if counts["failed"]:
        click.echo(
            f"resnorm: error: {counts['failed']} of {counts['jobs']} runs failed (their errors "
            f"are in claims.json); run the same command again to retry them",
            err=True,
        )
        raise click.exceptions.Exit(1)
