"""``Monitor``: cheap gradient-flow telemetry inside any training loop."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .._checks import check_int
from .probes import RECTIFIERS, parameterized_layers, unwrap


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Monitor:
    """Record training health every ``every`` steps, cheaply.

    Call :meth:`step` once per training step, after ``optimizer.step()`` (the gradients are
    still in ``.grad`` then), or use it as a context manager, which removes its hooks and
    closes its files on exit::

        with Monitor(model, every=10, path="run/monitor.jsonl") as monitor:
            for x, y in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                monitor.step(loss)

    Each record holds the step, the loss, and per layer: the weight-gradient norm, the
    update-to-weight ratio ``||w_t - w_{t-1}|| / ||w_t||`` (from a copy of the weights
    taken one step before a recorded step), and per ReLU module the fraction of dead units
    (zero for the whole batch) in the forward pass of the recorded step; plus a
    ``nonfinite`` flag. Records are kept in :attr:`records`, appended to ``path`` as JSON
    lines, and handed to TensorBoard when ``tensorboard`` names a log directory (needs the
    ``tensorboard`` package). Under DistributedDataParallel the gradients read are the
    all-reduced ones and only rank 0 writes files.
    """

    def __init__(self, model: nn.Module, *, every: int = 1, path=None, tensorboard=None,
                 track_dead_units: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.every = check_int("every", every, minimum=1)
        self.net = unwrap(model)
        named = parameterized_layers(self.net)
        if not named:
            raise ValueError("the model has no layer with a weight parameter to monitor")
        self.layer_names = [name for name, _ in named]
        self._weights = [m.weight for _, m in named]
        self.records: list[dict] = []
        self.steps = 0
        self._snapshot: list[torch.Tensor] | None = None
        self._dead: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._armed = self.every == 1
        writes = _is_rank_zero()
        # Everything that can fail comes before the hooks and the files: a Monitor that
        # raises here cannot be closed, so it must leave nothing behind.
        writer_class = None
        if tensorboard is not None and writes:
            try:
                from torch.utils.tensorboard import SummaryWriter as writer_class
            except ImportError as exc:
                raise ImportError("Monitor(tensorboard=...) needs the tensorboard package: "
                                  "pip install tensorboard") from exc
        self._handles = []
        self._file = None
        self._writer = None
        try:
            if path is not None and writes:
                path = Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = path.open("a", encoding="utf-8")
            if writer_class is not None:
                self._writer = writer_class(str(tensorboard))
            if track_dead_units:
                for name, module in self.net.named_modules():
                    if isinstance(module, RECTIFIERS):
                        self._handles.append(module.register_forward_hook(self._dead_hook(name)))
        except BaseException:
            self.close()
            raise
        if self.every == 1:
            self._take_snapshot()

    def _dead_hook(self, name: str):
        def hook(module, inputs, output):
            if self._armed and module.training and output.dim() >= 2 and output.shape[0] > 1:
                calls = self._calls[name] = self._calls.get(name, 0) + 1
                key = name if calls == 1 else f"{name}#{calls}"
                with torch.no_grad():
                    self._dead[key] = (output == 0).all(dim=0).float().mean()
        return hook

    def _take_snapshot(self) -> None:
        with torch.no_grad():
            self._snapshot = [w.detach().clone() for w in self._weights]

    @torch.no_grad()
    def step(self, loss: torch.Tensor | float | None = None) -> dict | None:
        """Count a step; on every ``every``-th one record and return the record."""
        self.steps += 1
        record = None
        if self.steps % self.every == 0:
            record = self._record(loss)
        # Arm the next recorded step: dead units are seen in its forward pass, and the
        # weights copied now are the ones its optimizer step will start from.
        next_recorded = (self.steps + 1) % self.every == 0
        self._armed = next_recorded
        if next_recorded:
            self._dead, self._calls = {}, {}
        if next_recorded:
            self._take_snapshot()
        else:
            self._snapshot = None
        return record

    def _record(self, loss) -> dict:
        grads = [w.grad for w in self._weights]
        present = [i for i, g in enumerate(grads) if g is not None]
        grad_norms = [math.nan] * len(grads)
        if present:
            norms = torch.stack(torch._foreach_norm([grads[i] for i in present])).tolist()
            for i, value in zip(present, norms):
                grad_norms[i] = value
        weight_norms = torch.stack(torch._foreach_norm(self._weights)).tolist()
        update = None
        if self._snapshot is not None:
            deltas = torch._foreach_sub([w.detach() for w in self._weights], self._snapshot)
            delta_norms = torch.stack(torch._foreach_norm(deltas)).tolist()
            update = {n: (d / w if w > 0 else math.nan)
                      for n, d, w in zip(self.layer_names, delta_norms, weight_norms)}
        loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else loss
        nonfinite = (any(not math.isfinite(grad_norms[i]) for i in present)
                     or (loss_value is not None and not math.isfinite(loss_value)))
        record = {
            "step": self.steps, "loss": loss_value, "nonfinite": nonfinite,
            "grad_norm": dict(zip(self.layer_names, grad_norms)),
            "update_ratio": update,
            "dead_fraction": {k: float(v) for k, v in self._dead.items()} or None,
        }
        self.records.append(record)
        self._write(record)
        return record

    def _write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_strict(record), allow_nan=False) + "\n")
            self._file.flush()
        if self._writer is not None:
            step = record["step"]
            if record["loss"] is not None:
                self._writer.add_scalar("loss", record["loss"], step)
            for group in ("grad_norm", "update_ratio", "dead_fraction"):
                for name, value in (record[group] or {}).items():
                    if value is not None and math.isfinite(value):
                        self._writer.add_scalar(f"{group}/{name}", value, step)

    def close(self) -> None:
        """Remove the hooks and close the files (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _strict(value):
    """The record with NaN and Inf replaced by None, so every line is strict JSON."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
