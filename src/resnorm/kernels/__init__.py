"""Fused kernels: residual add + layer/RMS norm in one pass over memory.

``add_norm`` is the entry point (a PyTorch custom operator: autograd, ``torch.compile``
without graph breaks, gradcheck); :mod:`resnorm.norms` wraps it in modules
(``FusedAddLayerNorm``, ``FusedAddRMSNorm``). The pure-PyTorch reference stays next to the
compiled kernel as its test oracle and fallback. See ``docs/kernels.md`` for the design,
the numerics and the measurements.
"""

from . import cpu, reference
from .ops import ACTIVATIONS, KINDS, add_norm, kernel_name
from .reference import add_norm_reference

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "add_norm",
    "add_norm_reference",
    "cpu",
    "kernel_name",
    "reference",
]
