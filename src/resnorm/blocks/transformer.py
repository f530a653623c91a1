"""Transformer encoder block with pre- or post-normalization, DeepNorm and residual scaling."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_float, check_input, check_int
from ..errors import UsageError
from ..norms import make_norm
from ..norms.factory import NormSpec
from .activations import make_activation
from .mlp import check_placement
from .residual import ResidualAdd, ResidualConfig, takes_merge_fields


def deepnorm_constants(num_layers: int) -> tuple[float, float]:
    """DeepNorm's ``(alpha, beta)`` for an encoder of ``num_layers`` blocks (Wang et al.,
    2022, "DeepNet"): ``alpha = (2N)^(1/4)`` weights the skip path, ``beta = (8N)^(-1/4)``
    scales the initialization of the feed-forward, value and output projections."""
    check_int("num_layers", num_layers, minimum=1)
    return (2 * num_layers) ** 0.25, (8 * num_layers) ** -0.25


def _deepnorm_merge(
    merge: ResidualConfig, placement: str, num_layers: int
) -> tuple[ResidualConfig, float]:
    """``merge`` with DeepNorm's skip weight, and DeepNorm's ``beta``, for a post-norm
    block in a stack of ``num_layers``."""
    if placement != "post":
        raise UsageError(
            "deepnorm_layers needs placement='post' (DeepNorm is a post-norm "
            f"scheme), got placement={placement!r}"
        )
    if merge.skip_weight != 1.0:
        raise UsageError(
            f"deepnorm_layers sets the skip weight to (2N)^(1/4); leave "
            f"skip_weight at 1, got skip_weight={merge.skip_weight:g}"
        )
    alpha, beta = deepnorm_constants(num_layers)
    return dataclasses.replace(merge, skip_weight=alpha), beta


class SelfAttention(nn.Module):
    """Multi-head self-attention on (N, T, C) with a fused ``qkv`` projection and
    ``torch.nn.functional.scaled_dot_product_attention``."""

    def __init__(
        self, dim: int, heads: int, *, dropout: float = 0.0, bias: bool = True, causal: bool = False
    ) -> None:
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("heads", heads, minimum=1)
        if dim % heads:
            raise UsageError(f"heads={heads} must divide dim={dim}")
        self.dim, self.heads, self.causal = dim, heads, bool(causal)
        self.dropout = check_float("attn_dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(n, t, c))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, causal={self.causal}"


class FeedForward(nn.Module):
    """``Linear(dim, hidden) -> Act -> Dropout -> Linear(hidden, dim)``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


@takes_merge_fields
class TransformerBlock(nn.Module):
    r"""A Transformer encoder block on tokens (N, T, dim).

    ``placement="pre"`` (Pre-LN; trains without warm-up, Xiong et al. 2020)::

        x = x + Attn(Norm1(x));   x = x + FFN(Norm2(x))

    ``placement="post"`` (the original Post-LN)::

        x = Norm1(x + Attn(x));   x = Norm2(x + FFN(x))

    ``deepnorm_layers=N`` turns a post-norm block into DeepNorm (Wang et al. 2022):
    ``x = Norm(alpha * x + f(x))`` with the skip weight ``alpha = (2N)^(1/4)`` and the
    feed-forward, value
    and output projections initialized with Xavier-normal gain ``beta = (8N)^(-1/4)``,
    where N is the number of blocks in the stack. Any normalization kind works
    (``norm="rms"``, ``"dyt"``, ``"batch"`` (over batch and tokens), ``"none"``, ...);
    ``merge`` (a :class:`~resnorm.blocks.ResidualConfig`, or its fields as keyword
    arguments) configures both merges: ``residual=False`` removes both skip paths;
    ``scale`` and ``drop_path`` scale or drop the branches.

    ``fused=True`` (pre-norm, ``norm="layer"`` or ``"rms"``) adds each residual branch to
    the skip path in the same pass as the next norm normalizes the sum
    (:func:`resnorm.kernels.add_norm`); :meth:`stream` carries the last branch over to the
    next block's first norm (:class:`~resnorm.models.TransformerClassifier` does this).
    Same parameters and results.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        norm: NormSpec = "layer",
        placement: str = "pre",
        *,
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        deepnorm_layers: int | None = None,
        causal: bool = False,
        norm_options: dict | None = None,
        fused: bool = False,
        merge: ResidualConfig | None = None,
        **merge_fields,
    ) -> None:
        super().__init__()
        merge = ResidualConfig.resolve(merge, owner=type(self), **merge_fields)
        self.dim = check_int("dim", dim, minimum=1)
        self.placement, self.fused = check_placement(
            "TransformerBlock", placement, fused, norm, merge.residual
        )
        check_float("mlp_ratio", mlp_ratio, low=0.0, low_inclusive=False)
        options = {"channel_dim": -1, **(norm_options or {})}
        if deepnorm_layers is not None:
            merge, beta = _deepnorm_merge(merge, placement, deepnorm_layers)
        self.deepnorm_layers = deepnorm_layers
        self.norm1 = make_norm(norm, dim, fused=self.fused, **options)
        self.attn = SelfAttention(dim, heads, dropout=attn_dropout, causal=causal)
        self.merge1 = ResidualAdd(merge, channels=dim, channel_dim=-1)
        self.norm2 = make_norm(norm, dim, fused=self.fused, **options)
        self.mlp = FeedForward(dim, max(1, round(dim * mlp_ratio)), activation, dropout)
        self.merge2 = ResidualAdd(merge, channels=dim, channel_dim=-1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        if deepnorm_layers is not None:
            self._deepnorm_init(beta)

    def _deepnorm_init(self, beta: float) -> None:
        dim = self.dim
        qkv = self.attn.qkv.weight
        # The fused qkv holds three (dim, dim) projections; each gets the Xavier std of its
        # own shape, as the separate q_proj, k_proj and v_proj of the paper do.
        nn.init.xavier_normal_(qkv[:dim], gain=1.0)  # query
        nn.init.xavier_normal_(qkv[dim : 2 * dim], gain=1.0)  # key
        nn.init.xavier_normal_(qkv[2 * dim :], gain=beta)  # value
        for layer in (self.attn.proj, self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_normal_(layer.weight, gain=beta)

    def stream(self, x: torch.Tensor, pending: torch.Tensor | None):
        """Fused pre-norm step: the block applied to ``x + pending`` (``pending``: the previous
        block's last branch, not yet added; None for none). Returns ``(skip, branch)``, whose
        sum is the block's output, for the caller to add or hand on."""
        if pending is None:
            y = self.norm1(x)
        else:
            y, x = self.norm1(pending, x, prenorm=True)
        branch = self.merge1.branch_term(self.dropout(self.attn(y)))
        y, x = self.norm2(branch, x, prenorm=True)
        return x, self.merge2.branch_term(self.dropout(self.mlp(y)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(
            "input", x, ndims=(3,), channels=self.dim, channel_dim=-1, what="TransformerBlock"
        )
        if self.fused:
            x, branch = self.stream(x, None)
            return x + branch
        if self.placement == "pre":
            x = self.merge1(self.dropout(self.attn(self.norm1(x))), x)
            return self.merge2(self.dropout(self.mlp(self.norm2(x))), x)
        x = self.norm1(self.merge1(self.dropout(self.attn(x)), x))
        return self.norm2(self.merge2(self.dropout(self.mlp(x)), x))

    def extra_repr(self) -> str:
        text = f"dim={self.dim}, placement={self.placement!r}" + (
            ", fused=True" if self.fused else ""
        )
        return text + (f", deepnorm_layers={self.deepnorm_layers}" if self.deepnorm_layers else "")
