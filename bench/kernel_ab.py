"""Two builds of the fused add+norm CPU kernel side by side: the same bits, and the speed.

    python bench/kernel_ab.py --before 9e135a7 [--pairs 3] [--repeats 5] [--out ab.json]

``--before`` is a git commit (checked out into a temporary worktree, removed afterwards) or
the folder of a checkout; the other side is this checkout (``--after``). Each side runs in
its own processes with its own ``src`` first on ``PYTHONPATH`` and its own kernel cache
(``--cache/before``, ``--cache/after``), so the two builds never share a file.

1. **Bit-identical outputs.** Each side computes ``add_norm`` forward and backward (y, h,
   dx, dresidual, dweight, dbias) on one fixed set of inputs and saves, for every tensor,
   the SHA-256 of its dtype, shape and bytes, and the tensor itself where it is small
   (:data:`KEEP_ELEMENTS`); every digest must equal the other side's (bytes: stricter than
   ``torch.equal``, which calls 0.0 and -0.0 equal), every kept tensor be ``torch.equal``
   to the other side's. The cases: float32 and bfloat16; layer and RMS norm; with and
   without a residual; layer norm with and without a bias; identity and ReLU; ``prenorm``
   False and True; bfloat16 with ``residual_in_fp32``; shapes from a 3-D 21 x 200 to
   8,192 x 1,024 (32 MiB of float32: past the non-temporal store threshold); each in three
   modes: as shipped (inputs under the stock-ops threshold run stock PyTorch ops), the
   compiled kernel forced for every size, and the kernel forced with non-temporal stores
   for every size. Each side also reports how many cases ran the compiled kernel (its
   calls are counted), so that a comparison of stock ops with themselves shows as such.
2. **The two binaries in one process.** Both compiled modules are loaded into this process
   (their names differ by build key) and their forward and backward calls, as
   ``resnorm.kernels.cpu`` makes them, are timed in turns on the same tensors, memory
   reused (the bench's ``reuse`` regime): the kernels' own speed, without the drift
   between processes that the bench's ratios carry on a shared machine.
3. **The bench.** ``resnorm bench`` (JSON, no end-to-end rows) runs for both sides in
   turns, ``--pairs`` times, the order alternating (before-after, after-before, ...) so
   that the drifts of a shared machine fall on both alike; the table gives, per row of
   resnorm's, the median over the runs of its speed-ups over stock eager ops and
   ``torch.compile`` (``x_vs_eager``, ``x_vs_compile``: ratios measured within one run)
   and of its milliseconds, for each side, with the range of the runs (their noise).
   ``--shapes`` defaults to 4,096 x 768 and 16,384 x 1,024, not ``resnorm bench
   --quick``'s shapes: those are under the stock-ops threshold, where both sides would
   time the same stock PyTorch ops.

Exit status 1 when any output differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
SHAPES = ((3, 7, 200), (64, 1000), (1100, 1024), (8192, 1024))
MODES = ("shipped", "kernel", "kernel+nontemporal")
BENCH_SHAPES = "4096x768,16384x1024"
# Outputs of at most this many elements are saved whole (and compared with torch.equal);
# all of them as digests: the large ones whole would take gigabytes.
KEEP_ELEMENTS = 1 << 16


# ------------------------------------------------------------------------------------------
# one side: the outputs of every case (runs in a child process, with that side's resnorm)


def _set_any(module, names: tuple[str, ...], value) -> None:
    """Set whichever of ``names`` the module has (a constant renamed between the builds)."""
    found = [name for name in names if hasattr(module, name)]
    if not found:
        raise AttributeError(f"{module.__name__} has none of {names}")
    for name in found:
        setattr(module, name, value)


class _CallCounter:
    """The compiled module, with its add_norm_fwd / add_norm_bwd calls counted."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def add_norm_fwd(self, *args):
        self.calls += 1
        return self.module.add_norm_fwd(*args)

    def add_norm_bwd(self, *args):
        self.calls += 1
        return self.module.add_norm_bwd(*args)

    def __getattr__(self, name):
        return getattr(self.module, name)


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.7).to(dtype)
    residual = (torch.randn(shape, generator=g) * 1.5 - 0.3).to(dtype)
    weight = torch.rand(n, generator=g) + 0.5
    bias = torch.randn(n, generator=g)
    dy = torch.randn(shape, generator=g).to(dtype)
    dh = torch.randn(shape, generator=g)
    return x, residual, weight, bias, dy, dh


def _cases():
    for kind in ("layer", "rms"):
        for with_residual in (False, True):
            for with_bias in (False, True) if kind == "layer" else (False,):
                for activation in ("identity", "relu"):
                    for prenorm in (False, True):
                        yield kind, with_residual, with_bias, activation, prenorm


