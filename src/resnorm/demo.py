"""The starter job: the seed texts' residual MLP and its plain twin, shallow and deep, on
MNIST-1D. It trains four small models and reports what it measured."""

from __future__ import annotations

from dataclasses import dataclass

from ._checks import check_int
from .data import load_mnist1d
from .models import create_model
from .train import TrainConfig, fit


@dataclass(frozen=True)
class DemoRun:
    depth: int
    residual: bool
    parameters: int
    test_acc: float
    train_loss: float
    seconds: float
    diverged: bool

    @property
    def label(self) -> str:
        return f"{'residual' if self.residual else 'plain'}, {_blocks(self.depth)}"


def _blocks(n: int) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def run_demo(
    *,
    depths: tuple[int, ...] = (1, 16),
    epochs: int = 10,
    num_samples: int = 10_000,
    width: int = 128,
    seed: int = 0,
    progress: bool | None = None,
) -> list[DemoRun]:
    """Train the residual MLP of the seed texts (Linear-ReLU-BN-Linear-BN, add, ReLU; batch
    norm, post placement) and its plain twin at each depth in ``depths`` on MNIST-1D."""
    for depth in depths:
        check_int("depth", depth, minimum=1)
    data = load_mnist1d(num_samples, seed=42)
    config = TrainConfig(epochs=epochs, seed=seed)
    runs = []
    for depth in depths:
        for residual in (True, False):
            model = create_model(
                "mlp",
                in_features=data.sample_shape[0],
                num_classes=data.num_classes,
                depth=depth,
                width=width,
                norm="batch",
                placement="post",
                residual=residual,
            )
            result = fit(
                model,
                data,
                config,
                progress=progress,
                description=f"{'residual' if residual else 'plain'} depth {depth}",
            )
            final = result.final
            runs.append(
                DemoRun(
                    depth,
                    residual,
                    sum(p.numel() for p in model.parameters()),
                    final.get("test_acc", float("nan")),
                    final.get("train_loss", float("nan")),
                    result.seconds,
                    result.diverged,
                )
            )
    return runs


def summarize(runs: list[DemoRun]) -> list[str]:
    """Plain-language sentences computed from the measured numbers."""
    lines = []
    by_key = {(r.depth, r.residual): r for r in runs}
    depths = sorted({r.depth for r in runs})
    for depth in depths:
        res, plain = by_key.get((depth, True)), by_key.get((depth, False))
        if res and plain:
            gap = 100 * (res.test_acc - plain.test_acc)
            verb = "beats" if gap > 0 else "trails"
            lines.append(
                f"At {_blocks(depth)} the residual MLP {verb} its plain twin by "
                f"{abs(gap):.1f} points of test accuracy ({100 * res.test_acc:.1f}% vs "
                f"{100 * plain.test_acc:.1f}%)."
            )
    if len(depths) >= 2:
        lo, hi = depths[0], depths[-1]
        for residual in (False, True):
            a, b = by_key.get((lo, residual)), by_key.get((hi, residual))
            if a and b:
                change = 100 * (b.test_acc - a.test_acc)
                kind = "residual" if residual else "plain"
                trend = "loses" if change < 0 else "gains"
                lines.append(
                    f"Going from {lo} to {hi} blocks, the {kind} MLP {trend} "
                    f"{abs(change):.1f} points."
                )
    return lines
