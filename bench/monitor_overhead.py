"""What a Monitor recording every step costs, on the lab's residual MLP on the CPU.

Runs the same training loop with and without ``Monitor(every=1)`` in one process,
alternating rounds so that machine noise hits both alike, and reports the median step
times and their ratio. Writes JSON with ``--out``.

    python bench/monitor_overhead.py [--depth 8] [--width 256] [--batch 128] [--rounds 7]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resnorm import create_model
from resnorm._io import atomic_open
from resnorm.diagnostics import Monitor


def _steps(model, optimizer, x, y, steps: int, monitor: Monitor | None) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(loss)
        times.append(time.perf_counter() - start)
    return times


VARIANTS = {
    "every=1": {"every": 1},
    "every=1, no dead units": {"every": 1, "track_dead_units": False},
    "every=10": {"every": 10},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="steps per round and variant")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = create_model("mlp", depth=args.depth, width=args.width, norm="batch")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(args.batch, 40), torch.randint(0, 10, (args.batch,))
    _steps(model, optimizer, x, y, 10, None)  # warm-up
    times: dict[str, list[float]] = {"no monitor": [], **{name: [] for name in VARIANTS}}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):  # interleaved, so drifts in machine load hit all alike
            times["no monitor"] += _steps(model, optimizer, x, y, args.steps, None)
            for name, options in VARIANTS.items():
                with Monitor(model, path=Path(tmp) / "monitor.jsonl", **options) as monitor:
                    times[name] += _steps(model, optimizer, x, y, args.steps, monitor)
    base = statistics.median(times["no monitor"])
    rows = {name: {"median_step_ms": 1e3 * statistics.median(t),
                   "ratio_to_no_monitor": statistics.median(t) / base}
            for name, t in times.items()}
    result = {"model": f"mlp depth={args.depth} width={args.width} norm=batch",
              "batch": args.batch, "threads": torch.get_num_threads(),
              "steps_each": len(times["no monitor"]), "variants": rows}
    print(f"{result['model']}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{len(times['no monitor'])} steps each, medians")
    for name, row in rows.items():
        print(f"  {name:24s} {row['median_step_ms']:8.2f} ms/step   "
              f"ratio {row['ratio_to_no_monitor']:.3f}")
    if args.out:
        with atomic_open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
