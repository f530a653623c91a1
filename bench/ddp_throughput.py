"""Data-parallel training throughput: one process against N processes on this machine.

Each measurement is a fresh launch through torchrun's launcher (resnorm.train.distributed
.launch, what ``resnorm train --nproc`` uses) of ``fit`` for two epochs on a synthetic
data set: the first epoch warms up, the second is timed (samples / second, start-up and
evaluation excluded). The global batch is the same in every configuration: one process
with batch G and all the cores as threads, N processes with batch G / N and the cores
shared out (with and without synchronized batch norm). Configurations are interleaved,
``--repeats`` times, and medians reported with the ratio to one process.

    python bench/ddp_throughput.py [--nproc 2] [--repeats 3] [--steps 40] [--out ddp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from resnorm._io import atomic_open

WORKLOADS = {
    # name: (model, overrides, global batch)
    "mlp depth 8 width 256, batch norm": ("mlp", {"depth": 8, "width": 256, "norm": "batch"}, 128),
    "resnet1d_20, batch norm": ("resnet1d_20", {}, 128),
}


def timed_epoch(
    model_name: str, overrides: dict, batch_size: int, steps: int, sync_bn: bool
) -> float:
    """In each worker: train two epochs of ``steps`` global batches; the second epoch's
    seconds (rank 0's value is the one used)."""
    from resnorm.data import load_dataset
    from resnorm.train import TrainConfig, fit, model_for_data
    from resnorm.train.distributed import init_distributed, shutdown_distributed, world

    init_distributed("cpu")
    world_size = world()[1]
    data = load_dataset(
        "synthetic",
        shape=(40,),
        num_classes=10,
        train_samples=batch_size * world_size * steps,
        test_samples=64,
    )
    torch.manual_seed(0)
    model = model_for_data(model_name, data, **overrides)
    config = TrainConfig(epochs=2, batch_size=batch_size, sync_bn=sync_bn)
    result = fit(model, data, config, progress=False)
    shutdown_distributed()
    return result.history[1]["seconds"]


def main() -> None:
    from resnorm.train.distributed import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="Timed steps per measurement.")
    parser.add_argument("--out", help="Write the results as JSON.")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    n = args.nproc
    setups = {
        "1 process": (1, False),
        f"{n} processes, sync BN": (n, True),
        f"{n} processes, no sync": (n, False),
    }
    results = {
        "cores": cores,
        "nproc": n,
        "steps": args.steps,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "workloads": {},
    }
    print(
        f"DDP throughput on {cores} CPU cores (gloo), samples/s of training, median of "
        f"{args.repeats}; same global batch"
    )
    for name, (model_name, overrides, global_batch) in WORKLOADS.items():
        trials: dict[str, list[float]] = {setup: [] for setup in setups}
        for _ in range(args.repeats):
            for setup, (nproc, sync_bn) in setups.items():
                seconds = launch(
                    timed_epoch,
                    (model_name, overrides, global_batch // nproc, args.steps, sync_bn),
                    nproc=nproc,
                )[0]
                trials[setup].append(global_batch * args.steps / seconds)
        medians = {setup: statistics.median(v) for setup, v in trials.items()}
        base = medians["1 process"]
        results["workloads"][name] = {
            "global_batch": global_batch,
            "samples_per_second": trials,
            "median": medians,
            "ratio_to_one_process": {setup: m / base for setup, m in medians.items()},
        }
        print(f"\n{name}, global batch {global_batch}")
        for setup, median in medians.items():
            print(f"  {setup:26s} {median:9,.0f} samples/s   {median / base:5.2f}x")
    if args.out:
        with atomic_open(args.out, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
