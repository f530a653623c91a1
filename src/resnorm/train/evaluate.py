"""Evaluation in eval mode: one process, or rank 0's model in slices over a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) upcast to float32; float64 ones kept."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


@torch.no_grad()
def _eval_sums(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, int]:
    """Summed cross-entropy and number of correct predictions, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = _full_precision(model(x[start : start + batch_size]))
        target = y[start : start + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return total_loss, correct


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode."""
    total_loss, correct = _eval_sums(model, x, y, batch_size)
    return total_loss / len(x), correct / len(x)


def _evaluate_shared(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int, world_size: int
) -> tuple[float, float]:
    """:func:`evaluate` of rank 0's model, each process taking a slice of ``(x, y)``.
    The buffers (running statistics) are rank 0's first, as DistributedDataParallel makes
    them before every training step: without synchronized batch norm each process's own
    last update would differ."""
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    lo, hi = len(x) * rank // world_size, len(x) * (rank + 1) // world_size
    total_loss, correct = _eval_sums(model, x[lo:hi], y[lo:hi], batch_size)
    totals = torch.tensor([total_loss, correct], dtype=torch.float64, device=x.device)
    dist.all_reduce(totals)
    total_loss, correct = totals.tolist()
    return total_loss / len(x), correct / len(x)
