"""The lab runner's parallel workers against running the same grid one run after another.

Runs one study grid twice in one process tree, each into a fresh folder: with the
runner's plan (one worker process per core, the cores shared out as threads) and with a
single process using PyTorch's default thread count; reports wall times and the ratio.

    python bench/lab_parallel.py [--study depth] [--epochs 2] [--samples 4000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from resnorm._io import atomic_open
from resnorm.lab import load_study, plan_workers, run_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="depth")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    study = load_study(args.study).quick_version()
    study = dataclasses.replace(
        study,
        train={**study.train, "epochs": args.epochs},
        dataset_options={**study.dataset_options, "num_samples": args.samples},
    )
    runs = study.runs()
    workers, threads = plan_workers(len(runs))
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in (
            ("serial (1 process, default threads)", 1),
            (f"parallel ({workers} workers x {threads} threads)", workers),
        ):
            start = time.perf_counter()
            run_study(study, Path(tmp) / name.split()[0], workers=n, progress=False)
            timings[name] = time.perf_counter() - start
    serial, parallel = timings.values()
    result = {
        "study": study.name,
        "runs": len(runs),
        "epochs": args.epochs,
        "samples": args.samples,
        "default_threads": torch.get_num_threads(),
        "seconds": timings,
        "speedup": serial / parallel,
    }
    print(f"{study.name} grid, {len(runs)} runs of {args.epochs} epochs on {args.samples} samples")
    for name, seconds in timings.items():
        print(f"  {name:40s} {seconds:7.1f} s")
    print(f"  parallel speed-up over serial: {serial / parallel:.2f}x")
    if args.out:
        with atomic_open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
