"""The lab's training speed, side by side in one process: a grid of runs (MLPs of the depth
study, seeds x learning rates per grid point) trained (a) by a plain PyTorch loop per run
as a user would write it, (b) by resnorm's training loop one run at a time (the lab's path
with stacking off), (c) stacked (resnorm.train.fit_stacked); runs per minute, GFLOP/s
against torch.mm's and torch.bmm's rate at the same shapes measured in the same run, peak
memory, and how far the stacked runs end from the same runs trained alone.

    python bench/lab_speed.py [--epochs 1] [--seeds 4] [--lrs 1e-3,3e-3,1e-2] [--threads 1]
                              [--points mlp:8:batch,mlp:24:none] [--device cuda]
                              [--json out.json]

A point is ``model:depth:norm[:width]`` (width 128 unless given); ``of mm`` compares
with ``torch.mm`` at 128^3. A narrow point (``mlp:8:batch:16``) shows the regime of a
device whose steps are bound by per-operation overhead (a GPU on these small models).

The loops train the same runs (same models, data order and optimizer: fused AdamW) on
MNIST-1D (10,000 samples, 8,000 for training); each loop evaluates on the test set after
every epoch as the lab does. Timings are one pass each, on the same machine, back to back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import torch
import torch.nn.functional as F

from resnorm.data import load_dataset
from resnorm.train import TrainConfig, fit, fit_stacked, model_for_data
from resnorm.train.batches import _batches


def _models(name: str, depth: int, norm: str, seeds: list[int], data, device="cpu", width=128):
    models = []
    options = {"width": width} if name == "mlp" else {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = model_for_data(name, data, depth=depth, norm=norm, residual=True, **options)
        models.append(model.to(device))
    return models


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _plain_loop(model, data, config: TrainConfig) -> None:
    """What a user writes: AdamW, a shuffled batch at a time, an evaluation each epoch."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
    )
    for epoch in range(config.epochs):
        model.train()
        for index in _batches(len(data.x_train), config.batch_size, config.seed, epoch):
            index = index.to(data.x_train.device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            F.cross_entropy(model(data.x_test), data.y_test)


def _linear_flops(model, data, config: TrainConfig) -> float:
    """Forward + backward FLOPs of the model's matrix products for one run's training:
    6 x samples x in x out per linear layer (the rest is a few percent)."""
    per_sample = sum(
        6 * m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )
    return per_sample * len(data.x_train) * config.epochs


def _rate(fn, flops: float, device: str, repeats: int = 50) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return flops / sorted(times)[len(times) // 2] / 1e9


def _max_gap(a_models, b_models) -> float:
    gaps = []
    for a, b in zip(a_models, b_models):
        for x, y in zip(a.state_dict().values(), b.state_dict().values()):
            if x.is_floating_point():
                gaps.append(((x - y).abs().max() / y.abs().max().clamp_min(1e-3)).item())
    return max(gaps)


def _warm_up(name: str, depth: int, norm: str, data, configs, device: str, width: int) -> None:
    """Each loop once on 256 samples, untimed: first-call costs are not training."""
    small = dataclasses.replace(data, x_train=data.x_train[:256], y_train=data.y_train[:256])
    short = [dataclasses.replace(c, epochs=1) for c in configs]
    models = _models(name, depth, norm, [c.seed for c in short], small, device, width)
    _plain_loop(models[0], small.to(device), short[0])
    fit(models[0], small, short[0], progress=False)
    fit_stacked(models, small, short)


def _loops(name, depth, norm, data, configs, device, width):
    """The three ways to train the runs, each on its own fresh copies of the models."""
    seeds = [c.seed for c in configs]
    plain, alone, stacked = (
        _models(name, depth, norm, seeds, data, device, width) for _ in range(3)
    )
    on_device = data.to(device)

    def plain_loops() -> None:
        for model, config in zip(plain, configs):
            _plain_loop(model, on_device, config)

    finals: dict[str, list[dict]] = {}

    def one_at_a_time() -> None:
        results = [
            fit(model, data, config, progress=False) for model, config in zip(alone, configs)
        ]
        finals["alone"] = [r.final for r in results]

    def together() -> None:
        finals["stacked"] = [r.final for r in fit_stacked(stacked, data, configs)]

    loops = {
        "plain loop": plain_loops,
        "resnorm, alone": one_at_a_time,
        "resnorm, stacked": together,
    }
    return loops, plain, (alone, stacked, finals)


def point_rows(
    point: str, data, seeds: list[int], lrs: list[float], epochs: int, device: str = "cpu"
) -> dict:
    name, depth, norm, *rest = point.split(":")  # name:depth:norm[:width]
    depth, width = int(depth), int(rest[0]) if rest else 128
    configs = [
        TrainConfig(epochs=epochs, seed=seed, lr=lr, warmup_epochs=0.0, device=device)
        for seed in seeds
        for lr in lrs
    ]
    _warm_up(name, depth, norm, data, configs, device, width)
    loops, plain, (alone, stacked, finals) = _loops(name, depth, norm, data, configs, device, width)
    timings, memory = {}, {}
    for loop, train in loops.items():
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        start = time.perf_counter()
        train()
        _sync(device)
        timings[loop] = time.perf_counter() - start
        if torch.device(device).type == "cuda":
            memory[loop] = torch.cuda.max_memory_allocated() / 2**20
    runs = len(configs)
    flops = _linear_flops(plain[0], data, configs[0]) * runs
    return {
        "point": point,
        "runs": runs,
        "seconds": timings,
        "runs_per_minute": {k: 60 * runs / v for k, v in timings.items()},
        "gflops": {k: flops / v / 1e9 for k, v in timings.items()},
        "stacked_vs_alone_max_relative_gap": _max_gap(stacked, alone),
        "stacked_vs_alone_max_gap": {
            key: max(abs(s[key] - a[key]) for s, a in zip(finals["stacked"], finals["alone"]))
            for key in ("train_loss", "test_loss", "test_acc")
        },
        "peak_gpu_mib": memory,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--points", default="mlp:8:batch,mlp:24:none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist1d", num_samples=10_000)
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = list(range(args.seeds))
    runs = len(seeds) * len(lrs)
    device = args.device
    a, b = (torch.randn(128, 128, device=device) for _ in range(2))
    sa, sb = (torch.randn(runs, 128, 128, device=device) for _ in range(2))
    peers = {
        "mm 128^3 GFLOP/s": _rate(lambda: torch.mm(a, b), 2 * 128**3, device, 300),
        f"bmm {runs}x128^3 GFLOP/s": _rate(lambda: torch.bmm(sa, sb), runs * 2 * 128**3, device),
    }
    rows = [point_rows(p, data, seeds, lrs, args.epochs, device) for p in args.points.split(",")]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "device": device,
        "threads": args.threads,
        "epochs": args.epochs,
        "peers": peers,
        "rows": rows,
        "peak_rss_mib": peak_mib,
    }
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _print(report: dict) -> None:
    print(", ".join(f"{k} {v:.1f}" for k, v in report["peers"].items()))
    mm = report["peers"]["mm 128^3 GFLOP/s"]
    print(f"{'point':<16} {'loop':<18} {'runs/min':>9} {'GFLOP/s':>8} {'of mm':>6}  x vs alone")
    for row in report["rows"]:
        alone = row["runs_per_minute"]["resnorm, alone"]
        for loop, per_minute in row["runs_per_minute"].items():
            gflops = row["gflops"][loop]
            print(
                f"{row['point']:<16} {loop:<18} {per_minute:9.2f} {gflops:8.1f} "
                f"{gflops / mm:6.0%}  {per_minute / alone:.2f}"
            )
        print(
            f"{'':<16} stacked vs alone: weights within "
            f"{row['stacked_vs_alone_max_relative_gap']:.1e} (relative to max(|w|, 1e-3)); "
            f"final metrics within "
            + ", ".join(f"{k} {v:.1e}" for k, v in row["stacked_vs_alone_max_gap"].items())
        )
    for row in report["rows"]:
        if row["peak_gpu_mib"]:
            peaks = ", ".join(f"{k} {v:.0f}" for k, v in row["peak_gpu_mib"].items())
            print(f"{row['point']}: peak GPU memory (MiB): {peaks}")
    print(f"peak RSS of this process: {report['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
