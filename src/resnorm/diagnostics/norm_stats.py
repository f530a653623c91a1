"""The :class:`~resnorm.diagnostics.Monitor`'s norm statistics: the gradient norm of every
weight, and the norms of the sampled weight rows and of their change over a step; and the
unit moments :func:`~resnorm.diagnostics.diagnose`'s hooks take of every module output.

Stock PyTorch ops compute them for any tensors. For contiguous float32 CPU tensors the
compiled CPU kernel of :mod:`resnorm.kernels` computes each for the whole model in one call,
summing in float64. That kernel is an optional dependency of the diagnostics, imported
only here and only when asked for (:func:`compiled_norms`). Measured with
``bench/monitor_overhead.py`` (one CPU thread, medians), the Monitor's statistics step takes
1.7x (a 24-block MLP, width 256) to 2.5x (ResNet-56) as long with stock ops; and
``torch._foreach_norm`` sums float32 in float32 on the CPU: the gradient norm of a
1,024 x 1,024 weight comes out 1.4e-5 off a float64 reference, of a 4,096 x 4,096 one 9e-4
off (the kernel: 1e-13). ``diagnose`` uses the kernel the same way, when it can be had:
its unit moments (:meth:`CompiledNorms.unit_moments`, one call per module output instead
of a float64 copy and three ops) and its squared norms
(:func:`~resnorm.diagnostics.stats.squared_norms`: one call where ``torch._foreach_norm``
in float64 takes about ten times as long on small tensors); on the trainability
benchmark's small models that is 15-30% of diagnose's cost over a forward+backward.
"""

from __future__ import annotations

import torch


class CompiledNorms:
    """The compiled kernel's statistics (``norms`` and ``update_norms`` of the module
    :func:`resnorm.kernels.cpu.load` returns): contiguous float32 CPU tensors only."""

    def __init__(self, module) -> None:
        self._module = module

    @staticmethod
    def accepts(t: torch.Tensor) -> bool:
        """Whether the kernel takes this tensor: contiguous float32 on the CPU."""
        return t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()

    @staticmethod
    def takes(tensors: list[torch.Tensor]) -> bool:
        """Whether the kernel computes the norms of these tensors."""
        return all(CompiledNorms.accepts(t) for t in tensors)

    def unit_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The float64 sum over axis 0 of every unit of ``x`` (shaped ``x.shape[1:]``;
        ``(1,)`` for ``x`` of one axis or none) and the float64 sum of squares of all of
        its values, in one pass without a float64 copy (see
        :class:`~resnorm.diagnostics.stats.MomentBatch`); RuntimeError if the kernel does
        not :meth:`accepts` it."""
        return self._module.unit_moments(x)

    def norms(self, tensors: list[torch.Tensor]) -> list[float]:
        """``||t||`` of every tensor, in one call; RuntimeError if one is not :meth:`takes`."""
        return self._module.norms(tensors).tolist()

    def update_norms(
        self, samples: list[torch.Tensor], snapshot: torch.Tensor
    ) -> tuple[list[float], list[float]]:
        """``(||s_i - p_i|| for every i, ||s_i|| for every i)``, where ``p_i`` is sample
        ``s_i``'s segment of ``snapshot`` (the samples laid end to end); ``snapshot`` then
        holds the samples. One pass over memory."""
        change, size = self._module.update_norms(samples, snapshot, True).tolist()
        return change, size


def compiled_norms(compiled: bool | None) -> CompiledNorms | None:
    """The compiled statistics: ``compiled=None`` if the kernel can be had (it is built on
    first use, about 30 s once per machine), ``True`` or a RuntimeError saying why not,
    ``False`` never (nothing of :mod:`resnorm.kernels` is imported)."""
    if compiled is False:
        return None
    from ..kernels import cpu

    module = cpu.load()
    if module is None:
        if compiled:
            raise RuntimeError(
                "Monitor(compiled=True): the compiled CPU kernel is unavailable "
                f"({cpu.status()['reason']})"
            )
        return None
    return CompiledNorms(module)


def tensor_norms(tensors: list[torch.Tensor], compiled: CompiledNorms | None) -> list[float]:
    """``||g||`` of every tensor: one compiled call when the kernel takes them all (it
    refuses others, which then take PyTorch's per-tensor path)."""
    if compiled is not None:
        try:
            return compiled.norms(tensors)
        except RuntimeError:
            pass
    return torch.stack(torch._foreach_norm(tensors)).tolist()


def grouped_update_norms(
    current: torch.Tensor, previous: torch.Tensor, groups: list[tuple[int, int]]
) -> tuple[list[float], list[float]]:
    """Stock ops: ``(||current - previous||, ||current||)`` per sample, in layout order.

    ``current`` and ``previous`` are ``(2, total)`` buffers whose row 1 holds the samples
    laid end to end, in ``groups`` of ``(sample size, number of samples)``; row 0 of
    ``current`` receives the change. One row-wise norm per group then gives both norms of
    all its samples: few ops, whatever the number of layers."""
    torch.sub(current[1], previous[1], out=current[0])
    norms, offset = [], 0
    for size, count in groups:
        end = offset + size * count
        norms.append(torch.linalg.vector_norm(current[:, offset:end].view(2, count, size), dim=2))
        offset = end
    change, weight = torch.cat(norms, dim=1).tolist()
    return change, weight