def _one(add_norm, inputs, kind, with_residual, with_bias, activation, prenorm, fp32):
    x, residual, weight, bias, dy, dh = inputs
    leaves = {
        "x": x,
        "residual": residual if with_residual else None,
        "weight": weight,
        "bias": bias if with_bias else None,
    }
    leaves = {
        k: None if t is None else t.detach().clone().requires_grad_() for k, t in leaves.items()
    }
    out = add_norm(
        **leaves, kind=kind, prenorm=prenorm, residual_in_fp32=fp32, activation=activation
    )
    y, h = out if prenorm else (out, None)
    tensors, grads = [y], [dy]
    if h is not None:
        tensors.append(h)
        grads.append(dh.to(h.dtype))
    torch.autograd.backward(tensors, grads)
    result = {"y": y.detach(), "h": None if h is None else h.detach()}
    result.update({f"d{k}": None if t is None else t.grad for k, t in leaves.items()})
    return {
        name: None if t is None else (_digest(t), t if t.numel() <= KEEP_ELEMENTS else None)
        for name, t in result.items()
    }


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + data).hexdigest()


def capture(out: Path) -> None:
    """Every case's outputs, saved to ``out`` with the number of cases that ran the kernel."""
    import resnorm
    from resnorm.kernels import add_norm, cpu, ops

    torch.set_num_threads(2)
    if cpu.load() is None:
        raise SystemExit(f"kernel_ab: the compiled kernel is unavailable: {cpu.status()}")
    counter = _CallCounter(cpu._state["module"])
    cpu._state["module"] = counter
    defaults = {
        name: getattr(ops, name)
        for name in ("STOCK_BELOW", "EAGER_BELOW", "STOCK_PLAIN_LAYER_NORM")
        if hasattr(ops, name)
    }
    nontemporal_default = next(
        getattr(cpu, name) for name in ("NONTEMPORAL_BYTES", "STREAM_BYTES") if hasattr(cpu, name)
    )
    results, kernel_cases = {}, 0
    for mode in MODES:
        for name, value in defaults.items():
            setattr(ops, name, value)
        _set_any(cpu, ("NONTEMPORAL_BYTES", "STREAM_BYTES"), nontemporal_default)
        if mode != "shipped":
            _set_any(ops, ("STOCK_BELOW", "EAGER_BELOW"), 0)
            ops.STOCK_PLAIN_LAYER_NORM = False
        if mode == "kernel+nontemporal":
            _set_any(cpu, ("NONTEMPORAL_BYTES", "STREAM_BYTES"), 0)
        for shape in SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                inputs = _inputs(shape, dtype, seed=sum(shape))
                for case in _cases():
                    for fp32 in (False, True) if dtype == torch.bfloat16 and case[1] else (False,):
                        before = counter.calls
                        key = (
                            mode,
                            "x".join(map(str, shape)),
                            str(dtype).split(".")[1],
                            *case,
                            "residual_in_fp32" if fp32 else "",
                        )
                        results[key] = _one(add_norm, inputs, *case, fp32)
                        kernel_cases += counter.calls > before
    torch.save(
        {
            "results": results,
            "kernel_cases": kernel_cases,
            "resnorm": str(Path(resnorm.__file__).parent),
        },
        out,
    )


# ------------------------------------------------------------------------------------------
# the two sides


def _environment(src: Path, cache: Path) -> dict:
    return dict(
        os.environ,
        PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        RESNORM_KERNEL_CACHE=str(cache),
    )


def _run_child(args: list[str], env: dict) -> str:
    done = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"kernel_ab: {' '.join(args[:3])} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def compare_outputs(sides: dict[str, dict], workdir: Path) -> tuple[int, set, list[str], dict]:
    """(cases compared, the cases that differ, their differing tensors, kernel cases per
    side)."""
    saved = {}
    for name, env in sides.items():
        path = workdir / f"{name}.pt"
        _run_child([__file__, "--capture", str(path)], env)
        saved[name] = torch.load(path, weights_only=False)
    before, after = saved["before"]["results"], saved["after"]["results"]
    differing = set(before) ^ set(after)
    counts = {"tensors": 0, "torch.equal": 0}
    differences = [f"{key}: the case is missing on one side" for key in differing]
    for key in sorted(set(before) & set(after), key=str):
        for field, a in before[key].items():
            b = after[key][field]
            if a is None or b is None:
                same = a is b
            else:
                (digest_a, kept_a), (digest_b, kept_b) = a, b
                counts["tensors"] += 1
                counts["torch.equal"] += kept_a is not None and kept_b is not None
                same = digest_a == digest_b and (
                    kept_a is None
                    or kept_b is None
                    or (kept_a.dtype == kept_b.dtype and torch.equal(kept_a, kept_b))
                )
            if not same:
                differing.add(key)
                differences.append(f"{key} {field}")
    kernel = {name: saved[name]["kernel_cases"] for name in saved}
    for name in saved:
        print(f"{name}: resnorm from {saved[name]['resnorm']}", file=sys.stderr)
    print(
        f"compared {counts['tensors']} output tensors by digest, {counts['torch.equal']} of "
        "them also whole with torch.equal"
    )
    return len(set(before) | set(after)), differing, differences, kernel


