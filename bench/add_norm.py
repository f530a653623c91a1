"""Residual add + normalization on the CPU: the peers a fused kernel must beat, in one run.

For each shape (rows x hidden) it times, with medians over repeats:
- the machine's memory-copy bandwidth (``dst.copy_(src)``), the physical limit;
- PyTorch eager: ``h = x + r`` then ``F.layer_norm(h)`` / ``nn.RMSNorm()(h)``;
- ``torch.compile`` of the same function;
forward and forward+backward, and reports time, effective GB/s (the bytes a single fused
pass must move: read x and r, write h and y forward; backward also reads dy and writes
dx) and the percentage of copy bandwidth. resnorm's fused kernel (issue 6) joins this
table as one more row.

    python bench/add_norm.py [--shapes 4096x768,16384x1024,8192x4096] [--repeats 7] [--out f.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resnorm._io import atomic_open


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_layer_norm(x, r, w, b):
    h = x + r
    return F.layer_norm(h, (h.shape[-1],), w, b, 1e-5), h


def add_rms_norm(x, r, w, b):
    h = x + r
    return F.rms_norm(h, (h.shape[-1],), w, 1e-5), h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x768,16384x1024,8192x4096")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        n, d = (int(v) for v in shape.split("x"))
        x, r = torch.randn(n, d), torch.randn(n, d)
        w, b = torch.ones(d), torch.zeros(d)
        elem = x.element_size()
        src, dst = torch.randn(n, d), torch.empty(n, d)
        copy = _median_seconds(lambda: dst.copy_(src), args.repeats)
        copy_gbs = 2 * n * d * elem / copy / 1e9
        rows.append({"shape": shape, "kind": "copy", "impl": "memory copy", "pass": "-",
                     "ms": 1e3 * copy, "GB/s": copy_gbs, "pct_copy": 100.0})
        fwd_bytes = 4 * n * d * elem            # read x, r; write h, y
        bwd_bytes = fwd_bytes + 3 * n * d * elem  # + read dy, h; write dx
        for kind, fn in (("layer", add_layer_norm), ("rms", add_rms_norm)):
            impls = [("eager", fn)]
            if not args.no_compile:
                impls.append(("torch.compile", torch.compile(fn, dynamic=False)))
            for name, impl in impls:
                fwd = _median_seconds(lambda: impl(x, r, w, b), args.repeats)
                xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
                wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
                dy = torch.randn(n, d)

                def fwd_bwd():
                    y, _ = impl(xg, rg, wg, bg)
                    y.backward(dy)

                both = _median_seconds(fwd_bwd, args.repeats)
                for pass_, seconds, nbytes in (("fwd", fwd, fwd_bytes),
                                               ("fwd+bwd", both, bwd_bytes)):
                    gbs = nbytes / seconds / 1e9
                    rows.append({"shape": shape, "kind": kind, "impl": name, "pass": pass_,
                                 "ms": 1e3 * seconds, "GB/s": gbs,
                                 "pct_copy": 100 * gbs / copy_gbs})
    print(f"{'shape':>12} {'norm':>6} {'impl':>14} {'pass':>8} {'ms':>9} {'GB/s':>7} "
          f"{'% copy':>7}   (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for row in rows:
        print(f"{row['shape']:>12} {row['kind']:>6} {row['impl']:>14} {row['pass']:>8} "
              f"{row['ms']:9.2f} {row['GB/s']:7.1f} {row['pct_copy']:6.0f}%")
    if args.out:
        with atomic_open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
