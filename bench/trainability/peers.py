"""The peers that resnorm's verdicts are scored beside, on the same cases.

* :func:`autotrainer`: the AUTOTRAINER rules (Zhang, Zhai, Ma, Shen: "AUTOTRAINER: An
  Automatic DNN Training Problem Detection and Repair System", ICSE 2021), as in the
  authors' code (github.com/shiningrain/AUTOTRAINER, ``AutoTrainer/utils/monitor.py``:
  ``gradient_issue``, ``gradient_message_summary``, ``IssueMonitor.determine``) with its
  default parameters, applied at initialization on one batch.
* :func:`torchmortem_verdict`: torchmortem (PyPI ``torchmortem``, an optional extra:
  ``pip install --no-deps torchmortem plotly``; its other requirements, jinja2 and numpy,
  are resnorm's own) watching the case's first ``steps`` (50) training steps; its CRITICAL
  findings mean "will fail".

Both return ``{"verdict": "trains" | "fails", "label": one of cases.LABELS (the predicted
outcome, "trains" when no problem is found), "cause": the peer's own name for it or None,
"seconds": ..., "detail": {...}}``. Neither imports resnorm.

    python bench/trainability/peers.py [CASE ...]     # both peers on the cases, a table
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, build_case, fixed_batch, load_mnist1d, to_layout  # noqa: E402
from groundtruth import first_last_layers  # noqa: E402

# --------------------------------------------------------------------------- AUTOTRAINER

# The defaults of AUTOTRAINER's IssueMonitor (monitor.py's default_param, also the paper's
# configuration): beta_1, beta_2: vanishing; beta_3: exploding; gamma: dying ReLU. zeta,
# eta, delta and Theta are the loss/accuracy-history thresholds (oscillating loss, slow
# convergence, the satisfactory accuracy), which need training history and are not
# applied at initialization.
AUTOTRAINER_PARAMS = {
    "beta_1": 1e-3,
    "beta_2": 1e-4,
    "beta_3": 70.0,
    "gamma": 0.7,
    "zeta": 0.03,
    "eta": 0.2,
    "delta": 0.01,
    "Theta": 0.7,
}

# AUTOTRAINER's problem -> the benchmark's label. A dying ReLU stops the gradient to every
# layer below it: the first layers are frozen, as in "fails_vanishing".
AUTOTRAINER_TO_LABEL = {
    "explode": "diverges",
    "vanish": "fails_vanishing",
    "relu": "fails_vanishing",
}


def _layer_grad_norm(module: nn.Module) -> float:
    """L2 norm of the gradients of a layer's kernels (its parameters with >= 2 dims)."""
    grads = [p.grad.reshape(-1) for p in module.parameters() if p.dim() >= 2 and p.grad is not None]
    return torch.cat(grads).norm().item() if grads else 0.0


