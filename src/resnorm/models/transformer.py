"""A small Transformer encoder classifier over sequences (MNIST-1D as 40 steps)."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice, check_int
from ..blocks import ResidualConfig, TransformerBlock, takes_merge_fields
from ..errors import UsageError
from ..norms import make_norm
from ..norms.factory import NormSpec
from .common import per_block_merges
from .registry import register_model


def _check_arguments(
    seq_len: int, in_channels: int, depth: int, pool: str, deepnorm: bool, placement: str
) -> None:
    """Refuse the arguments a :class:`TransformerClassifier` cannot be built with, checked
    in this order."""
    check_int("seq_len", seq_len, minimum=1)
    check_int("in_channels", in_channels, minimum=1)
    check_int("depth", depth, minimum=1)
    check_choice("pool", pool, ("mean", "cls"))
    if deepnorm and placement != "post":
        raise UsageError(f"deepnorm=True needs placement='post', got {placement!r}")


def _block_stack(
    depth: int, deepnorm: bool, merge: ResidualConfig, *args, **options
) -> nn.Sequential:
    """``depth`` :class:`~resnorm.blocks.TransformerBlock` s of ``args`` and ``options``,
    each with its merge (:func:`~resnorm.models.common.per_block_merges`) and, with
    ``deepnorm``, DeepNorm's constants from the depth."""
    return nn.Sequential(
        *[
            TransformerBlock(
                *args, deepnorm_layers=depth if deepnorm else None, merge=block_merge, **options
            )
            for block_merge in per_block_merges(depth, merge)
        ]
    )


@takes_merge_fields
class TransformerClassifier(nn.Module):
    """``Linear embedding + learned positions -> depth x TransformerBlock -> pool -> fc``.

    Takes (N, L) sequences of scalars or (N, L, C) sequences of C-vectors. Pre-norm stacks
    end with a final norm (as in GPT-2 and ViT); post-norm and DeepNorm stacks are already
    normalized. ``deepnorm=True`` builds a DeepNorm stack (post-norm, the skip weight
    ``alpha`` and the init gain ``beta`` from the depth). ``pool`` is ``"mean"`` over tokens
    or ``"cls"`` (a learned class token). ``merge`` (a
    :class:`~resnorm.blocks.ResidualConfig`, or its fields as keyword arguments) configures
    every merge; ``drop_path`` is the last block's rate, growing linearly from the first.
    ``fused=True`` runs each residual add with the next norm as one fused pass (pre-norm
    stacks with ``norm="layer"`` or ``"rms"``); same parameters and results. Off by default:
    it pays off on the CPU from about a million elements per activation (docs/kernels.md).
    """

    # What depth= counts (models.registry.depth_unit): Transformer blocks.
    depth_unit = "blocks"

    def __init__(
        self,
        seq_len: int = 40,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        norm: NormSpec = "layer",
        placement: str = "pre",
        *,
        deepnorm: bool = False,
        pool: str = "mean",
        activation: str = "gelu",
        dropout: float = 0.0,
        causal: bool = False,
        norm_options: dict | None = None,
        fused: bool = False,
        merge: ResidualConfig | None = None,
        **merge_fields,
    ) -> None:
        super().__init__()
        merge = ResidualConfig.resolve(merge, owner=type(self), **merge_fields)
        _check_arguments(seq_len, in_channels, depth, pool, deepnorm, placement)
        self.seq_len, self.in_channels, self.pool = seq_len, in_channels, pool
        self.placement = placement
        self.embed = nn.Linear(in_channels, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq_len + (pool == "cls"), dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.fused = bool(fused)
        self.blocks = _block_stack(
            depth,
            deepnorm,
            merge,
            dim,
            heads,
            norm,
            placement,
            mlp_ratio=mlp_ratio,
            activation=activation,
            dropout=dropout,
            causal=causal,
            norm_options=norm_options,
            fused=self.fused,
        )
        self.final_norm = (
            make_norm(norm, dim, channel_dim=-1, fused=self.fused, **(norm_options or {}))
            if placement == "pre"
            else nn.Identity()
        )
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos, std=0.02)
        if self.cls is not None:
            nn.init.trunc_normal_(self.cls, std=0.02)

    @property
    def example_input_shape(self) -> tuple[int, ...]:
        """One sequence: (L,) of scalars, or (L, C)."""
        return (self.seq_len,) if self.in_channels == 1 else (self.seq_len, self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 2 and self.in_channels == 1:
            x = x.unsqueeze(-1)
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != 3
            or x.shape[1] != self.seq_len
            or x.shape[2] != self.in_channels
        ):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UsageError(
                f"TransformerClassifier: input must be (N, {self.seq_len}, "
                f"{self.in_channels})"
                + (f" or (N, {self.seq_len})" if self.in_channels == 1 else "")
                + f", got {shape}"
            )
        x = self.embed(x)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos
        if self.fused:
            pending = None
            for block in self.blocks:
                x, pending = block.stream(x, pending)
            x = self.final_norm(pending, x)
        else:
            x = self.final_norm(self.blocks(x))
        return self.head(x[:, 0] if self.cls is not None else x.mean(1))


@register_model(
    description="small Transformer encoder classifier (pre- or post-norm, "
    "DeepNorm) over sequences; MNIST-1D by default"
)
def transformer(**kwargs) -> TransformerClassifier:
    """A small Transformer encoder classifier over sequences; MNIST-1D by default.

    The encoder of "Attention Is All You Need" (Vaswani et al. 2017), pre-norm by default ("On
    Layer Normalization in the Transformer Architecture", Xiong et al. 2020), or DeepNorm
    ("DeepNet: Scaling Transformers to 1,000 Layers", Wang et al. 2022). At the default 4
    blocks of width 64 over 40 steps: 137,354 parameters.
    """
    return TransformerClassifier(**kwargs)
