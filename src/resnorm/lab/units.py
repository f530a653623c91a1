"""The lab's units of work: a run, or the runs of one grid point that differ only in their
seed, trained together as one stacked computation (:func:`resnorm.train.fit_stacked`)."""

from __future__ import annotations

import dataclasses

from .study import RunSpec, Study


def plan_units(specs: list[RunSpec], study: Study, *, stack: bool = True) -> list[tuple]:
    """The units of work of ``specs``, in grid order: with ``stack``, the runs that differ
    only in their seed form one unit, trained together as one stacked computation (see
    :func:`resnorm.train.fit_stacked`), at most :data:`MAX_STACK` runs a unit; without,
    or for an init-only study, every run is a unit of its own."""
    if not stack or study.init_only:
        return [(spec,) for spec in specs]
    groups: dict[RunSpec, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(dataclasses.replace(spec, seed=0), []).append(spec)
    return [
        tuple(group[i : i + MAX_STACK])
        for group in groups.values()
        for i in range(0, len(group), MAX_STACK)
    ]


MAX_STACK = 16


def resolve_stack(stack: bool | None, device: str) -> bool:
    """Whether the lab stacks: ``stack`` when given, else (``None``, the default) on CUDA
    and not on the CPU. Measured with bench/lab_speed.py (README): on an H100 a stack of
    12-24 seeds and learning rates trains 2.3-3.2x the runs per minute of one run at a
    time; on the CPU the runs' time is in their kernels and stacking measured 0.5-1.2x.
    A rule rather than a timing taken at run time: the same command makes the same
    choice, so it computes the same numbers."""
    if stack is not None:
        return bool(stack)
    from ..train.loop import resolve_device

    return resolve_device(device).type == "cuda"
