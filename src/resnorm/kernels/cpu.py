"""The compiled CPU kernel: built on first use with PyTorch's C++ extension tooling.

The C++ sources (:data:`SOURCES` in ``csrc/``: the fused add+norm kernels, the output pool,
the diagnostics Monitor's norm statistics and the Python bindings, one extension) are
compiled with the host compiler (``-O3 -march=native``) once per environment and machine,
into a directory named after a hash of all that changes the binary (:func:`build_inputs`:
the bytes of every source and header, the flags,
PyTorch's version and install path, Python's version and ABI, ``sys.prefix``, the CPU model
and flags). Two virtual environments sharing one cache root therefore get a build each
instead of rebuilding in turn over each other's, and a cache shared across machines never
runs code built for another CPU. The first build takes about 30 seconds and says so on one
line of stderr; later processes load the cached library in milliseconds. Without a working
compiler the kernel is simply unavailable and :mod:`resnorm.kernels` uses the pure-PyTorch
reference, after one warning.

Environment:

- ``RESNORM_KERNELS=reference`` never builds nor uses the compiled kernel;
- ``RESNORM_KERNEL_CACHE=DIR`` where builds are cached; otherwise PyTorch's extension root,
  as ``torch.utils.cpp_extension`` uses it: ``$TORCH_EXTENSIONS_DIR``, else
  ``$XDG_CACHE_HOME/torch_extensions`` (``~/.cache/torch_extensions``);
- ``RESNORM_POOL=off`` allocates every output with PyTorch's allocator instead of the
  output pool; ``RESNORM_POOL_MAX_CACHED=BYTES`` caps the free memory the pool keeps
  (default: a quarter of the machine's memory; suffixes K, M, G are accepted).

**The output pool.** glibc maps every allocation of 32 MiB or more afresh from the OS and
unmaps it on free (and, depending on its heap's state, trims and refaults smaller ones), so
a memory-bound op on large activations pays, at every call, for the
OS faulting in and zeroing its outputs one 4 KiB page at a time: on this project's 2-core
test machine 26 ms for two 64 MiB outputs, against 9 ms for the fused kernel itself. The
kernel's outputs of :data:`POOL_MIN_BYTES` or more (y, the new residual stream, the
backward's dx) therefore come from a caching pool (Linux): blocks mapped in transparent
huge pages and, once freed, kept for the next output of the same size, as PyTorch's CUDA
caching allocator does. :func:`pool_stats` reports it, :func:`empty_cache` returns its free
blocks to the OS, :func:`configure_pool` changes its limits.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

import torch

from ..errors import UsageError, UsageTypeError

CSRC = Path(__file__).with_name("csrc")
# The translation units of the one extension, and the headers they share (hashed into the
# build key with them: a changed header changes the binary).
SOURCES = ("add_norm_kernels.cpp", "output_pool.cpp", "norm_stats.cpp", "bindings.cpp")
HEADERS = ("add_norm_kernels.h", "output_pool.h", "norm_stats.h")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
DTYPES = (torch.float32, torch.bfloat16)
# Outputs of at least this many bytes are written with non-temporal (streaming) stores:
# they would not stay in cache anyway, and these skip reading the destination first.
# Smaller outputs are written normally, so that the next layer (a matmul, in training)
# finds them in cache: non-temporal stores of 8 MiB activations slowed the next matmuls
# measurably.
NONTEMPORAL_BYTES = 32 << 20
# Outputs of at least this many bytes come from the output pool. glibc maps fresh pages for
# 32 MiB and more, and below that it recycles a freed block or trims the top of its heap
# and faults it in again, depending on the heap's state: 8 MiB outputs (8,192 x 256) cost
# 0.98 ms pooled and 2.3 ms from glibc in the same process (forward), 4,096 x 768 the same
# either way. Blocks are whole 2 MiB huge pages, so smaller outputs would waste too much.
POOL_MIN_BYTES = 4 << 20
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

_lock = threading.Lock()
_state: dict = {"module": None, "error": None, "tried": False, "pool_min_bytes": POOL_MIN_BYTES}


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def source_files() -> list[Path]:
    """Every file the build reads from ``csrc/`` (:data:`CSRC`): sources, then headers."""
    return [CSRC / name for name in (*SOURCES, *HEADERS)]


def _source_bytes() -> bytes:
    """The bytes of every file of :func:`source_files`, each after its name and length (so
    that no two different sets of files give the same bytes)."""
    parts = []
    for path in source_files():
        data = path.read_bytes()
        parts += [f"{path.name}:{len(data)}:".encode(), data]
    return b"".join(parts)


def build_inputs() -> dict[str, bytes | str]:
    """Everything that changes the compiled binary, or where it may be loaded from."""
    return {
        "source": _source_bytes(),
        "flags": " ".join(FLAGS),
        "torch": torch.__version__,
        "torch_path": str(Path(torch.__file__).resolve().parent),
        "python": sys.version,
        "abi": sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag,
        "prefix": sys.prefix,
        "cpu": _cpu_signature(),
    }


def build_key(inputs: dict[str, bytes | str] | None = None) -> str:
    """A short hash of :func:`build_inputs` (or of ``inputs``): the build's cache key."""
    digest = hashlib.sha256()
    for name, value in sorted((build_inputs() if inputs is None else inputs).items()):
        data = value if isinstance(value, bytes) else value.encode()
        # Length-prefixed, so that no two different inputs hash the same bytes.
        digest.update(f"{name}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    """``$RESNORM_KERNEL_CACHE``, else PyTorch's extension root (``$TORCH_EXTENSIONS_DIR``,
    else ``$XDG_CACHE_HOME/torch_extensions``). PyTorch adds a ``py3X_cpu`` folder under its
    default root to keep environments apart; the build key already does that here."""
    root = os.environ.get("RESNORM_KERNEL_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_directory() -> Path:
    """Where this environment's build lives: ``<cache_root>/resnorm_add_norm_cpu_<key>``."""
    return cache_root() / f"resnorm_add_norm_cpu_{build_key()}"


