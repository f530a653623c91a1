"""What diagnose() costs at initialization, against one plain forward+backward of the same
model on the same batch (the issue's budget: 3x), measured side by side in one run.

    python bench/diagnose_cost.py [--repeats 7] [--threads 1] [--json out.json]
    python bench/diagnose_cost.py --trainability     # the 80 benchmark models instead
    python bench/diagnose_cost.py --clock cpu        # this thread's CPU time, not wall time
    python bench/diagnose_cost.py --stat min         # the fastest repeat, not the median

``--clock cpu`` times with ``time.thread_time`` (with ``--threads 1`` all of the work runs
in this thread): on a shared machine it leaves out the time spent waiting for a core,
which wall-clock medians do not; ``--stat min`` keeps the fastest repeat of each, the
least disturbed by other work.

For each model: the median seconds of ``F.cross_entropy(model(x), y).backward()`` and of
``diagnose(model, x, y)`` (hooks and float64 statistics on every layer output, the affine
check, the zero-gate probe when the model has zero parameters), and their ratio. The two
are measured in turns, at least ``--repeats`` pairs, and fast models more, until their
diagnoses add up to 0.3 s: one repeat of a 1 ms model is mostly noise on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from resnorm import create_model
from resnorm.diagnostics import diagnose

MODELS = (
    ("mlp depth 8 width 256", "mlp", {"depth": 8, "width": 256}, (40,)),
    (
        "mlp depth 48 (plain, no norm)",
        "mlp",
        {"depth": 48, "residual": False, "norm": "none"},
        (40,),
    ),
    ("resnet1d_20", "resnet1d_20", {}, (1, 40)),
    ("resnet20", "resnet20", {}, (3, 32, 32)),
    ("transformer", "transformer", {}, (40,)),
)


CLOCK = time.perf_counter
STAT = statistics.median


def _paired(step, diag, repeats: int, budget: float = 0.3) -> tuple[float, float]:
    """The plain step's and diagnose's times, measured in turns (a drift in the machine's
    speed touches both alike): at least ``repeats`` pairs, more for fast models until the
    diagnoses add up to ``budget`` seconds (at most 200 pairs); the statistic of each."""
    step(), diag()  # warm-up
    plain, diagnosed = [], []
    while len(plain) < repeats or (sum(diagnosed) < budget and len(plain) < 200):
        for fn, times in ((step, plain), (diag, diagnosed)):
            start = CLOCK()
            fn()
            times.append(CLOCK() - start)
    return STAT(plain), STAT(diagnosed)


def trainability_rows(repeats: int) -> list[dict]:
    """The same ratio on every model of bench/trainability (its fixed batch of 256)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "trainability"))
    from cases import CASES, build_case, fixed_batch

    diagnose(torch.nn.Linear(3, 2), torch.randn(4, 3), torch.randint(0, 2, (4,)))  # set-up
    rows = []
    for name in sorted(CASES):
        spec = build_case(name, 0)
        x, y = fixed_batch(spec.layout)
        model = spec.model

        def step():
            F.cross_entropy(model(x), y).backward()
            model.zero_grad(set_to_none=True)

        plain, diag = _paired(step, lambda: diagnose(model, x, y), repeats)
        rows.append(
            {
                "model": name,
                "fwd_bwd_ms": plain * 1e3,
                "diagnose_ms": diag * 1e3,
                "ratio": diag / plain,
            }
        )
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument(
        "--trainability",
        action="store_true",
        help="the 80 models of bench/trainability instead of the zoo's",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall-clock time (default) or this thread's CPU time",
    )
    parser.add_argument(
        "--stat", choices=("median", "min"), default="median", help="of the repeats"
    )
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    global CLOCK, STAT
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    STAT = min if args.stat == "min" else statistics.median
    torch.set_num_threads(args.threads)
    rows = trainability_rows(args.repeats) if args.trainability else []
    for label, name, options, shape in () if args.trainability else MODELS:
        torch.manual_seed(0)
        model = create_model(name, **options)
        x, y = torch.randn(args.batch_size, *shape), torch.randint(0, 10, (args.batch_size,))

        def step():
            F.cross_entropy(model(x), y).backward()
            model.zero_grad(set_to_none=True)

        plain, diag = _paired(step, lambda: diagnose(model, x, y), args.repeats)
        rows.append(
            {
                "model": label,
                "fwd_bwd_ms": plain * 1e3,
                "diagnose_ms": diag * 1e3,
                "ratio": diag / plain,
            }
        )
    print("| model | forward+backward (ms) | diagnose (ms) | ratio |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['fwd_bwd_ms']:.1f} | {r['diagnose_ms']:.1f} | {r['ratio']:.2f}x |"
        )
    ratios = sorted(r["ratio"] for r in rows)
    print(
        f"median {statistics.median(ratios):.2f}x, {sum(r > 3 for r in ratios)} of "
        f"{len(ratios)} above 3x, largest {ratios[-1]:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "threads": args.threads,
                    "clock": args.clock,
                    "stat": args.stat,
                    "torch": torch.__version__,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
