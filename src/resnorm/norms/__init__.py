"""Normalization layers and the ``make_norm`` factory.

Each layer's docstring states the formula it computes. Defaults are PyTorch's; Keras's
are one ``convention="keras"`` away, and layer norm's epsilon-outside-the-root variants
one ``convention="eps_outside"`` or ``convention="annotated_transformer"`` away.
"""

from .base import RunningStatsNorm
from .batch import BatchNorm
from .conventions import CONVENTIONS
from .dyt import DyT
from .factory import (
    FUSED_KINDS,
    NORM_CLASSES,
    NORM_KINDS,
    NORM_TABLE,
    NormKind,
    default_num_groups,
    make_norm,
)
from .fused import FusedAddLayerNorm, FusedAddRMSNorm
from .group import GroupNorm, InstanceNorm
from .layer import LayerNorm, LayerNorm2d, RMSNorm
from .sync_batch import (
    SyncBatchNorm,
    convert_sync_batchnorm,
    convert_torch_batchnorm,
    has_batch_norm,
    revert_sync_batchnorm,
)

__all__ = [
    "BatchNorm",
    "CONVENTIONS",
    "DyT",
    "FUSED_KINDS",
    "FusedAddLayerNorm",
    "FusedAddRMSNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LayerNorm2d",
    "NORM_CLASSES",
    "NORM_KINDS",
    "NORM_TABLE",
    "NormKind",
    "RMSNorm",
    "RunningStatsNorm",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "convert_torch_batchnorm",
    "default_num_groups",
    "has_batch_norm",
    "make_norm",
    "revert_sync_batchnorm",
]
