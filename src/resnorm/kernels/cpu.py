"""The compiled CPU kernel: built on first use with PyTorch's C++ extension tooling.

The C++ source (``csrc/add_norm_cpu.cpp``) is compiled once per machine, PyTorch version
and source revision with the host compiler (``-O3 -march=native``: the build is cached
under a key that includes the CPU model and flags, so a cache shared across machines never
runs code built for another CPU). The first build takes about 30 seconds; later processes
load the cached library in milliseconds. Without a working compiler the kernel is simply
unavailable and :mod:`resnorm.kernels` uses the pure-PyTorch reference, after one warning.

Environment:

- ``RESNORM_KERNELS=reference`` never builds nor uses the compiled kernel;
- ``RESNORM_KERNEL_CACHE=DIR`` where builds are cached (default: PyTorch's extension
  directory, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``).
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "add_norm_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
DTYPES = (torch.float32, torch.bfloat16)
# Outputs of at least this many bytes are written with streaming (non-temporal) stores:
# they would not stay in cache anyway, and streaming skips reading the destination first.
# Smaller outputs are written normally, so that the next layer (a matmul, in training)
# finds them in cache: streaming 8 MiB activations slowed the next matmuls measurably.
STREAM_BYTES = 32 << 20

_lock = threading.Lock()
_state: dict = {"module": None, "error": None, "tried": False}


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines()
                 if line.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def build_key() -> str:
    """What a cached build depends on: source, flags, PyTorch, Python, CPU."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), torch.__version__.encode(),
                 sys.version.encode(), _cpu_signature().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_directory() -> Path:
    root = os.environ.get("RESNORM_KERNEL_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "torch_extensions"
    return base / f"resnorm_add_norm_cpu_{build_key()}"


def load(*, quiet: bool = False):
    """The compiled module, building it if needed; None if it cannot be had."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        if os.environ.get("RESNORM_KERNELS", "auto") == "reference":
            _state.update(tried=True, error="disabled by RESNORM_KERNELS=reference")
            return None
        try:
            from torch.utils import cpp_extension

            directory = build_directory()
            directory.mkdir(parents=True, exist_ok=True)
            name = directory.name
            if not quiet and not (directory / f"{name}.so").exists():
                print("resnorm: compiling the CPU add+norm kernel (once per machine, "
                      "about 30 s)...", file=sys.stderr, flush=True)
            module = cpp_extension.load(name=name, sources=[str(SOURCE)],
                                        extra_cflags=FLAGS, build_directory=str(directory),
                                        verbose=False)
            _state.update(module=module)
        except Exception as exc:  # no compiler, no headers, ...: fall back, say why once
            lines = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
            _state.update(error=reason)
            warnings.warn(f"resnorm: the compiled CPU add+norm kernel is unavailable ({reason}); "
                          "using the pure-PyTorch reference", RuntimeWarning, stacklevel=3)
        finally:
            _state["tried"] = True
    return _state["module"]


def status() -> dict:
    """Whether the compiled kernel is in use, and why not if it is not (builds it if needed)."""
    module = load(quiet=True)
    return {"available": module is not None, "reason": _state["error"],
            "build_directory": str(build_directory()), "flags": FLAGS,
            "stream_bytes": STREAM_BYTES}


def supports(*tensors: torch.Tensor | None) -> bool:
    """True if the compiled kernel handles these tensors (CPU; float32 or bfloat16)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype in DTYPES) for t in tensors)


def forward(x, residual, weight, bias, rms, eps, h_dtype):
    """Same contract as :func:`resnorm.kernels.reference.forward`, compiled."""
    module = _state["module"]
    h = torch.empty(x.shape, dtype=h_dtype) if h_dtype is not None else None
    stream = x.numel() * x.element_size() >= STREAM_BYTES
    y, mean, rstd = module.add_norm_fwd(x, residual, weight, bias, rms, eps, h, stream)
    return y, (h if h is not None else x.new_empty((0,))), mean, rstd


def backward(dy, dh, h, weight, mean, rstd, rms, need_dw, need_db):
    """Same contract as :func:`resnorm.kernels.reference.backward`, compiled."""
    module = _state["module"]
    dx = torch.empty(dy.shape, dtype=dy.dtype)
    stream = dx.numel() * dx.element_size() >= STREAM_BYTES
    dw, db = module.add_norm_bwd(dy, dh, h, weight, mean, rstd, rms, need_dw, need_db, dx, stream)
    # float32, as summed (autograd casts them to each parameter's own dtype); empty when not
    # asked for, in float32 all the same, as the fake implementation (ops.py) declares.
    dw = dw if need_dw else dy.new_empty((0,), dtype=torch.float32)
    db = db if need_db else dy.new_empty((0,), dtype=torch.float32)
    return dx, dw, db