def _needs_compile(directory: Path) -> bool:
    """Whether loading from ``directory`` compiles: no library yet, or one older than a
    source or header (ninja rebuilds on timestamps, e.g. after a checkout rewrote a file)."""
    library = directory / f"{directory.name}.so"
    try:
        built = library.stat().st_mtime
        return any(built < path.stat().st_mtime for path in source_files())
    except FileNotFoundError:
        return True


def load():
    """The compiled module, building it if needed; None if it cannot be had.

    Tried once per process; a build that compiles says so first, on one line of stderr.
    """
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        pool_on, pool_cap = pool_settings_from_environment()  # bad values raise here
        if os.environ.get("RESNORM_KERNELS", "auto") == "reference":
            _state.update(tried=True, error="disabled by RESNORM_KERNELS=reference")
            return None
        try:
            from torch.utils import cpp_extension

            directory = build_directory()
            directory.mkdir(parents=True, exist_ok=True)
            name = directory.name
            if _needs_compile(directory):
                print(
                    f"resnorm: building the fused CPU kernel, once, ~30 s (cached in {directory})",
                    file=sys.stderr,
                    flush=True,
                )
            module = cpp_extension.load(
                name=name,
                sources=[str(CSRC / f) for f in SOURCES],
                extra_cflags=FLAGS,
                build_directory=str(directory),
                verbose=False,
            )
            module.configure_pool(_state["pool_min_bytes"] if pool_on else -1, pool_cap)
            _state.update(module=module)
        except Exception as exc:  # no compiler, no headers, ...: fall back, say why once
            lines = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
            _state.update(error=reason)
            warnings.warn(
                f"resnorm: the compiled CPU add+norm kernel is unavailable ({reason}); "
                "using the pure-PyTorch reference",
                RuntimeWarning,
                stacklevel=3,
            )
        finally:
            _state["tried"] = True
    return _state["module"]


def status() -> dict:
    """Whether the compiled kernel is in use, and why not if it is not (builds it if needed)."""
    module = load()
    return {
        "available": module is not None,
        "reason": _state["error"],
        "build_directory": str(build_directory()),
        "flags": FLAGS,
        "nontemporal_bytes": NONTEMPORAL_BYTES,
        "pool": pool_stats() if module is not None else {},
    }


