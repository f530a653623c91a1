"""Convolutional residual blocks of the ResNet papers, in 1-D and 2-D.

``BasicBlock`` and ``Bottleneck`` follow He et al. (2015) and torchvision (stride on the
3x3 convolution of the bottleneck, "ResNet v1.5"), with torchvision's module names
(``conv1``, ``bn1``, ..., ``downsample``) so state dicts load both ways. The
pre-activation versions follow He et al. (2016), "Identity Mappings in Deep Residual
Networks". The modules are named ``bn*`` whatever the normalization kind, to keep those keys.
Each block merges its branch as ``merge`` (a :class:`~resnorm.blocks.ResidualConfig`, or its
fields as keyword arguments: ``residual=False``, ``scale=``, ``drop_path=``, ...) says.

Shortcuts when the shape changes (the ResNet paper's options):

- ``"A"``: identity, subsampled by the stride, with zero channels padded on (no parameters;
  the CIFAR ResNets);
- ``"B"``: a 1x1 projection (conv + norm) only where the shape changes (torchvision);
- ``"C"``: a projection on every block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_input, check_int
from ..errors import UsageError
from ..norms import make_norm
from ..norms.factory import NormSpec
from .activations import make_activation
from .residual import ResidualAdd, ResidualConfig, takes_merge_fields

SHORTCUTS = ("A", "B", "C")
CONV_DIMS = (1, 2)


def conv(
    dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    bias: bool = False,
) -> nn.Module:
    """A 1-D or 2-D convolution with "same" padding for odd kernels."""
    check_choice("dims", dims, CONV_DIMS)
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    return cls(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias
    )


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and pad the new channels with zeros."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise UsageError(
                f"shortcut='A' cannot reduce channels ({in_channels} -> "
                f"{out_channels}); use shortcut='B' or 'C'"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[(slice(None), slice(None)) + (slice(None, None, self.stride),) * (x.dim() - 2)]
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, extra))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}"


def make_shortcut(
    option: str,
    in_channels: int,
    out_channels: int,
    stride: int,
    *,
    dims: int = 2,
    norm: NormSpec = "batch",
    norm_options: dict | None = None,
) -> nn.Module | None:
    """The shortcut module for ``option`` ("A", "B" or "C"), or ``None`` for the identity.
    ``norm=None`` gives a projection without normalization (pre-activation blocks)."""
    check_choice("shortcut", option, SHORTCUTS)
    same = in_channels == out_channels and stride == 1
    if option == "A":
        return None if same else PadShortcut(in_channels, out_channels, stride)
    if option == "B" and same:
        return None
    projection = conv(dims, in_channels, out_channels, 1, stride)
    if norm is None:
        return nn.Sequential(projection)
    return nn.Sequential(projection, make_norm(norm, out_channels, **(norm_options or {})))


class _ConvBlock(nn.Module):
    """What every convolutional residual block shares: argument checks, the merge, the
    activation, the shortcut and the input check."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        dims: int,
        activation: str,
        merge: ResidualConfig | None,
        merge_fields: dict,
    ) -> None:
        super().__init__()
        merge = ResidualConfig.resolve(merge, owner=type(self), **merge_fields)
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.out_channels = check_int("out_channels", out_channels, minimum=1)
        self.stride = check_int("stride", stride, minimum=1)
        self.dims = check_choice("dims", dims, CONV_DIMS)
        self.act = make_activation(activation)
        self.merge = ResidualAdd(merge, channels=out_channels)

    def _add_shortcut(
        self,
        option: str,
        norm: NormSpec | None,
        norm_options: dict,
        zero_init: nn.Module | None = None,
    ) -> None:
        """The skip path's projection where ``option`` needs one (none for a plain twin:
        it only exists to make the addition possible), and the scale of the norm
        ``zero_init`` set to zero. Called last, to keep torchvision's order of the state
        dict's keys."""
        self.downsample = (
            make_shortcut(
                option,
                self.in_channels,
                self.out_channels,
                self.stride,
                dims=self.dims,
                norm=norm,
                norm_options=norm_options,
            )
            if self.merge.residual
            else None
        )
        if zero_init is not None:
            _zero_scale(zero_init)

    def _merge_then_act(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The end of a post-activation block: ``Act(out + shortcut(x))``."""
        skip = x if self.downsample is None else self.downsample(x)
        return self.act(self.merge(out, skip))

    def _check(self, x: torch.Tensor) -> None:
        check_input(
            "input", x, ndims=(self.dims + 2,), channels=self.in_channels, what=type(self).__name__
        )

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}, dims={self.dims}"


def _bottleneck_out(planes: int, expansion: int) -> int:
    """A bottleneck's output channels, ``planes * expansion``, after checking both."""
    return check_int("planes", planes, minimum=1) * check_int("expansion", expansion, minimum=1)


@takes_merge_fields
class BasicBlock(_ConvBlock):
    """Two 3x3 convolutions: ``y = Act(BN(Conv(Act(BN(Conv(x))))) + shortcut(x))``.

    ``zero_init_last`` sets the last norm's scale to zero so the block starts as the
    identity (Goyal et al., 2017).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        norm: NormSpec = "batch",
        shortcut: str = "B",
        dims: int = 2,
        activation: str = "relu",
        zero_init_last: bool = False,
        norm_options: dict | None = None,
        merge: ResidualConfig | None = None,
        **merge_fields,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, dims, activation, merge, merge_fields)
        options = dict(norm_options or {})
        self.conv1 = conv(dims, in_channels, out_channels, 3, stride)
        self.bn1 = make_norm(norm, out_channels, **options)
        self.conv2 = conv(dims, out_channels, out_channels, 3)
        self.bn2 = make_norm(norm, out_channels, **options)
        self._add_shortcut(shortcut, norm, options, self.bn2 if zero_init_last else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self._merge_then_act(out, x)


@takes_merge_fields
class Bottleneck(_ConvBlock):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand to ``planes * expansion`` channels:
    ``y = Act(BN(Conv1x1(Act(BN(Conv3x3(Act(BN(Conv1x1(x)))))))) + shortcut(x))``."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        norm: NormSpec = "batch",
        shortcut: str = "B",
        dims: int = 2,
        activation: str = "relu",
        expansion: int = 4,
        zero_init_last: bool = False,
        norm_options: dict | None = None,
        merge: ResidualConfig | None = None,
        **merge_fields,
    ) -> None:
        out_channels = _bottleneck_out(planes, expansion)
        super().__init__(in_channels, out_channels, stride, dims, activation, merge, merge_fields)
        self.expansion = expansion
        options = dict(norm_options or {})
        self.conv1 = conv(dims, in_channels, planes, 1)
        self.bn1 = make_norm(norm, planes, **options)
        self.conv2 = conv(dims, planes, planes, 3, stride)
        self.bn2 = make_norm(norm, planes, **options)
        self.conv3 = conv(dims, planes, out_channels, 1)
        self.bn3 = make_norm(norm, out_channels, **options)
        self._add_shortcut(shortcut, norm, options, self.bn3 if zero_init_last else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self._merge_then_act(out, x)


@takes_merge_fields
class PreActBasicBlock(_ConvBlock):
    """Pre-activation basic block: ``y = x + Conv(Act(BN(Conv(Act(BN(x))))))``.

    A projection shortcut (a bare 1x1 conv: the next block normalizes) takes the
    pre-activated input ``Act(BN(x))``, as in the authors' code; an identity or option-A
    shortcut takes ``x`` itself, so the skip path stays clean from block to block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        norm: NormSpec = "batch",
        shortcut: str = "B",
        dims: int = 2,
        activation: str = "relu",
        norm_options: dict | None = None,
        merge: ResidualConfig | None = None,
        **merge_fields,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, dims, activation, merge, merge_fields)
        options = dict(norm_options or {})
        self.bn1 = make_norm(norm, in_channels, **options)
        self.conv1 = conv(dims, in_channels, out_channels, 3, stride)
        self.bn2 = make_norm(norm, out_channels, **options)
        self.conv2 = conv(dims, out_channels, out_channels, 3)
        self._add_shortcut(shortcut, None, options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        pre = self.act(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.act(self.bn2(out)))
        return self.merge(out, _preact_skip(self.downsample, x, pre))


@takes_merge_fields
class PreActBottleneck(_ConvBlock):
    """Pre-activation bottleneck (ResNet-164 / ResNet-1001 of He et al., 2016):
    ``y = x + Conv1x1(Act(BN(Conv3x3(Act(BN(Conv1x1(Act(BN(x)))))))))``."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        norm: NormSpec = "batch",
        shortcut: str = "B",
        dims: int = 2,
        activation: str = "relu",
        expansion: int = 4,
        norm_options: dict | None = None,
        merge: ResidualConfig | None = None,
        **merge_fields,
    ) -> None:
        out_channels = _bottleneck_out(planes, expansion)
        super().__init__(in_channels, out_channels, stride, dims, activation, merge, merge_fields)
        self.expansion = expansion
        options = dict(norm_options or {})
        self.bn1 = make_norm(norm, in_channels, **options)
        self.conv1 = conv(dims, in_channels, planes, 1)
        self.bn2 = make_norm(norm, planes, **options)
        self.conv2 = conv(dims, planes, planes, 3, stride)
        self.bn3 = make_norm(norm, planes, **options)
        self.conv3 = conv(dims, planes, out_channels, 1)
        self._add_shortcut(shortcut, None, options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        pre = self.act(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.act(self.bn2(out)))
        out = self.conv3(self.act(self.bn3(out)))
        return self.merge(out, _preact_skip(self.downsample, x, pre))


def _preact_skip(downsample: nn.Module | None, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    if downsample is None:
        return x
    if isinstance(downsample, PadShortcut):
        return downsample(x)
    return downsample(pre)


def _zero_scale(norm: nn.Module) -> None:
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise UsageError(
            "zero_init_last=True needs a normalization with a learnable scale "
            f"(got {type(norm).__name__})"
        )
    nn.init.zeros_(weight)