def autotrainer(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], params: dict | None = None
) -> dict:
    """AUTOTRAINER's gradient rules on one batch, at initialization.

    One forward/backward of the cross-entropy on ``batch`` (train mode; the gradients are
    cleared again, the weights untouched). As in ``gradient_issue``:

    * ``gra_rate`` = ||g(first layer's kernel)|| / ||g(last layer's kernel)||;
    * vanishing: ``gra_rate < beta_1`` and ||g(first kernel)|| < ``beta_2``;
    * exploding: ``gra_rate > beta_3``; a NaN/Inf loss or gradient is "explode" outright;
    * dying ReLU: the fraction of exactly-zero gradient entries over all parameters
      >= ``gamma``.

    As in ``IssueMonitor.determine`` one problem is named, in the order relu, explode,
    vanish. AUTOTRAINER names these problems only when the accuracy has not reached
    Theta or stopped improving; with no training history at initialization that condition
    is taken as met (the rules judge the gradients alone). Adaptation to PyTorch: the
    Keras code pairs the weights as (kernel, bias) per layer; here a layer's "kernel" is
    its parameters with >= 2 dimensions, and the first and last layers are
    ``groundtruth.first_last_layers`` (the first and last modules holding such a weight).
    """
    p = dict(AUTOTRAINER_PARAMS, **(params or {}))
    t0 = time.perf_counter()
    was = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    first, last = first_last_layers(model)
    modules = dict(model.named_modules())
    g_first, g_last = _layer_grad_norm(modules[first]), _layer_grad_norm(modules[last])
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    total = sum(g.numel() for g in grads)
    zero_ratio = sum(int((g == 0).sum()) for g in grads) / max(total, 1)
    nan = not math.isfinite(loss.item()) or any(not torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    model.train(was)

    gra_rate = g_first / g_last if g_last > 0 else (math.inf if g_first > 0 else math.nan)
    features = {
        "vanish_gradient": gra_rate < p["beta_1"] and g_first < p["beta_2"],
        "explode_gradient": gra_rate > p["beta_3"],
        "died_relu": zero_ratio >= p["gamma"],
        "nan_gradient": nan,
    }
    if nan:
        cause = "explode"
    elif features["died_relu"]:
        cause = "relu"
    elif features["explode_gradient"]:
        cause = "explode"
    elif features["vanish_gradient"]:
        cause = "vanish"
    else:
        cause = None
    return {
        "verdict": "fails" if cause else "trains",
        "label": AUTOTRAINER_TO_LABEL[cause] if cause else "trains",
        "cause": cause,
        "seconds": time.perf_counter() - t0,
        "detail": {
            "gra_rate": gra_rate,
            "grad_norm_first": g_first,
            "grad_norm_last": g_last,
            "zero_grad_ratio": zero_ratio,
            "first_layer": first,
            "last_layer": last,
            "loss": loss.item(),
            **features,
            "params": p,
        },
    }


# --------------------------------------------------------------------------- torchmortem


def torchmortem_available() -> str | None:
    """torchmortem's version, or None when it is not installed."""
    try:
        from importlib.metadata import version

        import torchmortem  # noqa: F401

        return version("torchmortem")
    except ImportError:
        return None


# A CRITICAL finding -> the benchmark's label (by its category, or title for the
# gradient-flow detector's two findings).
def _finding_label(f) -> str:
    title = f.title.lower()
    if f.category == "gradient_flow":
        return "fails_vanishing" if "vanishing" in title else "diverges"
    if f.category in ("dead_units", "saturation"):
        return "fails_vanishing"
    if f.category == "loss_dynamics" and "diverg" in title:
        return "diverges"
    if f.category in ("weight_norm", "update_ratio") and ("explo" in title or "high" in title):
        return "diverges"
    return "fails_other"


_PRIORITY = ("diverges", "fails_vanishing", "fails_other")


def torchmortem_verdict(
    model: nn.Module, layout: str, make_optimizer, steps: int = 50, seed: int = 0, batch: int = 128
) -> dict:
    """Train a copy of ``model`` for ``steps`` steps (the case's optimizer, MNIST-1D
    batches of ``batch`` drawn with ``seed``) under ``torchmortem.Autopsy`` (its
    "balanced" sampling), then read its report: any CRITICAL finding means "fails"; the
    label is that of the most serious one (diverges, then fails_vanishing, then
    fails_other). A non-finite loss is handed to the autopsy and ends the run (the
    verdict is still torchmortem's)."""
    import logging

    from torchmortem import Autopsy, Severity

    logging.getLogger("torchmortem").setLevel(logging.ERROR)

    t0 = time.perf_counter()
    model = copy.deepcopy(model)
    model.train()
    data = load_mnist1d()
    x = to_layout(torch.from_numpy(data["x"]), layout)
    y = torch.from_numpy(data["y"])
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model.parameters())
    nonfinite = None
    with Autopsy(model, optimizer=opt, sampling="balanced") as autopsy:
        for step in range(steps):
            idx = torch.randint(len(y), (batch,), generator=gen)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if not math.isfinite(loss.item()):
                autopsy.step(loss=loss.item())
                nonfinite = step
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            autopsy.step(loss=loss.item())
    report = autopsy.get_report()
    critical = [f for f in report.findings if f.severity == Severity.CRITICAL]
    labels = {_finding_label(f) for f in critical}
    label = next((lab for lab in _PRIORITY if lab in labels), "trains")
    cause = next((f.title for f in critical if _finding_label(f) == label), None)
    return {
        "verdict": "fails" if critical else "trains",
        "label": label,
        "cause": cause,
        "seconds": time.perf_counter() - t0,
        "detail": {
            "critical": [f"{f.category}: {f.title}" for f in critical],
            "warnings": [
                f"{f.category}: {f.title}"
                for f in report.findings
                if f.severity == Severity.WARNING
            ],
            "insights": [i.title for i in report.insights],
            "nonfinite_step": nonfinite,
            "steps": steps,
        },
    }


# --------------------------------------------------------------------------- a table


def run_peers(name: str, seed: int = 0, with_torchmortem: bool = True) -> dict:
    """Both peers on case ``name`` (each on a fresh build from ``seed``)."""
    spec = build_case(name, seed)
    out = {"autotrainer": autotrainer(spec.model, fixed_batch(spec.layout))}
    if with_torchmortem and torchmortem_available():
        spec = build_case(name, seed)
        out["torchmortem"] = torchmortem_verdict(
            spec.model, spec.layout, spec.make_optimizer, seed=seed
        )
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="AUTOTRAINER and torchmortem on the cases")
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--no-torchmortem", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torchmortem: {torchmortem_available() or 'not installed'}")
    for name in args.cases or list(CASES):
        res = run_peers(name, with_torchmortem=not args.no_torchmortem)
        at, tm = res["autotrainer"], res.get("torchmortem")
        line = f"{name:<40} autotrainer {at['label']:<16} ({at['cause']})"
        if tm:
            line += f"  torchmortem {tm['label']:<16} {tm['seconds']:5.1f}s ({tm['cause']})"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