def parse_bytes(name: str, text: str) -> int:
    """``"512M"`` -> 536870912; a clear ValueError naming ``name`` otherwise."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1:] if value[-1:] in _SUFFIXES and value[-1:] else ""
    number = value[: len(value) - len(suffix)]
    try:
        count = float(number) * _SUFFIXES[suffix]
    except ValueError:
        count = -1.0
    if not number or count < 0:
        raise UsageError(
            f"{name}={text!r} is not a byte count; accepted: a non-negative "
            "number with an optional K, M, G or T suffix (e.g. 4G)"
        )
    return int(count)


def _default_max_cached() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def pool_settings_from_environment() -> tuple[bool, int]:
    """(enabled, max_cached) from ``RESNORM_POOL`` and ``RESNORM_POOL_MAX_CACHED``."""
    enabled = os.environ.get("RESNORM_POOL", "on").strip().lower()
    if enabled not in ("on", "off", "1", "0"):
        raise UsageError(f"RESNORM_POOL={enabled!r} is not accepted; accepted: on, off")
    text = os.environ.get("RESNORM_POOL_MAX_CACHED")
    cap = parse_bytes("RESNORM_POOL_MAX_CACHED", text) if text else _default_max_cached()
    return enabled in ("on", "1"), cap


def configure_pool(
    *, enabled: bool | None = None, min_bytes: int | None = None, max_cached: int | None = None
) -> dict:
    """Change the output pool's settings (None keeps one); returns :func:`pool_stats`.

    Args:
        enabled: False sends every new output to PyTorch's allocator (blocks in use stay
            valid, and come back to the pool's cache when freed); True turns it back on.
        min_bytes: outputs of at least this many bytes come from the pool (default
            :data:`POOL_MIN_BYTES`).
        max_cached: the most free bytes the pool keeps; a freed block beyond it goes back to
            the OS, and lowering it releases blocks at once.
    """
    module = load()
    if module is None:
        raise RuntimeError(f"resnorm: the compiled CPU kernel is unavailable ({_state['error']})")
    for name, value in (("min_bytes", min_bytes), ("max_cached", max_cached)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise UsageError(f"configure_pool: {name} must be a non-negative int, got {value!r}")
    if enabled is not None and not isinstance(enabled, bool):
        raise UsageTypeError(
            f"configure_pool: enabled must be True, False or None, got {enabled!r}"
        )
    stats = module.pool_stats()
    if min_bytes is not None:
        _state["pool_min_bytes"] = min_bytes
    on = stats["min_bytes"] >= 0 if enabled is None else enabled
    module.configure_pool(
        _state["pool_min_bytes"] if on else -1,
        stats["max_cached"] if max_cached is None else max_cached,
    )
    return pool_stats()


def pool_stats() -> dict:
    """The output pool's counters: hits, misses, cached_bytes/blocks, max_cached, ...

    ``min_bytes`` is -1 when the pool is off. Empty when the compiled kernel is unavailable.
    """
    module = load()
    return dict(module.pool_stats()) if module is not None else {}


def empty_cache() -> None:
    """Return the output pool's free blocks to the OS (blocks in use are not affected)."""
    module = load()
    if module is not None:
        module.pool_empty_cache()


def supports(*tensors: torch.Tensor | None) -> bool:
    """True if the compiled kernel handles these tensors (CPU; float32 or bfloat16)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype in DTYPES) for t in tensors)


def forward(x, residual, weight, bias, rms, eps, h_dtype, activation="identity"):
    """Same contract as :func:`resnorm.kernels.reference.forward`, compiled."""
    module = _state["module"]
    h = module.empty_output(*x.shape, h_dtype) if h_dtype is not None else None
    nontemporal = x.numel() * x.element_size() >= NONTEMPORAL_BYTES
    y, mean, rstd = module.add_norm_fwd(
        x, residual, weight, bias, rms, eps, h, nontemporal, activation == "relu"
    )
    return y, (h if h is not None else x.new_empty((0,))), mean, rstd


def backward(dy, dh, h, weight, bias, mean, rstd, rms, need_dw, need_db, activation="identity"):
    """Same contract as :func:`resnorm.kernels.reference.backward`, compiled."""
    module = _state["module"]
    dx = module.empty_output(*dy.shape, dy.dtype)
    nontemporal = dx.numel() * dx.element_size() >= NONTEMPORAL_BYTES
    dw, db = module.add_norm_bwd(
        dy,
        dh,
        h,
        weight,
        bias,
        mean,
        rstd,
        rms,
        need_dw,
        need_db,
        dx,
        nontemporal,
        activation == "relu",
    )
    # float32, as summed (autograd casts them to each parameter's own dtype); empty when not
    # asked for, in float32 all the same, as the fake implementation (ops.py) declares.
    dw = dw if need_dw else dy.new_empty((0,), dtype=torch.float32)
    db = db if need_db else dy.new_empty((0,), dtype=torch.float32)
    return dx, dw, db
