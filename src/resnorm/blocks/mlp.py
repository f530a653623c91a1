"""The residual MLP block of the seed texts, with pre- and post-normalization placements."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice, check_input, check_int
from ..norms import make_norm
from ..norms.factory import NormSpec
from .activations import make_activation
from .residual import ResidualAdd

PLACEMENTS = ("post", "pre")


class ResidualMLPBlock(nn.Module):
    r"""A two-layer residual MLP block on (N, width) features.

    ``placement="post"`` (default) is the seed texts' Keras block, layer for layer::

        h = Norm(Act(Linear(x)))            # Dense(units, activation='relu') -> BN
        y = Act(x + Norm(Linear(h)))        # Dense -> BN -> Add -> ReLU

    ``placement="pre"`` is the pre-activation form of He et al. (2016), whose skip path
    stays an identity from input to output::

        y = x + Linear(Act(Norm(Linear(Act(Norm(x))))))

    ``residual=False`` drops the ``x +`` (same parameters); ``scale``, ``drop_path`` and
    ``layerscale_init`` configure the merge (see :class:`~resnorm.blocks.ResidualAdd`).
    """

    def __init__(self, width: int, norm: NormSpec = "batch", placement: str = "post", *,
                 activation: str = "relu", residual: bool = True, scale=None,
                 layerscale_init: float = 1e-5, drop_path: float = 0.0, dropout: float = 0.0,
                 bias: bool = True, norm_options: dict | None = None) -> None:
        super().__init__()
        self.width = check_int("width", width, minimum=1)
        self.placement = check_choice("placement", placement, PLACEMENTS)
        options = dict(norm_options or {})
        self.fc1 = nn.Linear(width, width, bias=bias)
        self.fc2 = nn.Linear(width, width, bias=bias)
        self.norm1 = make_norm(norm, width, **options)
        self.norm2 = make_norm(norm, width, **options)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merge = ResidualAdd(residual=residual, scale=scale, channels=width,
                                 layerscale_init=layerscale_init, drop_path=drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("input", x, ndims=(2,), channels=self.width, what="ResidualMLPBlock")
        if self.placement == "post":
            h = self.norm1(self.act(self.fc1(x)))
            h = self.norm2(self.fc2(self.dropout(h)))
            return self.act(self.merge(h, x))
        h = self.fc1(self.act(self.norm1(x)))
        h = self.fc2(self.dropout(self.act(self.norm2(h))))
        return self.merge(h, x)

    def extra_repr(self) -> str:
        return f"width={self.width}, placement={self.placement!r}"