def bench_runs(
    sides: dict[str, dict], pairs: int, repeats: int, shapes: str, use_compile: bool
) -> dict[str, list[dict]]:
    """``resnorm bench`` JSON of each side, ``pairs`` times, in alternating order."""
    args = [
        "-m",
        "resnorm",
        "bench",
        "--shapes",
        shapes,
        "--repeats",
        str(repeats),
        "--no-end-to-end",
        "--json",
        "--quiet",
    ] + ([] if use_compile else ["--no-compile"])
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for pair in range(pairs):
        for name in ("before", "after") if pair % 2 == 0 else ("after", "before"):
            print(f"bench {pair + 1}/{pairs}: {name}", file=sys.stderr, flush=True)
            runs[name].append(json.loads(_run_child(args, sides[name])))
    return runs


def _build_directory(env: dict) -> Path:
    code = (
        "from resnorm.kernels import cpu\n"
        "assert cpu.load() is not None, cpu.status()\n"
        "print(cpu.build_directory())\n"
    )
    return Path(_run_child(["-c", code], env).strip())


def _load_extension(directory: Path):
    """The compiled module built in ``directory`` (its name is the folder's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        directory.name, directory / f"{directory.name}.so"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def binary_speed(sides: dict[str, dict], shapes: str, repeats: int) -> list[dict]:
    """Median ms of each side's compiled forward and backward, timed in turns, per case."""
    from resnorm.bench import interleaved_medians, parse_shapes, rounds_for, set_allocator

    modules = {name: _load_extension(_build_directory(env)) for name, env in sides.items()}
    nontemporal_bytes = 32 << 20  # cpu.NONTEMPORAL_BYTES, the same on both sides
    set_allocator("reuse")
    rows = []
    for rows_, n in parse_shapes(shapes):
        for dtype, kind in (
            (torch.float32, "layer"),
            (torch.float32, "rms"),
            (torch.bfloat16, "layer"),
        ):
            x, residual, weight, bias, dy, _ = _inputs((rows_, n), dtype, seed=rows_ + n)
            rms = kind == "rms"
            bias = None if rms else bias
            nontemporal = x.numel() * x.element_size() >= nontemporal_bytes
            fwd, bwd = {}, {}
            for name, module in modules.items():
                h = module.empty_output(rows_, n, dtype)
                _, mean, rstd = module.add_norm_fwd(
                    x, residual, weight, bias, rms, 1e-5, h, nontemporal, False
                )

                def forward(module=module):
                    h = module.empty_output(rows_, n, dtype)
                    return module.add_norm_fwd(
                        x, residual, weight, bias, rms, 1e-5, h, nontemporal, False
                    )

                def backward(module=module, h=h, mean=mean, rstd=rstd):
                    dx = module.empty_output(rows_, n, dtype)
                    return module.add_norm_bwd(
                        dy,
                        h,
                        h,
                        weight,
                        bias,
                        mean,
                        rstd,
                        rms,
                        True,
                        not rms,
                        dx,
                        nontemporal,
                        False,
                    )

                fwd[name], bwd[name] = forward, backward
            rounds = rounds_for(repeats, rows_ * n)
            for pass_, peers in (("fwd", fwd), ("bwd", bwd)):
                timed = interleaved_medians(peers, rounds, warmup=3)
                rows.append(
                    {
                        "shape": f"{rows_}x{n}",
                        "dtype": str(dtype).split(".")[1],
                        "kind": kind,
                        "pass": pass_,
                        "rounds": rounds,
                        "before ms": 1e3 * timed["before"],
                        "after ms": 1e3 * timed["after"],
                        "after/before ms": timed["after"] / timed["before"],
                    }
                )
    set_allocator("fresh")
    return rows


