"""Argument checks shared by every layer of the package.

Each check raises a ``ValueError``/``TypeError`` that names the argument, the value it got
and what is accepted, so a user can fix the call without reading our source.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .errors import UsageError, UsageTypeError


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``; otherwise raise ``ValueError``."""
    choices = tuple(choices)
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise UsageError(f"{name}={value!r} is not supported; accepted values: {accepted}")
    return value


def check_options(what: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """The one check of keyword options: ``UsageTypeError`` naming ``what`` (e.g.
    ``create_model('mlp')``), the unknown options (in the order of ``given``) and the
    accepted ones."""
    accepted = list(accepted)
    unknown = [option for option in given if option not in accepted]
    if unknown:
        raise UsageTypeError(
            f"{what} got unexpected option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` if it is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageTypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    finite: bool = False,
) -> float:
    """Return ``float(value)`` if it is a real number inside the given bounds (and, with
    ``finite=True``, not infinite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high or value != value:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
        raise UsageError(f"{name} must be in {interval}, got {value:g}")
    if finite and math.isinf(value):
        raise UsageError(f"{name} must be a finite number, got {value:g}")
    return value


def check_input(
    name: str,
    x: Any,
    *,
    ndims: Iterable[int],
    channels: int | None = None,
    channel_dim: int = 1,
    what: str = "",
) -> None:
    """Check a module input's type, rank and channel count before the first op touches it."""
    import torch

    ndims = tuple(ndims)
    prefix = f"{what}: " if what else ""
    if not isinstance(x, torch.Tensor):
        raise UsageTypeError(f"{prefix}{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ndims:
        accepted = " or ".join(f"{d}-D" for d in ndims)
        raise UsageError(
            f"{prefix}{name} must be {accepted}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    if channels is not None and x.shape[channel_dim] != channels:
        raise UsageError(
            f"{prefix}{name} must have {channels} channels at dim {channel_dim}, "
            f"got shape {tuple(x.shape)}"
        )


DEVICES = "auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps"


def check_device(name: str, value: Any, *, available: bool = False) -> str:
    """Return ``value`` if it names a device a run can use: ``"auto"`` (CUDA when there is
    one), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``. With ``available=True`` also
    check that this machine has it (a config may be built on one machine and run on
    another, so the check is separate)."""
    import torch

    if not isinstance(value, str):
        raise UsageTypeError(
            f"{name} must be a string ({DEVICES}), got {value!r} ({type(value).__name__})"
        )
    if value == "auto":
        return value
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    if (
        device is None
        or device.type not in ("cpu", "cuda", "mps")
        or (device.index is not None and device.type != "cuda")
    ):
        raise UsageError(f"{name}={value!r} is not a device; accepted: {DEVICES}")
    if available and device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UsageError(f"{name}={value!r} but CUDA is not available here; use cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"{name}={value!r} but this machine has {count} CUDA device(s): "
                f"cuda:0 to cuda:{count - 1}"
            )
    if available and device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{name}={value!r} but MPS is not available here; use cpu")
    return value


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine; ``None`` where the OS does not say."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(nbytes: float) -> str:
    """``"23.4 GiB"``; thousands separators for the absurd sizes a typo asks for."""
    gib = nbytes / 2**30
    return f"{gib:,.0f} GiB" if gib >= 100 else f"{gib:.3g} GiB"


def check_fits_in_memory(what: str, nbytes: int, *, note: str = "") -> None:
    """Raise :class:`UsageError` if ``nbytes`` (what ``what`` would allocate) exceed this
    machine's physical memory, before anything is allocated: an option with a typo (a
    width or a shape with extra digits) gets one clear line instead of an allocation that
    fails late, swaps the machine to a halt or is killed by the OOM killer. ``note`` says
    how ``nbytes`` was counted."""
    total = physical_memory()
    if total is None or nbytes <= total:
        return
    note = f" ({note})" if note else ""
    raise UsageError(
        f"{what} would need {format_bytes(nbytes)}{note}, more than this "
        f"machine's {format_bytes(total)} of memory"
    )
