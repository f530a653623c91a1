"""``resnorm bench``: the fused add+norm kernels against their peers, measured in one run.

For each norm kind and shape (rows x hidden), forward and forward+backward, it times with
medians over repeats:

- ``resnorm``: :func:`resnorm.kernels.add_norm` (``prenorm=True``: y and the new residual);
- ``resnorm-nopool`` (``fresh`` regime only): the same with its output pool turned off, so
  that its outputs come from PyTorch's allocator as the peers' do;
- ``eager``: ``h = x + r`` then ``F.layer_norm(h)`` / ``F.rms_norm(h)``: stock PyTorch ops
  in PyTorch's eager mode, op by op;
- ``compile``: ``torch.compile`` of the same stock ops;
- ``copy``: ``dst.copy_(src)`` of one tensor, the machine's memory bandwidth, the physical
  limit.

Effective GB/s counts the bytes a single fused pass must move (forward: read x and r, write
h and y; backward: read dy and h, write dx), so percentages of copy bandwidth compare
like with like. Every peer runs under each allocator regime asked for (Linux/glibc):

Peers are timed in turns (each round times every peer once, in a rotated order) and the
median of the rounds is reported, so that the drifts of a shared machine hit all alike.
Shapes under 16M elements get proportionally more rounds (:func:`rounds_for`).

- ``fresh`` (glibc's default, steady state): allocations of 32 MiB or more are fresh
  ``mmap`` pages, smaller ones come back from the heap, so
  every output of the peers pays page faults (the OS zeroing the pages) each call, and so
  does resnorm's without its output pool (:mod:`resnorm.kernels.cpu`);
- ``reuse``: freed memory is kept and reused (``mallopt(M_MMAP_MAX, 0)``), as jemalloc or
  tcmalloc do; this isolates the kernels' own speed.

Words: *stock* means PyTorch's own, unfused ops; *eager* means PyTorch's eager mode (op by
op, outside ``torch.compile``), the one meaning it has in :mod:`resnorm.kernels` and its
tests too. The ``eager`` peer is the stock ops run eagerly (``resnorm`` runs eagerly as
well; a small input to ``add_norm`` runs those same stock ops, see ``STOCK_BELOW``).

End-to-end rows time a training step (forward, backward, AdamW) of the pre-norm residual
MLP and of the small Transformer, fused vs unfused, same weights.
"""

from __future__ import annotations

import ctypes
import platform
import statistics
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from . import __version__
from ._checks import check_fits_in_memory
from .errors import UsageError
from .kernels import add_norm, cpu

DEFAULT_SHAPES = ((4096, 768), (16384, 1024), (8192, 4096))
QUICK_SHAPES = ((256, 64), (512, 256))
REGIMES = ("fresh", "reuse")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# glibc's default steady state: its mmap threshold starts at 128 KiB and rises to the size
# of each mapped block freed, up to 32 MiB; the trim threshold follows at twice that.
# (Any mallopt call freezes the dynamic threshold, so "fresh" sets that state explicitly.)
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20
# Tensors of one ROWSxHIDDEN shape alive at once in kernel_rows: x, r, dy and the copy's
# src and dst, a copy of x and r per peer (up to 4), and a step's outputs and gradients.
TENSORS_PER_SHAPE = 16


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``"4096x768,16384x1024"`` -> ``((4096, 768), (16384, 1024))``; a ValueError naming
    the part that is not ROWSxHIDDEN with positive integers or that would not fit in this
    machine's memory."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UsageError(
                f"{item!r} is not ROWSxHIDDEN with positive integers (e.g. 16384x1024)"
            )
        rows, hidden = int(parts[0]), int(parts[1])
        check_fits_in_memory(
            f"shape {rows}x{hidden}",
            TENSORS_PER_SHAPE * rows * hidden * 4,
            note=f"the benchmark holds about {TENSORS_PER_SHAPE} float32 "
            f"tensors of that shape at once",
        )
        shapes.append((rows, hidden))
    return tuple(shapes)


