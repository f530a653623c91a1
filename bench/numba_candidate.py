"""numba as a candidate technology for the fused add+LayerNorm forward, measured beside
resnorm's C++ kernel, stock eager and a memory copy in the same run (docs/kernels.md,
"Choosing the technology"). numba is not a dependency of resnorm; install it to run this:

    pip install numba
    python bench/numba_candidate.py --shapes 4096x768,16384x1024 --repeats 15

The numba kernel is the natural one: rows in parallel (``prange``), per row h = x + r and
its sum, the centred sum of squares from h, then y; ``fastmath`` lets it vectorize the
reductions. Memory is reused between calls (the bench's ``reuse`` regime).
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F

try:
    import numba
    import numpy as np
    from numba import njit, prange
except ImportError:
    print("numba_candidate: numba is not installed (pip install numba)", file=sys.stderr)
    sys.exit(2)

from resnorm.bench import interleaved_medians, parse_shapes, set_allocator
from resnorm.kernels import add_norm


@njit(parallel=True, fastmath=True)
def add_layer_norm(x, r, w, b, eps, h, y):  # pragma: no cover - compiled by numba
    rows, n = x.shape
    for i in prange(rows):
        s = np.float32(0.0)
        for j in range(n):
            v = x[i, j] + r[i, j]
            h[i, j] = v
            s += v
        mu = s / n
        q = np.float32(0.0)
        for j in range(n):
            c = h[i, j] - mu
            q += c * c
        rstd = np.float32(1.0) / np.sqrt(q / n + eps)
        for j in range(n):
            y[i, j] = (h[i, j] - mu) * rstd * w[j] + b[j]


def measure(rows: int, n: int, repeats: int) -> None:
    x, r = torch.randn(rows, n), torch.randn(rows, n)
    w, b = torch.rand(n) + 0.5, torch.randn(n)
    xn, rn, wn, bn = x.numpy(), r.numpy(), w.numpy(), b.numpy()
    eps = np.float32(1e-5)

    def with_numba():
        h, y = np.empty_like(xn), np.empty_like(xn)
        add_layer_norm(xn, rn, wn, bn, eps, h, y)
        return y, h

    start = time.perf_counter()
    y, _ = with_numba()
    first = time.perf_counter() - start
    oracle = F.layer_norm(x.double() + r.double(), (n,), w.double(), b.double(), 1e-5)
    error = (torch.from_numpy(y).double() - oracle).abs().max().item()
    src, dst = torch.randn(rows, n), torch.empty(rows, n)
    peers = {
        "numba": with_numba,
        "resnorm C++": lambda: add_norm(x, r, w, b, prenorm=True),
        "eager": lambda: (lambda h: (F.layer_norm(h, (n,), w, b, 1e-5), h))(x + r),
        "copy": lambda: dst.copy_(src),
    }
    times = interleaved_medians(peers, repeats)
    print(
        f"{rows}x{n}: numba's first call (JIT compile) {first:.2f} s, "
        f"max |y - float64 oracle| {error:.1e}"
    )
    for name, seconds in times.items():
        print(f"  {name:12s} {1e3 * seconds:7.2f} ms  {times['eager'] / seconds:5.2f}x eager")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x768,16384x1024")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as exc:
        print(f"numba_candidate: --shapes: {exc}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    numba.set_num_threads(threads)
    set_allocator("reuse")
    print(f"numba {numba.__version__}, torch {torch.__version__}, {threads} threads")
    for rows, n in shapes:
        measure(rows, n, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
