"""Residual MLPs built from the seed texts' block."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice, check_int
from ..blocks import ResidualConfig, ResidualMLPBlock, make_activation, takes_merge_fields
from ..blocks.mlp import PLACEMENTS, fused_norm_options
from ..errors import UsageError
from ..norms import make_norm
from ..norms.factory import NormSpec
from .common import per_block_merges
from .registry import register_model


@takes_merge_fields
class ResidualMLP(nn.Module):
    """``Flatten -> input layer -> depth x ResidualMLPBlock -> classifier``.

    The input layer (``Linear(in_features, width)``, then the activation for post-norm
    blocks) is left out when ``in_features == width``: with ``in_features=128, width=128,
    depth=1`` this is the seed texts' Keras model ``Input(128) -> residual_block(128) ->
    Dense(10)`` (34,826 trainable parameters; softmax is left to the loss). Pre-norm stacks
    end with ``Norm -> Act`` before the classifier, as pre-activation ResNets do.
    ``merge`` (a :class:`~resnorm.blocks.ResidualConfig`, or its fields as keyword
    arguments: ``residual=False``, ``scale="rezero"``, ...) configures every block's
    merge; ``drop_path`` is the last block's rate, growing linearly from the first.

    ``fused=True`` runs each residual add with the next norm, and the ReLU after it, as
    one fused pass (:func:`resnorm.kernels.add_norm`; pre-norm residual stacks with
    ``norm="layer"`` or ``"rms"``); same parameters and results. Off by default: at the
    lab's sizes (128-wide activations) `resnorm bench` measures no gain on the CPU; it
    pays off from about a million elements per activation (see docs/kernels.md).
    """

    # What depth= counts (models.registry.depth_unit): residual blocks, two Linear each.
    depth_unit = "blocks"

    def __init__(
        self,
        in_features: int = 40,
        num_classes: int = 10,
        depth: int = 48,
        width: int = 128,
        norm: NormSpec = "batch",
        placement: str = "post",
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        norm_options: dict | None = None,
        fused: bool = False,
        merge: ResidualConfig | None = None,
        **merge_fields,
    ) -> None:
        super().__init__()
        merge = ResidualConfig.resolve(merge, owner=type(self), **merge_fields)
        self.in_features = check_int("in_features", in_features, minimum=1)
        check_int("num_classes", num_classes, minimum=1)
        check_int("depth", depth, minimum=0)
        check_int("width", width, minimum=1)
        check_choice("placement", placement, PLACEMENTS)
        if in_features == width:
            self.stem = nn.Identity()
        elif placement == "post":
            self.stem = nn.Sequential(nn.Linear(in_features, width), make_activation(activation))
        else:
            self.stem = nn.Linear(in_features, width)
        self.fused = bool(fused)
        self.blocks = nn.Sequential(
            *[
                ResidualMLPBlock(
                    width,
                    norm,
                    placement,
                    activation=activation,
                    dropout=dropout,
                    norm_options=norm_options,
                    fused=self.fused,
                    merge=block_merge,
                )
                for block_merge in per_block_merges(depth, merge)
            ]
        )
        if placement == "pre":
            options, self.act_in_norm = fused_norm_options(norm_options, self.fused, activation)
            self.final_norm = make_norm(norm, width, fused=self.fused, **options)
            self.final_act = make_activation(activation)
        self.placement = placement
        self.head = nn.Linear(width, num_classes)

    @property
    def example_input_shape(self) -> tuple[int, ...]:
        """The shape of one input sample."""
        return (self.in_features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x[0].numel() != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UsageError(
                f"ResidualMLP: input must be (N, {self.in_features}) or (N, ...) "
                f"with {self.in_features} features per sample, got {shape}"
            )
        x = self.stem(x.flatten(1))
        if self.fused:
            pending = None
            for block in self.blocks:
                x, pending = block.stream(x, pending)
            y = self.final_norm(x) if pending is None else self.final_norm(pending, x)
            return self.head(y if self.act_in_norm else self.final_act(y))
        x = self.blocks(x)
        if self.placement == "pre":
            x = self.final_act(self.final_norm(x))
        return self.head(x)


@register_model
def mlp(**kwargs) -> ResidualMLP:
    """residual MLP: depth blocks of Linear-ReLU-Norm-Linear-Norm, add, ReLU

    The seed texts' residual block, with the identity shortcut of "Deep Residual Learning for
    Image Recognition" (He et al. 2015). At the default 48 blocks of width 128 over MNIST-1D's
    40 features: 1,616,266 parameters.
    """
    return ResidualMLP(**kwargs)


@register_model
def plain_mlp(*, residual: bool = False, **kwargs) -> ResidualMLP:
    """the residual MLP without its skip connections

    The plain twin of ``mlp`` (He et al. 2015's plain networks): 1,616,266 parameters.
    """
    return ResidualMLP(residual=residual, **kwargs)


@register_model(fixed={"depth": 1, "placement": "post"})
def seed_mlp(*, in_features: int = 128, width: int = 128, **kwargs) -> ResidualMLP:
    """the seed texts' Keras model: Input(128) -> residual_block(128) -> Dense(10)

    34,826 parameters, the trainable parameters of the seed texts' Keras model.
    """
    return ResidualMLP(depth=1, placement="post", in_features=in_features, width=width, **kwargs)
