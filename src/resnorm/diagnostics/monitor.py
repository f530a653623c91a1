"""``Monitor``: cheap gradient-flow telemetry inside any training loop."""

from __future__ import annotations

import atexit
import math
import queue
import threading
import time
import weakref
from pathlib import Path

import orjson
import torch
from torch import nn

from .._checks import check_int
from ..errors import MissingExtraError, UsageError, UsageTypeError
from .norm_stats import CompiledNorms, compiled_norms, grouped_update_norms, tensor_norms
from .probes import is_rectifier, parameterized_layers, unwrap

_OPEN_MONITORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_monitors() -> None:  # a Monitor never closed still writes all its records
    for monitor in list(_OPEN_MONITORS):
        monitor.close()


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _summary_writer_class():
    """TensorBoard's ``SummaryWriter``, or an error naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise MissingExtraError(
            "Monitor(tensorboard=...) needs the tensorboard package: pip install tensorboard"
        ) from exc
    return SummaryWriter


def _weighted_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers a :class:`Monitor` measures, one tensor per layer for the norm statistics:
    those with a ``weight`` parameter (recurrent layers' weight_ih/weight_hh are measured by
    diagnose(), not here). A model without one is refused."""
    named = [
        (n, m)
        for n, m in parameterized_layers(net)
        if isinstance(getattr(m, "weight", None), nn.Parameter)
    ]
    if not named:
        raise UsageError("the model has no layer with a weight parameter to monitor")
    return named


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

    Each record holds the step, the loss, a ``nonfinite`` flag, and per layer:

    - ``grad_norm``: the weight-gradient norm (exact);
    - ``update_ratio``: ``||w_t - w_{t-1}|| / ||w_t||`` over the step just taken, computed
      on a fixed, randomly placed block of consecutive rows (output units) of each weight
      holding about ``update_sample`` entries (all of a smaller weight; every weight
      exactly with ``update_sample=None``). The block is contiguous in memory, so the cost
      stays small whatever the model's size; the ratio's order of magnitude, which is what it is read
      for (about 1e-3 is the usual healthy value), is estimated well;
    - ``dead_fraction`` per ReLU module (and per fused norm that applies the ReLU itself,
      ``activation="relu"``, as fused blocks do): the fraction of units that are zero for
      the whole batch in the forward pass of the recorded step; counted on the first record and on
      every ``dead_units_every``-th after it (10 by default: dead units change slowly, and
      the ReLU hooks that count them are the Monitor's largest cost), ``None`` on the
      others. ``dead_units_every=1`` counts them on every record.

    Records are kept in :attr:`records` and appended to ``path`` as JSON lines (NaN and Inf
    written as null), and handed to TensorBoard when ``tensorboard`` names a log directory
    (needs the ``tensorboard`` package), by a background thread, off the training step's
    path: files are flushed at most once a second, on :meth:`flush` and on :meth:`close`
    (also run at interpreter exit); a write error is raised by the next ``step()``. Under
    DistributedDataParallel the gradients read are the all-reduced ones and only rank 0
    writes files.

    The gradient norms and update norms of float32 CPU models are computed by the compiled
    CPU kernel of :mod:`resnorm.kernels` (one call for the whole model; built on first use,
    about 30 s once per machine; ``compiled=True`` requires it) and by PyTorch ops otherwise
    or with ``compiled=False`` (see :mod:`resnorm.diagnostics.norm_stats`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 1,
        path=None,
        tensorboard=None,
        track_dead_units: bool = True,
        dead_units_every: int = 10,
        update_sample: int | None = 4096,
        seed: int = 0,
        compiled: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UsageTypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.every = check_int("every", every, minimum=1)
        self.dead_units_every = check_int("dead_units_every", dead_units_every, minimum=1)
        if update_sample is not None:
            check_int("update_sample", update_sample, minimum=1)
        self.net = unwrap(model)
        named = _weighted_layers(self.net)
        writes = _is_rank_zero()
        summary_writer = _summary_writer_class() if tensorboard is not None and writes else None
        self.layer_names = [name for name, _ in named]
        self._weights = [m.weight for _, m in named]
        self._lay_out_samples(update_sample, seed)
        self._views: list[torch.Tensor] = []
        self._view_pointers: list[int] = []
        self._compiled = compiled_norms(compiled)
        self._fast = False
        self._snapshot: torch.Tensor | None = None
        self.records: list[dict] = []
        self.steps = 0
        self._previous: torch.Tensor | None = None
        self._dead_maxima: list[tuple[str, torch.Tensor]] = []
        self._handles = []
        self._file = None
        self._writer = None
        self._last_flush = time.monotonic()
        # Records are encoded and written by a background thread (started with the first
        # record), off the training loop's path; close() drains it.
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._write_error: BaseException | None = None
        self._rectifiers = (
            [(name, m) for name, m in self.net.named_modules() if is_rectifier(m)]
            if track_dead_units
            else []
        )
        self._open_outputs(path if writes else None, tensorboard, summary_writer)
        self._armed = self.every == 1
        if self._armed:
            self._previous = self._sampled_weights()
            self._count_dead_units(True)

    def _lay_out_samples(self, update_sample: int | None, seed: int) -> None:
        """Choose each weight's sampled block and lay the blocks end to end, grouped by
        size, so that the update ratios of a whole group are one row-wise norm of a
        (layers, size) view, not a norm per layer."""
        self._sample_index = self._choose_samples(update_sample, seed)
        sizes = [
            w.numel() if block is None else block[1] * (w.numel() // w.shape[0])
            for w, block in zip(self._weights, self._sample_index)
        ]
        self._sample_total = sum(sizes)
        self._order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
        self._groups: list[tuple[int, int]] = []  # (segment size, number of layers)
        for i in self._order:
            if self._groups and self._groups[-1][0] == sizes[i]:
                self._groups[-1] = (sizes[i], self._groups[-1][1] + 1)
            else:
                self._groups.append((sizes[i], 1))

    def _open_outputs(self, path, tensorboard, summary_writer) -> None:
        """Open the JSON-lines file and the TensorBoard writer; if one fails, close all."""
        try:
            if path is not None:
                path = Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = path.open("ab")
            if summary_writer is not None:
                self._writer = summary_writer(str(tensorboard))
        except BaseException:
            self.close()
            raise

    def _choose_samples(self, size: int | None, seed: int) -> list[tuple[int, int] | None]:
        """Per weight: ``(first row, number of rows)`` of the sampled block, or None for all."""
        generator = torch.Generator().manual_seed(seed)
        chosen = []
        for w in self._weights:
            rows = w.shape[0] if w.dim() else 1
            if size is None or w.numel() <= size or rows == 1:
                chosen.append(None)
                continue
            keep = min(rows, max(1, math.ceil(size / (w.numel() // rows))))
            first = int(torch.randint(0, rows - keep + 1, (1,), generator=generator))
            chosen.append((first, keep))
        return chosen

    def _sampled_weights(self) -> torch.Tensor:
        """A ``(2, total)`` float32 buffer: row 1 holds the sampled rows of every weight,
        flattened and concatenated (one copy); row 0 is room for their change over the next
        step (:func:`~resnorm.diagnostics.norm_stats.grouped_update_norms`).

        The views are built once and rebuilt only when a weight's storage moved (after
        ``model.to(...)``, say): an optimizer updates weights in place."""
        self._refresh_views()
        if self._fast:  # one buffer, rewritten in place: the compiled path diffs against it
            if self._snapshot is None:
                self._snapshot = torch.empty(2, self._sample_total)
            rows = self._snapshot
        else:
            rows = torch.empty(2, self._sample_total, device=self._views[0].device)
        torch.cat(self._views, out=rows[1])
        return rows

    def _refresh_views(self) -> None:
        pointers = [w.data_ptr() for w in self._weights]
        if pointers != self._view_pointers:
            self._views = [
                self._weights[i].detach().reshape(-1)
                if self._sample_index[i] is None
                else self._weights[i]
                .detach()
                .reshape(self._weights[i].shape[0], -1)
                .narrow(0, *self._sample_index[i])
                .reshape(-1)
                for i in self._order
            ]
            self._view_pointers = pointers
            self._fast = self._compiled is not None and CompiledNorms.takes(self._views)
            self._snapshot = None

    def _ratios_from(self, change: list[float], size: list[float]) -> dict[str, float | None]:
        """Per-layer ratios from norms listed in sample order (``self._order``)."""
        ratios: dict[str, float | None] = dict.fromkeys(self.layer_names)
        for i, d, w in zip(self._order, change, size):
            ratios[self.layer_names[i]] = d / w if w > 0 else None
        return ratios

    def _dead_fractions(self) -> dict[str, float]:
        """Fraction of dead units per recorded ReLU call, from one pass over all maxima."""
        sizes = [m.numel() for _, m in self._dead_maxima]
        dead = torch.cat([m.reshape(-1) for _, m in self._dead_maxima]).eq(0).cumsum(0)
        ends = torch.tensor(sizes).cumsum(0) - 1
        totals = dead[ends].tolist()
        counts = [b - a for a, b in zip([0] + totals[:-1], totals)]
        fractions, calls = {}, {}
        for (name, _), count, size in zip(self._dead_maxima, counts, sizes):
            calls[name] = calls.get(name, 0) + 1
            fractions[name if calls[name] == 1 else f"{name}#{calls[name]}"] = count / size
        return fractions

    def _dead_hook(self, name: str):
        # One reduction per ReLU call: a unit is dead if its maximum over the batch is 0;
        # names and fractions are worked out at record time.
        def hook(module, inputs, output):
            if isinstance(output, tuple):  # a fused norm with prenorm=True: (y, stream)
                output = output[0]
            if module.training and output.dim() >= 2 and output.shape[0] > 1:
                self._dead_maxima.append((name, output.detach().amax(dim=0)))

        return hook

    def _count_dead_units(self, on: bool) -> None:
        """Hook the ReLUs only for the forward passes whose dead units are counted: a
        registered hook slows every call of its module, counted or not."""
        if on and not self._handles:
            self._handles = [
                m.register_forward_hook(self._dead_hook(name)) for name, m in self._rectifiers
            ]
        elif not on and self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    @torch.no_grad()
    def step(self, loss: torch.Tensor | float | None = None) -> dict | None:
        """Count a step; on every ``every``-th one record and return the record."""
        self.steps += 1
        record = None
        current = None
        if self.steps % self.every == 0:
            record, current = self._record(loss)
        # Arm the next recorded step: dead units are seen in its forward pass, and the
        # weights sampled now are the ones its optimizer step starts from.
        self._armed = (self.steps + 1) % self.every == 0
        self._dead_maxima = []
        next_record = (self.steps + 1) // self.every
        self._count_dead_units(self._armed and (next_record - 1) % self.dead_units_every == 0)
        if self._armed:
            self._previous = current if current is not None else self._sampled_weights()
        else:
            self._previous = None
        return record

    def _record(self, loss) -> tuple[dict, torch.Tensor]:
        grads = [w.grad for w in self._weights]
        present = [i for i, g in enumerate(grads) if g is not None]
        grad_norms: list[float | None] = [None] * len(grads)
        norms: list[float] = []
        if present:
            tensors = grads if len(present) == len(grads) else [grads[i] for i in present]
            norms = tensor_norms(tensors, self._compiled)
            for i, value in zip(present, norms):
                grad_norms[i] = value
        self._refresh_views()  # the weights may have moved (model.to(...)) since the last step
        if self._previous is not None and self._previous is self._snapshot:  # compiled path
            # One pass: ||w - previous||, ||w||, and the snapshot becomes w.
            update = self._ratios_from(*self._compiled.update_norms(self._views, self._snapshot[1]))
            current = self._snapshot
        else:
            current = self._sampled_weights()
            update = (
                self._ratios_from(*grouped_update_norms(current, self._previous, self._groups))
                if self._previous is not None
                else None
            )
        dead = self._dead_fractions() if self._dead_maxima else None
        loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else loss
        # A sum of non-negative norms is finite exactly when every norm is (short of 1e308).
        nonfinite = not math.isfinite(sum(norms)) or (
            loss_value is not None and not math.isfinite(loss_value)
        )
        record = {
            "step": self.steps,
            "loss": loss_value,
            "nonfinite": nonfinite,
            "grad_norm": dict(zip(self.layer_names, grad_norms)),
            "update_ratio": update,
            "dead_fraction": dead,
        }
        self.records.append(record)
        self._write(record)
        return record, current

    def _write(self, record: dict) -> None:
        """Hand the record to the writer thread (started on first use)."""
        if self._file is None and self._writer is None:
            return
        self._raise_write_error()
        if self._thread is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._drain, name="resnorm-monitor-writer", daemon=True
            )
            self._thread.start()
            _OPEN_MONITORS.add(self)
        self._queue.put(record)

    def _drain(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            try:
                if self._write_error is None:
                    self._write_now(record)
            except BaseException as exc:  # surfaced by the next step(), flush() or close()
                self._write_error = exc
            finally:
                if isinstance(record, _Flush):
                    record.done.set()

    def _raise_write_error(self) -> None:
        if self._write_error is not None:
            exc, self._write_error = self._write_error, None
            raise RuntimeError(f"Monitor could not write its records: {exc}") from exc

    def flush(self) -> None:
        """Wait until every record so far is written, and flush the files."""
        if self._thread is not None:
            done = threading.Event()
            self._queue.put(_Flush(done))
            done.wait()
        self._raise_write_error()

    def _write_now(self, record) -> None:
        if isinstance(record, _Flush):
            if self._file is not None:
                self._file.flush()
            if self._writer is not None:
                self._writer.flush()
            return
        if self._file is not None:
            # orjson writes NaN and Inf as null (strict JSON), 30x faster than json.dumps.
            self._file.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
            now = time.monotonic()
            if now - self._last_flush >= 1.0:
                self._file.flush()
                self._last_flush = now
        if self._writer is not None:
            step = record["step"]
            if record["loss"] is not None:
                self._writer.add_scalar("loss", record["loss"], step)
            for group in ("grad_norm", "update_ratio", "dead_fraction"):
                for name, value in (record[group] or {}).items():
                    if value is not None and math.isfinite(value):
                        self._writer.add_scalar(f"{group}/{name}", value, step)

    def close(self) -> None:
        """Remove the hooks, write the pending records, close the files (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            _OPEN_MONITORS.discard(self)
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._raise_write_error()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Flush:
    """A marker in the writer's queue: flush the files, then set ``done``."""

    def __init__(self, done: threading.Event) -> None:
        self.done = done
