"""What a Monitor recording every step costs on the CPU, with its statistics (gradient
norms, update norms) computed by the compiled CPU kernel or by stock PyTorch ops.

Two measurements in one process, each interleaving its variants so that machine noise hits
them alike, reported as medians and ratios:

- the statistics step alone: ``monitor.step()`` on fixed gradients (every=1, no dead-unit
  hooks), ``Monitor(compiled=True)`` and ``Monitor(compiled=False)`` in turn, ``--repeats``
  times each;
- a whole training step (SGD) without a Monitor and with it (every=1 with the compiled
  kernel and with stock ops, every=1 without dead units, every=10), in ``--rounds``
  interleaved rounds of ``--steps`` steps.

It also reports how far apart the two kinds' records are over a few training steps, and
each kind's gradient norms from float64 ones. ``--model mlp`` is the lab's residual MLP
(``--depth``, ``--width``, batch norm); ``--model resnet56`` the CIFAR ResNet-56 on
32 x 32 images. Writes JSON with ``--out``.

    python bench/monitor_overhead.py [--model mlp] [--depth 8] [--width 256] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resnorm import create_model
from resnorm._io import atomic_open
from resnorm.diagnostics import Monitor

KINDS = {"compiled kernel": True, "stock ops": False}
# The Monitor options of the training-step variants; "every=1" takes the compiled kernel.
VARIANTS = {
    "every=1": {"every": 1},
    "every=1, stock ops": {"every": 1, "compiled": False},
    "every=1, no dead units": {"every": 1, "track_dead_units": False},
    "every=10": {"every": 10},
}


def _train_steps(model, optimizer, x, y, steps: int, monitors=()) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        for monitor in monitors:
            monitor.step(loss)
        times.append(time.perf_counter() - start)
    return times


def _statistics_step(model, repeats: int) -> dict[str, float]:
    """Median seconds of one recorded ``monitor.step()`` per kind, on the present grads."""
    monitors = {
        name: Monitor(model, track_dead_units=False, compiled=compiled)
        for name, compiled in KINDS.items()
    }
    times: dict[str, list[float]] = {name: [] for name in KINDS}
    for name, monitor in monitors.items():  # warm-up
        for _ in range(10):
            monitor.step()
    for _ in range(repeats):
        for name, monitor in monitors.items():
            start = time.perf_counter()
            monitor.step()
            times[name].append(time.perf_counter() - start)
            monitor.records.clear()
    for monitor in monitors.values():
        monitor.close()
    return {name: statistics.median(t) for name, t in times.items()}


def _largest_difference(model, optimizer, x, y) -> dict[str, float]:
    """Largest relative differences over 5 training steps: between the kinds' records, and
    of each kind's gradient norms from float64 ones."""
    monitors = {
        name: Monitor(model, track_dead_units=False, compiled=compiled)
        for name, compiled in KINDS.items()
    }
    worst = {
        "grad_norm, stock vs kernel": 0.0,
        "update_ratio, stock vs kernel": 0.0,
        **{f"grad_norm, {name} vs float64": 0.0 for name in KINDS},
    }

    def note(key, value, exact):
        if exact:  # None (a zero weight) or 0 on both sides has nothing to compare
            worst[key] = max(worst[key], abs(value - exact) / exact)

    for _ in range(5):
        _train_steps(model, optimizer, x, y, 1, monitors.values())
        records = {name: monitor.records[-1] for name, monitor in monitors.items()}
        kernel, stock = records.values()
        for group in ("grad_norm", "update_ratio"):
            for layer, value in kernel[group].items():
                note(f"{group}, stock vs kernel", stock[group][layer], value)
        first = next(iter(monitors.values()))
        for layer, weight in zip(first.layer_names, first._weights):
            exact = float(weight.grad.double().norm())
            for name, record in records.items():
                note(f"grad_norm, {name} vs float64", record["grad_norm"][layer], exact)
    for monitor in monitors.values():
        monitor.close()
    return worst


def _train_step_times(model, optimizer, x, y, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds of a training step without a Monitor and with each variant's."""
    times: dict[str, list[float]] = {"no monitor": [], **{name: [] for name in VARIANTS}}
    for _ in range(rounds):  # interleaved, so drifts in machine load hit all alike
        times["no monitor"] += _train_steps(model, optimizer, x, y, steps)
        for name, options in VARIANTS.items():
            with Monitor(model, **options) as monitor:
                times[name] += _train_steps(model, optimizer, x, y, steps, [monitor])
    return {name: statistics.median(t) for name, t in times.items()}


def _model(args):
    if args.model == "mlp":
        return (
            create_model("mlp", depth=args.depth, width=args.width, norm="batch"),
            f"mlp depth={args.depth} width={args.width} norm=batch",
        )
    return create_model(args.model), args.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "resnet56"])
    parser.add_argument("--depth", type=int, default=8, help="mlp only")
    parser.add_argument("--width", type=int, default=256, help="mlp only")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=300, help="statistics steps per kind")
    parser.add_argument("--steps", type=int, default=40, help="steps per round and variant")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, description = _model(args)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, *model.example_input_shape)
    y = torch.randint(0, 10, (args.batch,))
    _train_steps(model, optimizer, x, y, 3)  # warm-up; leaves gradients for the next part
    record = _statistics_step(model, args.repeats)
    difference = _largest_difference(model, optimizer, x, y)

    step = _train_step_times(model, optimizer, x, y, args.rounds, args.steps)

    kernel, stock = KINDS
    result = {
        "model": description,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "statistics_step_us": {name: 1e6 * t for name, t in record.items()},
        "statistics_step_ratio_stock_to_kernel": record[stock] / record[kernel],
        "train_step_ms": {name: 1e3 * t for name, t in step.items()},
        "train_step_ratio_to_no_monitor": {
            name: t / step["no monitor"] for name, t in step.items()
        },
        "train_step_ratio_stock_to_kernel": step[f"every=1, {stock}"] / step["every=1"],
        "largest_relative_difference": difference,
        "repeats": args.repeats,
        "train_steps_each": args.rounds * args.steps,
    }
    print(f"{description}, batch {args.batch}, {result['threads']} threads, medians")
    print(
        f"  statistics step ({args.repeats} each): "
        + ", ".join(f"{name} {1e6 * t:.0f} us" for name, t in record.items())
        + f"; stock/kernel {result['statistics_step_ratio_stock_to_kernel']:.2f}"
    )
    print(f"  training step ({args.rounds * args.steps} each):")
    for name, t in step.items():
        print(
            f"    {name:26s} {1e3 * t:8.2f} ms   ratio to no monitor "
            f"{result['train_step_ratio_to_no_monitor'][name]:.3f}"
        )
    print(f"    every=1, stock/kernel {result['train_step_ratio_stock_to_kernel']:.3f}")
    print(
        "  largest relative difference: "
        + ", ".join(f"{name} {value:.1e}" for name, value in difference.items())
    )
    if args.out:
        with atomic_open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
