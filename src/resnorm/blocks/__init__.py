"""Residual blocks: the merge, scaling and drop-path, and the blocks of the classic networks.

Every block builds its normalization with :func:`resnorm.norms.make_norm` (any kind, or
``"none"``) and merges its branch through :class:`ResidualAdd`, configured by one
:class:`ResidualConfig` (``merge=``) or its fields as keyword arguments
(``residual=False`` gives the plain twin).
"""

from .activations import ACTIVATIONS, make_activation
from .conv import (
    SHORTCUTS,
    BasicBlock,
    Bottleneck,
    PadShortcut,
    PreActBasicBlock,
    PreActBottleneck,
    make_shortcut,
)
from .dense import DenseBlock, DenseLayer, Transition
from .mlp import PLACEMENTS, ResidualMLPBlock
from .recurrent import (
    RECURRENT_NORMS,
    LayerNormGRU,
    LayerNormGRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
)
from .residual import (
    SCALES,
    DropPath,
    LayerScale,
    Residual,
    ResidualAdd,
    ResidualConfig,
    ScalarGain,
    make_branch_scale,
    takes_merge_fields,
)
from .transformer import FeedForward, SelfAttention, TransformerBlock, deepnorm_constants

__all__ = [
    "ACTIVATIONS",
    "BasicBlock",
    "Bottleneck",
    "DenseBlock",
    "DenseLayer",
    "DropPath",
    "FeedForward",
    "LayerNormGRU",
    "LayerNormGRUCell",
    "LayerNormLSTM",
    "LayerNormLSTMCell",
    "LayerScale",
    "PLACEMENTS",
    "PadShortcut",
    "PreActBasicBlock",
    "PreActBottleneck",
    "RECURRENT_NORMS",
    "Residual",
    "ResidualAdd",
    "ResidualConfig",
    "ResidualMLPBlock",
    "SCALES",
    "SHORTCUTS",
    "ScalarGain",
    "SelfAttention",
    "Transition",
    "TransformerBlock",
    "deepnorm_constants",
    "make_activation",
    "make_branch_scale",
    "make_shortcut",
    "takes_merge_fields",
]
