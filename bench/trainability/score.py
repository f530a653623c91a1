"""Score resnorm's verdicts and the peers' on the trainability benchmark, side by side.

For every case with a stable label in ``groundtruth.json`` (both seeds agree), on the
case built from seed 0 and one fixed MNIST-1D batch of 256:

- ``resnorm-init``: ``diagnose(model, x, y)`` at initialization;
- ``resnorm-steps``: ``diagnose(model, x, y, optimizer=<the case's>, steps=K)``;
- ``autotrainer``: the AUTOTRAINER gradient rules at initialization (peers.py);
- ``torchmortem``: torchmortem's CRITICAL findings over 50 training steps (peers.py;
  skipped, and said so, when it is not installed).

A verdict predicts one of the labels: healthy -> trains; vanishing -> fails_vanishing;
exploding / non-finite -> diverges; stalled / linear -> fails_other. The scores: the
confusion matrix, accuracy of "will it fail to train?", recall of failing cases, false
alarms on trainable cases, agreement on the cause (the exact label, among failing cases
caught), the cost per case, and for resnorm-init its cost over one plain
forward+backward of the same model and batch.

    python bench/trainability/score.py [--steps 20] [--no-torchmortem] [--cases A B ...]

Results go to ``scores.json`` beside this file (written atomically, per case, so an
interrupted run resumes) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cases import LABELS, build_case, fixed_batch, load_groundtruth  # noqa: E402
from peers import autotrainer, torchmortem_available, torchmortem_verdict  # noqa: E402

from resnorm.diagnostics import diagnose  # noqa: E402

SCORES_PATH = HERE / "scores.json"
TO_LABEL = {
    "healthy": "trains",
    "vanishing": "fails_vanishing",
    "exploding": "diverges",
    "non-finite": "diverges",
    "stalled": "fails_other",
    "linear": "fails_other",
}
METHODS = ("resnorm-steps", "resnorm-init", "autotrainer", "torchmortem")


def _plain_step_seconds(model, x, y, repeats: int = 3) -> float:
    """The median time of one plain forward+backward of the cross-entropy."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def _resnorm(name: str, steps: int) -> dict:
    out = {}
    spec = build_case(name, 0)
    x, y = fixed_batch(spec.layout)
    plain = _plain_step_seconds(spec.model, x, y)
    t0 = time.perf_counter()
    d = diagnose(spec.model, x, y)
    seconds = time.perf_counter() - t0
    out["resnorm-init"] = {
        "label": TO_LABEL[d.verdict.value],
        "verdict": d.verdict.value,
        "confidence": d.confidence,
        "cause": ", ".join(s.name for s in d.fired) or None,
        "seconds": seconds,
        "cost_vs_step": seconds / plain if plain > 0 else None,
    }
    spec = build_case(name, 0)
    t0 = time.perf_counter()
    optimizer = spec.make_optimizer(spec.model.parameters())
    d = diagnose(spec.model, x, y, optimizer=optimizer, steps=steps)
    out["resnorm-steps"] = {
        "label": TO_LABEL[d.verdict.value],
        "verdict": d.verdict.value,
        "confidence": d.confidence,
        "cause": ", ".join(s.name for s in d.fired) or None,
        "seconds": time.perf_counter() - t0,
    }
    return out


def score_case(name: str, steps: int, with_torchmortem: bool) -> dict:
    torch.manual_seed(0)
    out = _resnorm(name, steps)
    spec = build_case(name, 0)
    out["autotrainer"] = autotrainer(spec.model, fixed_batch(spec.layout))
    if with_torchmortem:
        spec = build_case(name, 0)
        out["torchmortem"] = torchmortem_verdict(spec.model, spec.layout, spec.make_optimizer)
    for record in out.values():
        record.pop("detail", None)
    return out


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def summarize(scores: dict, labels: dict) -> dict:
    """Per method: confusion matrix, accuracy, recall, false alarms, cause agreement,
    median seconds."""
    table = {}
    for method in METHODS:
        rows = [
            (labels[c], s[method]["label"], s[method]) for c, s in scores.items() if method in s
        ]
        if not rows:
            continue
        fails = [r for r in rows if r[0] != "trains"]
        trains = [r for r in rows if r[0] == "trains"]
        caught = [r for r in fails if r[1] != "trains"]
        confusion = {
            t: {p: sum(1 for r in rows if r[0] == t and r[1] == p) for p in LABELS} for t in LABELS
        }
        costs = [r[2]["cost_vs_step"] for r in rows if r[2].get("cost_vs_step") is not None]
        table[method] = {
            "cases": len(rows),
            "accuracy": sum((r[0] != "trains") == (r[1] != "trains") for r in rows) / len(rows),
            "recall": len(caught) / len(fails) if fails else None,
            "false_alarms": sum(r[1] != "trains" for r in trains),
            "trainable": len(trains),
            "cause_agreement": (sum(r[0] == r[1] for r in caught) / len(caught))
            if caught
            else None,
            "median_seconds": statistics.median(r[2]["seconds"] for r in rows),
            "confusion": confusion,
            "cost_vs_step": {"median": statistics.median(costs), "max": max(costs)}
            if costs
            else None,
        }
    return table


def markdown(table: dict) -> str:
    lines = [
        "| method | cases | accuracy | recall (fails caught) | false alarms on trainable "
        "| cause agreement | median s/case |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, t in table.items():
        lines.append(
            f"| {method} | {t['cases']} | {t['accuracy']:.1%} | {t['recall']:.1%} | "
            f"{t['false_alarms']}/{t['trainable']} | {t['cause_agreement']:.1%} | "
            f"{t['median_seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="resnorm-steps' optimizer steps")
    parser.add_argument("--no-torchmortem", action="store_true")
    parser.add_argument("--cases", nargs="*", help="only these cases")
    parser.add_argument("--restart", action="store_true", help="ignore scores.json")
    parser.add_argument("--out", type=Path, default=SCORES_PATH)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    truth = load_groundtruth()
    labels = {c: lab for c, lab in truth["labels"].items() if lab in LABELS}
    with_tm = not args.no_torchmortem and torchmortem_available() is not None
    config = {
        "steps": args.steps,
        "torchmortem": torchmortem_available() if with_tm else None,
        "torch": torch.__version__,
    }
    data = json.loads(args.out.read_text()) if args.out.exists() and not args.restart else {}
    if data.get("config") != config:
        data = {"config": config, "cases": {}}
    for name in args.cases or sorted(labels):
        if name in data["cases"]:
            continue
        data["cases"][name] = score_case(name, args.steps, with_tm)
        got = {m: r["label"] for m, r in data["cases"][name].items()}
        print(f"{name:<40} truth {labels[name]:<16} {got}", file=sys.stderr, flush=True)
        _write(args.out, data)
    scored = {c: s for c, s in data["cases"].items() if c in labels}
    data["summary"] = summarize(scored, labels)
    _write(args.out, data)
    print(markdown(data["summary"]))
    if not with_tm:
        print("\ntorchmortem: not installed (pip install --no-deps torchmortem plotly)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