def set_allocator(regime: str) -> bool:
    """Switch glibc's large-allocation policy; False where it cannot be (not glibc)."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt takes a C int: 2**31 - 1 is the largest trim threshold (a larger Python int
    # would wrap around, to 0 for 2**40, and trim the heap at every free).
    if regime == "reuse":
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        )
    return (
        bool(libc.mallopt(_M_MMAP_MAX, 65536))
        and bool(libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX))
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX))
    )


def interleaved_medians(
    peers: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    around: dict | None = None,
) -> dict[str, float]:
    """Median seconds of each peer, timed in turns: every round times each peer once, in a
    rotated order, so that drifts of a shared, noisy machine fall on all peers alike.
    ``around[name]`` is an optional (before, after) pair of untimed calls for that peer."""
    around = around or {}
    names = list(peers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            before, after = around.get(name, (None, None))
            if before:
                before()
            try:
                start = time.perf_counter()
                peers[name]()
                elapsed = time.perf_counter() - start
            finally:
                if after:
                    after()
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def _stock(kind: str):
    """The stock PyTorch ops of add+norm, unfused: the "eager" peer as it is, the "compile"
    peer under ``torch.compile``."""
    if kind == "layer":

        def fn(x, r, w, b):
            h = x + r
            return F.layer_norm(h, (h.shape[-1],), w, b, 1e-5), h
    else:

        def fn(x, r, w, b):
            h = x + r
            return F.rms_norm(h, (h.shape[-1],), w, 1e-5), h

    return fn


def _fused(kind: str):
    def fn(x, r, w, b):
        return add_norm(x, r, w, b if kind == "layer" else None, kind=kind, prenorm=True)

    return fn


# Shapes of fewer elements than this get proportionally more rounds, up to ROUNDS_MAX_SCALE
# times ``repeats``: their calls are short (about 1 ms at 4,096 x 768), and there the state
# of the caches, which the other peers' calls change, moves single rounds by 20% or more.
ROUNDS_FULL_ELEMENTS = 1 << 24
ROUNDS_MAX_SCALE = 8


def rounds_for(repeats: int, elements: int) -> int:
    """Timed rounds for a shape of ``elements``: ``repeats`` at 16M elements or more, up to
    :data:`ROUNDS_MAX_SCALE` times as many for smaller ones (the same time in total)."""
    scale = min(ROUNDS_MAX_SCALE, max(1, ROUNDS_FULL_ELEMENTS // max(1, elements)))
    return repeats * scale


def _peers(kind: str, regime: str, use_compile: bool) -> list[tuple[str, Callable]]:
    """(name, fn(x, r, w, b) -> (y, h)) of every implementation timed for one norm kind."""
    impls = [("resnorm", _fused(kind))]
    if regime == "fresh" and cpu.pool_stats().get("min_bytes", -1) >= 0:
        # The same kernel with its outputs from PyTorch's allocator: how much of the
        # fresh-regime speed-up is the output pool's (docs/kernels.md).
        impls.append(("resnorm-nopool", _fused(kind)))
    impls += [("eager", _stock(kind))]
    if use_compile:
        impls.append(("compile", torch.compile(_stock(kind), dynamic=False)))
    return impls


def _peer_calls(impls, x, r, w, b, dy) -> tuple[dict, dict, dict]:
    """The timed calls of each peer: forward, forward+backward (on its own leaf copies of
    the inputs), and the untimed (before, after) calls around them (the pool's switch)."""
    fwd_peers, step_peers, around = {}, {}, {}
    for name, fn in impls:
        xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()

        def step(fn=fn, xg=xg, rg=rg, wg=wg, bg=bg):
            y, _ = fn(xg, rg, wg, bg)
            y.backward(dy)
            xg.grad = rg.grad = wg.grad = bg.grad = None

        fwd_peers[name] = lambda fn=fn: fn(x, r, w, b)
        step_peers[name] = step
        if name == "resnorm-nopool":
            around[name] = (
                lambda: cpu.configure_pool(enabled=False),
                lambda: cpu.configure_pool(enabled=True),
            )
    return fwd_peers, step_peers, around


def _timed_rows(
    timed: dict[str, dict[str, float]],
    *,
    regime: str,
    shape: str,
    kind: str,
    rounds: int,
    nbytes: int,
    copy_gbs: float,
) -> list[dict]:
    """One row per (peer, pass) of ``timed[peer][pass]`` seconds: milliseconds, effective
    GB/s, percent of the copy bandwidth and, for resnorm's rows, the speed-up over each
    other peer (``x_vs_<peer>``)."""
    rows = []
    for name in timed:
        for pass_, moved in (("fwd", 4 * nbytes), ("fwd+bwd", 7 * nbytes)):
            seconds = timed[name][pass_]
            gbs = moved / seconds / 1e9
            row = {
                "regime": regime,
                "shape": shape,
                "kind": kind,
                "impl": name,
                "pass": pass_,
                "ms": 1e3 * seconds,
                "GB/s": gbs,
                "pct_copy": 100 * gbs / copy_gbs,
                "rounds": rounds,
            }
            if name.startswith("resnorm"):
                for peer in timed:
                    if not peer.startswith("resnorm"):
                        row[f"x_vs_{peer}"] = timed[peer][pass_] / seconds
            rows.append(row)
    return rows


def _time_kind(kind: str, x, r, w, b, dy, copy, *, regime: str, use_compile: bool, rounds: int):
    """Every peer of one norm kind timed in turns, forward and forward+backward, with
    ``copy`` in the forward's rounds: ``({peer: {"fwd": s, "fwd+bwd": s}}, copy's s)``."""
    fwd_peers, step_peers, around = _peer_calls(_peers(kind, regime, use_compile), x, r, w, b, dy)
    if use_compile:  # compile outside the timed rounds
        fwd_peers["compile"]()
        step_peers["compile"]()
    fwd = interleaved_medians({**fwd_peers, "copy": copy}, rounds, around=around)
    both = interleaved_medians(step_peers, rounds, around=around)
    copy_seconds = fwd.pop("copy")
    return {name: {"fwd": fwd[name], "fwd+bwd": both[name]} for name in fwd_peers}, copy_seconds


def _copy_row(regime: str, shape: str, seconds: float, nbytes: int, rounds: int) -> dict:
    """The memory copy's row: the bandwidth the other rows are a percentage of."""
    return {
        "regime": regime,
        "shape": shape,
        "kind": "-",
        "impl": "copy",
        "pass": "-",
        "ms": 1e3 * seconds,
        "GB/s": 2 * nbytes / seconds / 1e9,
        "pct_copy": 100.0,
        "rounds": rounds,
    }


def kernel_rows(
    shapes: Iterable[tuple[int, int]],
    kinds=("layer", "rms"),
    *,
    repeats: int = 7,
    use_compile: bool = True,
    regime: str = "fresh",
    progress=None,
) -> list[dict]:
    """Time every peer at every shape; one dict per (shape, kind, impl, pass)."""
    rows = []
    for n, d in shapes:
        shape = f"{n}x{d}"
        x, r = torch.randn(n, d), torch.randn(n, d)
        w, b = torch.rand(d) + 0.5, torch.randn(d)
        dy = torch.randn(n, d)
        src, dst = torch.randn(n, d), torch.empty(n, d)
        nbytes = n * d * x.element_size()
        rounds = rounds_for(repeats, n * d)
        copy_times, kind_rows = [], []
        for kind in kinds:
            if progress:
                progress(f"{regime} {shape} {kind}")
            timed, copy_seconds = _time_kind(
                kind,
                x,
                r,
                w,
                b,
                dy,
                lambda: dst.copy_(src),
                regime=regime,
                use_compile=use_compile,
                rounds=rounds,
            )
            copy_times.append(copy_seconds)
            kind_rows += _timed_rows(
                timed,
                regime=regime,
                shape=shape,
                kind=kind,
                rounds=rounds,
                nbytes=nbytes,
                copy_gbs=2 * nbytes / copy_seconds / 1e9,  # this kind's rounds
            )
        copy = (
            statistics.median(copy_times)
            if copy_times
            else interleaved_medians({"copy": lambda: dst.copy_(src)}, rounds)["copy"]
        )
        rows.append(_copy_row(regime, shape, copy, nbytes, rounds))
        rows += kind_rows
    return rows


def _end_to_end_cases(quick: bool) -> list[tuple[str, dict, tuple[int, int]]]:
    """(model, options, input shape) of each end-to-end row."""
    # Activations of 2 million elements (fused): 256 wide, where the memory-bound ops are a
    # fifth of the step, and 1,024 wide, where the matmuls are nearly all of it; and the
    # lab's MLP (128 x 128: stock ops below STOCK_BELOW, so the two should tie).
    return [
        (
            "mlp",
            {
                "depth": 4 if quick else 8,
                "width": 64 if quick else 256,
                "norm": "layer",
                "placement": "pre",
            },
            (64 if quick else 8192, 40),
        ),
        (
            "mlp",
            {"depth": 4, "width": 128 if quick else 1024, "norm": "layer", "placement": "pre"},
            (64 if quick else 2048, 40),
        ),
        (
            "mlp",
            {"depth": 4 if quick else 8, "width": 128, "norm": "layer", "placement": "pre"},
            (128, 40),
        ),
        (
            "transformer",
            {
                "depth": 2 if quick else 4,
                "dim": 64 if quick else 512,
                "heads": 4 if quick else 8,
                "norm": "layer",
            },
            (16 if quick else 128, 40),
        ),
    ]


def end_to_end_rows(*, repeats: int = 20, quick: bool = False, progress=None) -> list[dict]:
    """Training-step time of fused vs unfused models with the same weights."""
    from .models import create_model

    rows = []
    for name, options, shape in _end_to_end_cases(quick):
        if progress:
            progress(f"end-to-end {name}")
        torch.manual_seed(0)
        x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
        steps = {}
        reference = create_model(name, fused=False, **options)
        for fused in (False, True):
            model = create_model(name, fused=fused, **options)
            model.load_state_dict(reference.state_dict())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, optimizer=optimizer):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()

            steps[fused] = step
        timed = interleaved_medians(steps, repeats, warmup=3)
        described = ", ".join(f"{k}={v}" for k, v in options.items())
        rows.append(
            {
                "model": f"{name}({described})",
                "batch": shape[0],
                "unfused_ms": 1e3 * timed[False],
                "fused_ms": 1e3 * timed[True],
                "speedup": timed[False] / timed[True],
            }
        )
    return rows


def run(
    *,
    shapes=DEFAULT_SHAPES,
    kinds=("layer", "rms"),
    regimes=REGIMES,
    repeats: int = 7,
    use_compile: bool = True,
    end_to_end: bool = True,
    quick: bool = False,
    progress=None,
) -> dict:
    """The whole benchmark as one JSON-ready dict."""
    status = cpu.status()
    result = {
        "resnorm": __version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "kernel": status,
        "kernels": [],
        "end_to_end": [],
        "regimes": [],
    }
    for regime in regimes:
        if not set_allocator(regime):
            continue
        result["regimes"].append(regime)
        result["kernels"] += kernel_rows(
            shapes,
            kinds,
            repeats=repeats,
            use_compile=use_compile,
            regime=regime,
            progress=progress,
        )
    if not result["regimes"]:  # not glibc: the platform's own allocator, once
        result["regimes"].append("default")
        result["kernels"] += kernel_rows(
            shapes,
            kinds,
            repeats=repeats,
            use_compile=use_compile,
            regime="default",
            progress=progress,
        )
    set_allocator("fresh")
    if end_to_end:
        result["end_to_end"] = end_to_end_rows(
            repeats=max(5, 3 * repeats), quick=quick, progress=progress
        )
    return result
