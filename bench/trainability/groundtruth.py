"""Ground truth for the trainability benchmark: train every case of cases.py for a fixed
budget on MNIST-1D with a plain loop (torch only, no resnorm) and label the outcome.

    python bench/trainability/groundtruth.py --seed 0          # one seed, every case
    python bench/trainability/groundtruth.py --seed 1 --cases mlp_relu_d8_he_sgd ...
    python bench/trainability/groundtruth.py --summary         # labels, stability, counts

Each (case, seed) trains ``STEPS`` steps of batch ``BATCH`` (cross-entropy, no clipping,
no schedule, no weight decay but AdamW's own) from ``torch.manual_seed(seed)``; the seed
sets the initialization and the batch order, the data are fixed (mnist1d's defaults). The
record of each run goes into groundtruth.json beside this file at once (atomic: a
temporary file then os.replace, under a lock so that two seeds can run side by side), and
a rerun skips the (case, seed) pairs already there (``--force`` retrains them). When every
seed in ``SEEDS`` is recorded for a case, its label is the seeds' common label, or
``unstable`` when they differ (scoring excludes unstable cases).

Labels, in this order (the first rule that holds):

1. ``diverges``: a non-finite training loss at any step (training stops there), or the
   final loss (mean training loss of the last 10% of steps) above ``DIVERGE_FACTOR`` times
   the initial loss (the first batch's loss at initialization).
2. ``trains``: final test accuracy (1,000 held-out samples, after the last step) at least
   ``TRAINS_ACC``.
3. ``fails_vanishing``: the first layers are frozen: the first weight layer's relative
   change ||theta_T - theta_0|| / max(||theta_0||, ||theta_T||) is below
   ``FROZEN_RATIO`` times the last weight layer's (three orders of magnitude).
4. ``fails_other``: everything else (trained too slowly, underfits, collapsed, ...).

Why 40%: chance is 10%; on MNIST-1D a linear classifier (logistic regression) reaches
about 32%, an MLP about 68% and a CNN about 94% (Greydanus 2020, the mnist1d README's
table). 40% is out of reach of any linear model, so reaching it needs a network whose
hidden layers learned; and it is far below what the trained MLPs and CNNs reach here, so a
network that trains is not near the line. The measured accuracies (groundtruth.json)
bear this out: see README.md for the gap around 40%.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, GROUNDTRUTH_PATH, build_case, load_mnist1d, to_layout  # noqa: E402

STEPS = 400  # training steps per run
BATCH = 128
EVAL_POINTS = 10  # test accuracy and mean training loss at every 10% of the steps
SEEDS = (0, 1)
TRAINS_ACC = 0.40
DIVERGE_FACTOR = 2.0
FROZEN_RATIO = 1e-3
LABEL_COLUMNS = ("trains", "diverges", "fails_vanishing", "fails_other", "unstable")

RULES = {
    "order": ["diverges", "trains", "fails_vanishing", "fails_other"],
    "diverges": f"non-finite training loss at any step, or final loss (mean of the last 10% "
    f"of steps) > {DIVERGE_FACTOR} x the initial loss (first batch, at init)",
    "trains": f"final test accuracy >= {TRAINS_ACC} (chance 0.10; logistic regression "
    f"~0.32, MLP ~0.68, CNN ~0.94 on MNIST-1D)",
    "fails_vanishing": f"not trains, and rel_change(first weight layer) < {FROZEN_RATIO} x "
    f"rel_change(last weight layer), rel_change = ||theta_T - theta_0|| / "
    f"max(||theta_0||, ||theta_T||) over the layer's parameters",
    "fails_other": "none of the above",
    "unstable": "the seeds' labels differ; excluded from scoring",
    "thresholds": {
        "trains_acc": TRAINS_ACC,
        "diverge_factor": DIVERGE_FACTOR,
        "frozen_ratio": FROZEN_RATIO,
    },
}


# --------------------------------------------------------------------------- layers


def first_last_layers(model: nn.Module) -> tuple[str, str]:
    """Names of the first and last modules (in registration order, which every case keeps
    equal to the forward order) that hold a weight with 2 or more dimensions themselves:
    the first and last weight layers (a Linear, Conv1d, GRU/LSTM, attention or embedding)."""
    names = [
        name
        for name, m in model.named_modules()
        if name and any(p.dim() >= 2 for p in m.parameters(recurse=False))
    ]
    return names[0], names[-1]


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float | None:
    if not (torch.isfinite(before).all() and torch.isfinite(after).all()):
        return None
    denom = max(before.norm().item(), after.norm().item(), 1e-12)
    return (after - before).norm().item() / denom


# --------------------------------------------------------------------------- training


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    logits = model(x)
    model.train(was)
    if not torch.isfinite(logits).all():
        return float("nan")
    return (logits.argmax(1) == y).float().mean().item()


def train_case(name: str, seed: int, steps: int = STEPS, data: dict | None = None) -> dict:
    """Train case ``name`` from ``seed`` for ``steps`` steps; the run's record."""
    data = load_mnist1d() if data is None else data
    spec = build_case(name, seed)
    model = spec.model
    model.train()
    x_train = to_layout(torch.from_numpy(data["x"]), spec.layout)
    y_train = torch.from_numpy(data["y"])
    x_test = to_layout(torch.from_numpy(data["x_test"]), spec.layout)
    y_test = torch.from_numpy(data["y_test"])
    first, last = first_last_layers(model)
    modules = dict(model.named_modules())
    first0, last0 = _flat(modules[first]), _flat(modules[last])
    opt = spec.make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    n = len(y_train)
    every = max(steps // EVAL_POINTS, 1)

    t0, c0 = time.perf_counter(), time.process_time()
    losses: list[float] = []
    curve: list[dict] = []
    perm, pos = torch.randperm(n, generator=gen), 0
    nonfinite_step = None
    for step in range(steps):
        if pos + BATCH > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + BATCH]
        pos += BATCH
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        value = loss.item()
        losses.append(value)
        if not math.isfinite(value):
            nonfinite_step = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % every == 0:
            curve.append(
                {
                    "step": step + 1,
                    "loss": float(np.mean(losses[-every:])),
                    "test_acc": accuracy(model, x_test, y_test),
                }
            )
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    test_acc = accuracy(model, x_test, y_test)
    accs = [c["test_acc"] for c in curve if math.isfinite(c["test_acc"])]
    tail = losses[-max(len(losses) // 10, 1) :]
    final_loss = float(np.mean(tail)) if nonfinite_step is None else float("nan")
    rel_first = relative_change(first0, _flat(modules[first]))
    rel_last = relative_change(last0, _flat(modules[last]))
    record = {
        "seed": seed,
        "steps": steps,
        "steps_done": len(losses) - (nonfinite_step is not None),
        "nonfinite_step": nonfinite_step,
        "initial_loss": losses[0],
        "final_loss": final_loss,
        "min_loss": float(np.nanmin(losses)) if any(map(math.isfinite, losses)) else None,
        "test_acc": test_acc,
        "best_test_acc": max(accs) if accs else None,
        "train_acc": accuracy(model, x_train[:1000], y_train[:1000]),
        "first_layer": first,
        "last_layer": last,
        "rel_change_first": rel_first,
        "rel_change_last": rel_last,
        "curve": curve,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
    }
    record["label"], record["why"] = label(record)
    return _json_safe(record)


def label(r: dict) -> tuple[str, str]:
    """The label of one run's record, by the rules in the module docstring."""
    if r["nonfinite_step"] is not None:
        return "diverges", f"non-finite loss at step {r['nonfinite_step']}"
    if r["final_loss"] > DIVERGE_FACTOR * r["initial_loss"]:
        return "diverges", (
            f"final loss {r['final_loss']:.3g} > {DIVERGE_FACTOR} x initial {r['initial_loss']:.3g}"
        )
    acc = r["test_acc"]
    if math.isfinite(acc) and acc >= TRAINS_ACC:
        return "trains", f"test accuracy {acc:.3f} >= {TRAINS_ACC}"
    first, last = r["rel_change_first"], r["rel_change_last"]
    if first is not None and last is not None and last > 0 and first < FROZEN_RATIO * last:
        return "fails_vanishing", (
            f"test accuracy {acc:.3f}; first layer changed {first:.2e},"
            f" last {last:.2e} (ratio {first / last:.1e})"
        )
    return "fails_other", f"test accuracy {acc:.3f}; first/last change {first}/{last}"


def _nan(rec: dict) -> dict:
    """A stored record with JSON's nulls back to NaN where label() reads floats."""
    return {
        **rec,
        **{
            k: (math.nan if rec[k] is None else rec[k])
            for k in ("final_loss", "test_acc", "initial_loss")
        },
    }


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- the JSON file


@contextlib.contextmanager
def _locked(path: Path):
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _versions() -> dict:
    from importlib.metadata import version

    return {
        "torch": torch.__version__,
        "mnist1d": version("mnist1d"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def finalize(doc: dict) -> dict:
    """Fill the header, the per-case tags and labels (stable label or ``unstable``)."""
    doc["benchmark"] = (
        "trainability: plain torch.nn cases trained on MNIST-1D, labelled from the outcome"
    )
    doc["command"] = (
        "python bench/trainability/groundtruth.py --seed 0 & "
        "python bench/trainability/groundtruth.py --seed 1 & wait"
    )
    doc["budget"] = {
        "steps": STEPS,
        "batch": BATCH,
        "loss": "cross-entropy",
        "data": "mnist1d make_dataset(get_dataset_args()): 4000 train / 1000 test, seed 42",
        "seeds": list(SEEDS),
        "threads": "torch.set_num_threads(1)",
    }
    doc["rules"] = RULES
    doc["versions"] = _versions()
    results = doc.setdefault("results", {})
    doc["cases"] = {name: build_case(name, 0).tags for name in CASES}
    labels = {}
    for name in CASES:
        runs = results.get(name, {})
        if all(str(s) in runs for s in SEEDS):
            got = {runs[str(s)]["label"] for s in SEEDS}
            labels[name] = got.pop() if len(got) == 1 else "unstable"
    doc["labels"] = labels
    doc["results"] = {k: results[k] for k in CASES if k in results}  # the cases' order
    head = ("benchmark", "command", "budget", "rules", "versions", "labels", "cases")
    return {**{k: doc[k] for k in head}, "results": doc["results"]}


def record(path: Path, name: str, seed: int, rec: dict) -> None:
    with _locked(path):
        doc = _read(path)
        doc.setdefault("results", {}).setdefault(name, {})[str(seed)] = rec
        _write(path, finalize(doc))


def summary(path: Path) -> str:
    doc = finalize(_read(path))
    lines = []
    for name in CASES:
        runs = doc["results"].get(name, {})
        cells = []
        for s in SEEDS:
            r = runs.get(str(s))
            cells.append(
                f"{r['label']:<16} {r['test_acc'] or 0:5.3f} {r['seconds']:6.1f}s"
                if r
                else f"{'-':<16} {'':5} {'':7}"
            )
        lines.append(
            f"{name:<40} {doc['cases'][name]['intended']:<16} "
            + " | ".join(cells)
            + f"  -> {doc['labels'].get(name, '-')}"
        )
    from collections import Counter

    lines.append("labels: " + str(dict(Counter(doc["labels"].values()))))
    unstable = [k for k, v in doc["labels"].items() if v == "unstable"]
    lines.append(f"unstable ({len(unstable)}): {', '.join(unstable) or 'none'}")
    for s in SEEDS:
        rs = [runs[str(s)] for runs in doc["results"].values() if str(s) in runs]
        lines.append(
            f"seed {s}: {len(rs)} runs, {sum(r['seconds'] for r in rs):.0f} s wall, "
            f"{sum(r.get('cpu_seconds', 0) for r in rs):.0f} s CPU of training"
        )
    return "\n".join(lines)


def markdown(path: Path) -> str:
    """README tables: labels per family, then one row per case."""
    from collections import Counter

    doc = finalize(_read(path))
    cols = list(LABEL_COLUMNS)
    fams = list(dict.fromkeys(t["family"] for t in doc["cases"].values()))
    count = Counter((doc["cases"][k]["family"], v) for k, v in doc["labels"].items())
    out = ["| family | " + " | ".join(cols) + " | all |", "|---|" + "---:|" * (len(cols) + 1)]
    for fam in fams + ["all"]:
        row = [
            sum(n for (f, lab), n in count.items() if lab == c and fam in (f, "all")) for c in cols
        ]
        out.append(f"| {fam} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    out += [
        "",
        "| case | depth | act | norm | residual | init | optimizer, lr | label | "
        "test acc (seeds) | intended |",
        "|---|---:|---|---|---|---|---|---|---|---|",
    ]
    for name, t in doc["cases"].items():
        runs = doc["results"].get(name, {})
        accs = " / ".join(f"{(runs[str(s)]['test_acc'] or 0):.2f}" for s in SEEDS if str(s) in runs)
        out.append(
            f"| {name} | {t['depth']} | {t['activation']} | {t['norm']} | "
            f"{t['residual']} | {t['init']} | {t['optimizer']} {t['lr']:g} | "
            f"{doc['labels'].get(name, '-')} | {accs} | {t['intended']} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seed", type=int, action="append", help=f"seed(s) to run (default: {list(SEEDS)})"
    )
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=GROUNDTRUTH_PATH)
    parser.add_argument("--force", action="store_true", help="retrain recorded runs")
    parser.add_argument("--summary", action="store_true", help="print the table and exit")
    parser.add_argument("--markdown", action="store_true", help="print README.md's tables and exit")
    parser.add_argument(
        "--relabel",
        action="store_true",
        help="recompute every stored run's label with the current rules",
    )
    parser.add_argument(
        "--dry", action="store_true", help="train and print, do not write (e.g. for other --steps)"
    )
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.out))
        return 0
    if args.relabel:
        with _locked(args.out):
            doc = _read(args.out)
            for runs in doc.get("results", {}).values():
                for rec in runs.values():
                    rec["label"], rec["why"] = label(_nan(rec))
            _write(args.out, finalize(doc))
        print(summary(args.out))
        return 0
    if args.markdown:
        print(markdown(args.out))
        return 0
    torch.set_num_threads(1)
    names = args.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases: {unknown}")
    data = load_mnist1d()
    for seed in args.seed or SEEDS:
        for name in names:
            done = _read(args.out).get("results", {}).get(name, {}).get(str(seed))
            if done and not args.force and not args.dry:
                continue
            rec = train_case(name, seed, args.steps, data)
            print(
                f"seed {seed} {name:<40} {rec['label']:<16} acc {rec['test_acc'] or 0:.3f} "
                f"loss {rec['initial_loss'] or float('nan'):.3g}->"
                f"{rec['final_loss'] or float('nan'):.3g} "
                f"first/last {rec['rel_change_first']}/{rec['rel_change_last']} "
                f"{rec['seconds']:.1f}s",
                flush=True,
            )
            if not args.dry:
                record(args.out, name, seed, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