def ratio_table(runs: dict[str, list[dict]]) -> list[dict]:
    """Per row of resnorm's: the median over the runs of each side's ms and speed-ups."""
    table: dict[tuple, dict] = {}
    for name, results in runs.items():
        for result in results:
            for row in result["kernels"]:
                if not row["impl"].startswith("resnorm"):
                    continue
                key = (row["regime"], row["shape"], row["kind"], row["impl"], row["pass"])
                entry = table.setdefault(key, {})
                for field in ("ms", "x_vs_eager", "x_vs_compile"):
                    if field in row:
                        entry.setdefault(f"{name} {field}", []).append(row[field])
    rows = []
    for key, entry in table.items():
        row = dict(zip(("regime", "shape", "kind", "impl", "pass"), key))
        row.update({field: statistics.median(values) for field, values in entry.items()})
        if "before ms" in row and "after ms" in row:
            row["after/before ms"] = row["after ms"] / row["before ms"]
        for field, values in entry.items():  # the spread of the runs: the noise
            row[f"{field} range"] = f"{min(values):.2f}-{max(values):.2f}"
        rows.append(row)
    return rows


def _print_table(rows: list[dict]) -> None:
    columns = [
        "regime",
        "shape",
        "dtype",
        "kind",
        "impl",
        "pass",
        "rounds",
        "before ms",
        "after ms",
        "after/before ms",
        "before x_vs_eager",
        "before x_vs_eager range",
        "after x_vs_eager",
        "after x_vs_eager range",
        "before x_vs_compile",
        "before x_vs_compile range",
        "after x_vs_compile",
        "after x_vs_compile range",
    ]
    columns = [c for c in columns if any(c in row for row in rows)]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [
            f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
            for c in columns
        ]
        print("| " + " | ".join(cells) + " |")


def _checkout(before: str, workdir: Path) -> tuple[Path, bool]:
    """The before side's tree: ``before`` itself if it is a folder, else a worktree of it."""
    if Path(before).is_dir():
        return Path(before).resolve(), False
    tree = workdir / "before-tree"
    subprocess.run(
        ["git", "-C", str(HERE), "worktree", "add", "--detach", str(tree), before],
        check=True,
        capture_output=True,
    )
    return tree, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="a git commit, or the folder of a checkout")
    parser.add_argument("--after", default=str(HERE), help="a checkout [default: this one]")
    parser.add_argument(
        "--cache",
        default=None,
        help="kernel cache root, a folder per side [default: a temporary one]",
    )
    parser.add_argument("--pairs", type=int, default=3, help="bench runs per side")
    parser.add_argument("--repeats", type=int, default=5, help="resnorm bench --repeats")
    parser.add_argument("--shapes", default=BENCH_SHAPES, help="resnorm bench --shapes")
    parser.add_argument("--no-compile", action="store_true", help="resnorm bench --no-compile")
    parser.add_argument("--no-bench", action="store_true", help="only the bit-identity check")
    parser.add_argument("--no-identity", action="store_true", help="no bit-identity check")
    parser.add_argument(
        "--no-binaries", action="store_true", help="no timing of the two binaries in one process"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op threads of the timed runs (OMP_NUM_THREADS) [default: PyTorch's]; 1 "
        "keeps a busy shared machine's scheduler out of the kernels' parallel regions",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--capture", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.capture:
        capture(Path(args.capture))
        return
    if not args.before:
        parser.error("--before is required")
    with tempfile.TemporaryDirectory(prefix="kernel_ab_") as tmp:
        workdir = Path(tmp)
        cache = Path(args.cache) if args.cache else workdir / "cache"
        tree, made = _checkout(args.before, workdir)
        try:
            sides = {
                "before": _environment(tree / "src", cache / "before"),
                "after": _environment(Path(args.after).resolve() / "src", cache / "after"),
            }
            if args.threads:  # the timed runs only: the outputs are compared at 2 threads
                torch.set_num_threads(args.threads)
                for env in sides.values():
                    env["OMP_NUM_THREADS"] = str(args.threads)
            compared, differing, differences, kernel = 0, set(), [], {}
            if not args.no_identity:
                compared, differing, differences, kernel = compare_outputs(sides, workdir)
                print(
                    f"bit-identical: {compared - len(differing)} of {compared} cases "
                    f"({len(differences)} differing tensors); cases that ran the compiled "
                    f"kernel: before {kernel['before']}, after {kernel['after']}",
                    flush=True,
                )
                for line in differences[:20]:
                    print(f"  differs: {line}")
            rows, binaries = [], []
            if not args.no_binaries:
                binaries = binary_speed(sides, args.shapes, 4 * args.repeats)
                _print_table(binaries)
                print(flush=True)
            if not args.no_bench:
                rows = ratio_table(
                    bench_runs(sides, args.pairs, args.repeats, args.shapes, not args.no_compile)
                )
                _print_table(rows)
        finally:
            if made:
                subprocess.run(
                    ["git", "-C", str(HERE), "worktree", "remove", "--force", str(tree)],
                    check=False,
                    capture_output=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "cases": compared,
                    "differences": differences,
                    "kernel_cases": kernel,
                    "binaries": binaries,
                    "bench": rows,
                },
                f,
                indent=2,
            )
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
