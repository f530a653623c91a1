"""The residual MLP block of the seed texts, with pre- and post-normalization placements."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice, check_input, check_int
from ..errors import UsageError
from ..norms import make_norm
from ..norms.factory import FUSED_KINDS, NormSpec
from .activations import make_activation
from .residual import ResidualAdd, ResidualConfig, takes_merge_fields

PLACEMENTS = ("post", "pre")


def fused_norm_options(
    norm_options: dict | None, fused: bool, activation: str
) -> tuple[dict, bool]:
    """The options of a pre-norm MLP's norms, and whether the norms apply the activation
    themselves: fused norms apply a ReLU in the same pass (Norm -> ReLU), so the stack does
    not call its ReLU modules."""
    options = dict(norm_options or {})
    in_norm = bool(fused) and activation == "relu"
    if in_norm:
        options["activation"] = "relu"
    return options, in_norm


@takes_merge_fields
class ResidualMLPBlock(nn.Module):
    r"""A two-layer residual MLP block on (N, width) features.

    ``placement="post"`` (default) is the seed texts' Keras block, layer for layer::

        h = Norm(Act(Linear(x)))            # Dense(units, activation='relu') -> BN
        y = Act(x + Norm(Linear(h)))        # Dense -> BN -> Add -> ReLU

    ``placement="pre"`` is the pre-activation form of He et al. (2016), whose skip path
    stays an identity from input to output::

        y = x + Linear(Act(Norm(Linear(Act(Norm(x))))))

    ``merge`` (a :class:`~resnorm.blocks.ResidualConfig`, or its fields as keyword
    arguments) configures the merge: ``residual=False`` drops the ``x +`` (same
    parameters); ``scale``, ``layerscale_init`` and ``drop_path`` scale or drop the branch.

    ``fused=True`` (pre-norm residual blocks with ``norm="layer"`` or ``"rms"``) builds the
    norms as :class:`~resnorm.norms.FusedAddLayerNorm` / ``FusedAddRMSNorm`` and adds
    :meth:`stream`, with which a stack hands each block's branch to the next block, whose
    first norm adds it to the skip path in the same pass as it normalizes
    (:class:`~resnorm.models.ResidualMLP` does this). With ``activation="relu"`` the norms
    also apply the ReLU that follows each of them (``activation="relu"`` of the fused norms;
    ``self.act`` is then not called). Same parameters and results.
    """

    def __init__(
        self,
        width: int,
        norm: NormSpec = "batch",
        placement: str = "post",
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        bias: bool = True,
        norm_options: dict | None = None,
        fused: bool = False,
        merge: ResidualConfig | None = None,
        **merge_fields,
    ) -> None:
        super().__init__()
        merge = ResidualConfig.resolve(merge, owner=type(self), **merge_fields)
        self.width = check_int("width", width, minimum=1)
        self.placement, self.fused = check_placement(
            "ResidualMLPBlock", placement, fused, norm, merge.residual
        )
        options, self.act_in_norm = fused_norm_options(norm_options, self.fused, activation)
        self.fc1 = nn.Linear(width, width, bias=bias)
        self.fc2 = nn.Linear(width, width, bias=bias)
        self.norm1 = make_norm(norm, width, fused=self.fused, **options)
        self.norm2 = make_norm(norm, width, fused=self.fused, **options)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merge = ResidualAdd(merge, channels=width)

    def stream(self, x: torch.Tensor, pending: torch.Tensor | None):
        """Fused pre-norm step: the block applied to ``x + pending`` (``pending``: the previous
        block's branch, not yet added; None for none). Returns ``(x + pending, branch)``: the
        block's skip input and its own branch, which the caller adds (or hands on)."""
        if pending is None:
            y = self.norm1(x)
        else:
            y, x = self.norm1(pending, x, prenorm=True)
        act = (lambda t: t) if self.act_in_norm else self.act
        h = self.fc1(act(y))
        h = self.fc2(self.dropout(act(self.norm2(h))))
        return x, self.merge.branch_term(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("input", x, ndims=(2,), channels=self.width, what="ResidualMLPBlock")
        if self.fused:
            x, branch = self.stream(x, None)
            return x + branch
        if self.placement == "post":
            h = self.norm1(self.act(self.fc1(x)))
            h = self.norm2(self.fc2(self.dropout(h)))
            return self.act(self.merge(h, x))
        h = self.fc1(self.act(self.norm1(x)))
        h = self.fc2(self.dropout(self.act(self.norm2(h))))
        return self.merge(h, x)

    def extra_repr(self) -> str:
        return f"width={self.width}, placement={self.placement!r}" + (
            ", fused=True" if self.fused else ""
        )


def check_placement(
    what: str, placement: str, fused: bool, norm: NormSpec, residual: bool
) -> tuple[str, bool]:
    """``(placement, fused)`` of a block after checking them: ``placement`` in
    :data:`PLACEMENTS`; ``fused=True`` only for a pre-norm residual block whose norm has a
    fused kind."""
    check_choice("placement", placement, PLACEMENTS)
    if not fused:
        return placement, False
    if not (isinstance(norm, str) and norm in FUSED_KINDS):
        raise UsageError(f"{what}: fused=True needs norm in {FUSED_KINDS}, got {norm!r}")
    if placement != "pre" or not residual:
        raise UsageError(
            f"{what}: fused=True needs a pre-norm residual block (placement='pre', "
            f"residual=True), got placement={placement!r}, residual={residual}"
        )
    return placement, True
