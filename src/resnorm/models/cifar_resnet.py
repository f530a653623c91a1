"""The CIFAR ResNets and their plain twins, in 2-D and 1-D.

- CIFAR ResNets (He et al. 2015, section 4.2): a 3x3 stem, three stages of 16/32/64
  channels with n basic blocks each (6n+2 layers), option-A shortcuts; ``resnet20`` ...
  ``resnet1202`` and the plain twins ``plain20`` ... ``plain110``.
- The same layout with 1-D convolutions for sequences such as MNIST-1D: ``resnet1d_20``...
- Pre-activation CIFAR ResNets (He et al. 2016): bottleneck, 9n+2 layers,
  ``preact_resnet164`` and ``preact_resnet1001``.

Each registered name is a function after the class (``resnet56()``, as in torchvision),
which builds a :class:`CifarResNet`; its ``forward`` is the model's. The ImageNet ResNets
are in :mod:`resnorm.models.imagenet_resnet`.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_int
from ..blocks import (
    PLACEMENTS,
    BasicBlock,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    ResidualConfig,
    make_activation,
    takes_merge_fields,
)
from ..blocks.conv import conv
from ..errors import UsageError
from ..norms import make_norm
from ..norms.factory import NormSpec
from .common import CifarSizedNet, build_stages
from .registry import register_model

BLOCKS = {
    ("basic", "post"): BasicBlock,
    ("bottleneck", "post"): Bottleneck,
    ("basic", "pre"): PreActBasicBlock,
    ("bottleneck", "pre"): PreActBottleneck,
}


def blocks_per_stage(depth: int, block: str) -> int:
    """n of a CIFAR ResNet of ``depth`` = 6n+2 (basic blocks) or 9n+2 (bottlenecks)."""
    check_choice("block", block, ("basic", "bottleneck"))
    check_int("depth", depth, minimum=1)
    layers_per_block = 2 if block == "basic" else 3
    per_stage, rest = divmod(depth - 2, 3 * layers_per_block)
    if rest or per_stage < 1:
        form = (
            "6n+2 (20, 32, 44, 56, 110, ...)"
            if block == "basic"
            else "9n+2 (29, 56, 164, 1001, ...)"
        )
        raise UsageError(f"depth={depth} is not of the form {form} needed by block={block!r}")
    return per_stage


@takes_merge_fields
class CifarResNet(CifarSizedNet):
    """The CIFAR ResNet of He et al. (2015): ``conv3x3 -> 3 stages -> pool -> fc``.

    ``depth`` is 6n+2 with basic blocks (n blocks of two 3x3 convolutions per stage) or
    9n+2 with bottlenecks. ``widths`` are the stages' widths (bottleneck blocks output
    4x that). ``placement`` says where the norms sit, as in the MLP and Transformer
    blocks: ``"post"``, the original ``Conv -> Norm -> Act`` with the activation after the
    addition; ``"pre"``, the pre-activation blocks of He et al. (2016), ``Norm -> Act ->
    Conv`` with a clean skip path: the stem is then a bare convolution and the network
    ends with ``Norm -> Act``. ``dims=1`` builds the same network with 1-D convolutions
    for (N, C, L) sequences. ``merge`` (a :class:`~resnorm.blocks.ResidualConfig`, or its
    fields as keyword arguments) configures every block's merge: ``residual=False`` is
    the plain twin; ``drop_path`` is the last block's stochastic-depth rate (linear rule).
    """

    # What depth= counts (models.registry.depth_unit): convolutions and the classifier,
    # the paper's 6n+2.
    depth_unit = "weight layers"

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        *,
        block: str = "basic",
        placement: str = "post",
        norm: NormSpec = "batch",
        shortcut: str = "A",
        dims: int = 2,
        widths: tuple[int, int, int] = (16, 32, 64),
        activation: str = "relu",
        zero_init_last: bool = False,
        norm_options: dict | None = None,
        merge: ResidualConfig | None = None,
        **merge_fields,
    ) -> None:
        super().__init__()
        merge = ResidualConfig.resolve(merge, owner=type(self), **merge_fields)
        per_stage = blocks_per_stage(depth, block)
        self.placement = check_choice("placement", placement, PLACEMENTS)
        if len(widths) != 3:
            raise UsageError(f"widths must give 3 stage widths, got {widths!r}")
        self.depth, self.in_channels, self.dims = depth, in_channels, dims
        options = dict(norm_options or {})
        self.conv1 = conv(dims, in_channels, widths[0], 3)
        if placement == "post":
            self.bn1 = make_norm(norm, widths[0], **options)
        self.act = make_activation(activation)
        block_options = {
            "norm": norm,
            "shortcut": shortcut,
            "dims": dims,
            "activation": activation,
            "norm_options": options,
        }
        if placement == "post":
            block_options["zero_init_last"] = zero_init_last
        stages, out_channels = build_stages(
            BLOCKS[block, placement],
            widths[0],
            tuple(widths),
            (per_stage,) * 3,
            (1, 2, 2),
            merge,
            **block_options,
        )
        self.layer1, self.layer2, self.layer3 = stages
        if placement == "pre":
            self.final_norm = make_norm(norm, out_channels, **options)
        self._add_head(out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self._checked(x))
        if self.placement == "post":
            x = self.act(self.bn1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.placement == "pre":
            x = self.act(self.final_norm(x))
        return self._classify(x)


@register_model
def resnet_cifar(**kwargs) -> CifarResNet:
    """CIFAR ResNet of any depth 6n+2 (or 9n+2 with block='bottleneck')

    "Deep Residual Learning for Image Recognition" (He et al. 2015), section 4.2. At the default
    depth of 20: 269,722 parameters.
    """
    return CifarResNet(**kwargs)


@register_model(fixed={"depth": 20})
def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20, option-A shortcuts (He et al. 2015, CIFAR-10 (Table 6))

    269,722 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition", section
    4.2.
    """
    return CifarResNet(depth=20, **kwargs)


@register_model(fixed={"depth": 32})
def resnet32(**kwargs) -> CifarResNet:
    """ResNet-32, option-A shortcuts (He et al. 2015, CIFAR-10 (Table 6))

    464,154 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition", section
    4.2.
    """
    return CifarResNet(depth=32, **kwargs)


@register_model(fixed={"depth": 44})
def resnet44(**kwargs) -> CifarResNet:
    """ResNet-44, option-A shortcuts (He et al. 2015, CIFAR-10 (Table 6))

    658,586 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition", section
    4.2.
    """
    return CifarResNet(depth=44, **kwargs)


@register_model(fixed={"depth": 56})
def resnet56(**kwargs) -> CifarResNet:
    """ResNet-56, option-A shortcuts (He et al. 2015, CIFAR-10 (Table 6))

    853,018 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition", section
    4.2.
    """
    return CifarResNet(depth=56, **kwargs)


@register_model(fixed={"depth": 110})
def resnet110(**kwargs) -> CifarResNet:
    """ResNet-110, option-A shortcuts (He et al. 2015, CIFAR-10 (Table 6))

    1,727,962 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition",
    section 4.2.
    """
    return CifarResNet(depth=110, **kwargs)


@register_model(fixed={"depth": 1202})
def resnet1202(**kwargs) -> CifarResNet:
    """ResNet-1202, option-A shortcuts (He et al. 2015, CIFAR-10 (Table 6))

    19,421,274 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition",
    section 4.2.
    """
    return CifarResNet(depth=1202, **kwargs)


@register_model(fixed={"depth": 20, "residual": False})
def plain20(**kwargs) -> CifarResNet:
    """plain-20: ResNet-20 without skip paths

    269,722 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition", section
    4.2 and Figure 6.
    """
    return CifarResNet(depth=20, residual=False, **kwargs)


@register_model(fixed={"depth": 32, "residual": False})
def plain32(**kwargs) -> CifarResNet:
    """plain-32: ResNet-32 without skip paths

    464,154 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition", section
    4.2 and Figure 6.
    """
    return CifarResNet(depth=32, residual=False, **kwargs)


@register_model(fixed={"depth": 44, "residual": False})
def plain44(**kwargs) -> CifarResNet:
    """plain-44: ResNet-44 without skip paths

    658,586 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition", section
    4.2 and Figure 6.
    """
    return CifarResNet(depth=44, residual=False, **kwargs)


@register_model(fixed={"depth": 56, "residual": False})
def plain56(**kwargs) -> CifarResNet:
    """plain-56: ResNet-56 without skip paths

    853,018 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition", section
    4.2 and Figure 6.
    """
    return CifarResNet(depth=56, residual=False, **kwargs)


@register_model(fixed={"depth": 110, "residual": False})
def plain110(**kwargs) -> CifarResNet:
    """plain-110: ResNet-110 without skip paths

    1,727,962 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition",
    section 4.2 and Figure 6.
    """
    return CifarResNet(depth=110, residual=False, **kwargs)


@register_model
def resnet1d(*, dims: int = 1, in_channels: int = 1, **kwargs) -> CifarResNet:
    """the CIFAR ResNet layout with 1-D convolutions, any depth 6n+2

    The layout of "Deep Residual Learning for Image Recognition" (He et al. 2015), section 4.2,
    for the sequences of MNIST-1D ("Scaling Down Deep Learning", Greydanus 2020). At the default
    depth of 20: 91,162 parameters.
    """
    return CifarResNet(dims=dims, in_channels=in_channels, **kwargs)


@register_model(fixed={"depth": 20, "dims": 1})
def resnet1d_20(*, in_channels: int = 1, **kwargs) -> CifarResNet:
    """ResNet-20 with 1-D convolutions (MNIST-1D)

    91,162 parameters. The ResNet-20 of "Deep Residual Learning for Image Recognition" (He et
    al. 2015), section 4.2, for the sequences of MNIST-1D ("Scaling Down Deep Learning",
    Greydanus 2020).
    """
    return CifarResNet(depth=20, dims=1, in_channels=in_channels, **kwargs)


@register_model(fixed={"depth": 20, "dims": 1, "residual": False})
def plain1d_20(*, in_channels: int = 1, **kwargs) -> CifarResNet:
    """plain-20 with 1-D convolutions

    91,162 parameters. The plain-20 of "Deep Residual Learning for Image Recognition" (He et al.
    2015), Figure 6, for the sequences of MNIST-1D ("Scaling Down Deep Learning", Greydanus
    2020).
    """
    return CifarResNet(depth=20, dims=1, residual=False, in_channels=in_channels, **kwargs)


@register_model(fixed={"depth": 32, "dims": 1})
def resnet1d_32(*, in_channels: int = 1, **kwargs) -> CifarResNet:
    """ResNet-32 with 1-D convolutions (MNIST-1D)

    156,570 parameters. The ResNet-32 of "Deep Residual Learning for Image Recognition" (He et
    al. 2015), section 4.2, for the sequences of MNIST-1D ("Scaling Down Deep Learning",
    Greydanus 2020).
    """
    return CifarResNet(depth=32, dims=1, in_channels=in_channels, **kwargs)


@register_model(fixed={"depth": 32, "dims": 1, "residual": False})
def plain1d_32(*, in_channels: int = 1, **kwargs) -> CifarResNet:
    """plain-32 with 1-D convolutions

    156,570 parameters. The plain-32 of "Deep Residual Learning for Image Recognition" (He et
    al. 2015), Figure 6, for the sequences of MNIST-1D ("Scaling Down Deep Learning", Greydanus
    2020).
    """
    return CifarResNet(depth=32, dims=1, residual=False, in_channels=in_channels, **kwargs)


@register_model(fixed={"depth": 44, "dims": 1})
def resnet1d_44(*, in_channels: int = 1, **kwargs) -> CifarResNet:
    """ResNet-44 with 1-D convolutions (MNIST-1D)

    221,978 parameters. The ResNet-44 of "Deep Residual Learning for Image Recognition" (He et
    al. 2015), section 4.2, for the sequences of MNIST-1D ("Scaling Down Deep Learning",
    Greydanus 2020).
    """
    return CifarResNet(depth=44, dims=1, in_channels=in_channels, **kwargs)


@register_model(fixed={"depth": 44, "dims": 1, "residual": False})
def plain1d_44(*, in_channels: int = 1, **kwargs) -> CifarResNet:
    """plain-44 with 1-D convolutions

    221,978 parameters. The plain-44 of "Deep Residual Learning for Image Recognition" (He et
    al. 2015), Figure 6, for the sequences of MNIST-1D ("Scaling Down Deep Learning", Greydanus
    2020).
    """
    return CifarResNet(depth=44, dims=1, residual=False, in_channels=in_channels, **kwargs)


@register_model(fixed={"depth": 56, "dims": 1})
def resnet1d_56(*, in_channels: int = 1, **kwargs) -> CifarResNet:
    """ResNet-56 with 1-D convolutions (MNIST-1D)

    287,386 parameters. The ResNet-56 of "Deep Residual Learning for Image Recognition" (He et
    al. 2015), section 4.2, for the sequences of MNIST-1D ("Scaling Down Deep Learning",
    Greydanus 2020).
    """
    return CifarResNet(depth=56, dims=1, in_channels=in_channels, **kwargs)


@register_model(fixed={"depth": 56, "dims": 1, "residual": False})
def plain1d_56(*, in_channels: int = 1, **kwargs) -> CifarResNet:
    """plain-56 with 1-D convolutions

    287,386 parameters. The plain-56 of "Deep Residual Learning for Image Recognition" (He et
    al. 2015), Figure 6, for the sequences of MNIST-1D ("Scaling Down Deep Learning", Greydanus
    2020).
    """
    return CifarResNet(depth=56, dims=1, residual=False, in_channels=in_channels, **kwargs)


@register_model(fixed={"depth": 110, "dims": 1})
def resnet1d_110(*, in_channels: int = 1, **kwargs) -> CifarResNet:
    """ResNet-110 with 1-D convolutions (MNIST-1D)

    581,722 parameters. The ResNet-110 of "Deep Residual Learning for Image Recognition" (He et
    al. 2015), section 4.2, for the sequences of MNIST-1D ("Scaling Down Deep Learning",
    Greydanus 2020).
    """
    return CifarResNet(depth=110, dims=1, in_channels=in_channels, **kwargs)


@register_model(fixed={"depth": 110, "dims": 1, "residual": False})
def plain1d_110(*, in_channels: int = 1, **kwargs) -> CifarResNet:
    """plain-110 with 1-D convolutions

    581,722 parameters. The plain-110 of "Deep Residual Learning for Image Recognition" (He et
    al. 2015), Figure 6, for the sequences of MNIST-1D ("Scaling Down Deep Learning", Greydanus
    2020).
    """
    return CifarResNet(depth=110, dims=1, residual=False, in_channels=in_channels, **kwargs)


@register_model(fixed={"placement": "pre"})
def preact_resnet(*, block: str = "bottleneck", shortcut: str = "B", **kwargs) -> CifarResNet:
    """pre-activation CIFAR ResNet (He et al. 2016), bottleneck, any depth 9n+2

    "Identity Mappings in Deep Residual Networks" (He et al. 2016). At the default depth of 20
    (2 blocks per stage; the paper's depths are 164 and 1001): 219,482 parameters.
    """
    return CifarResNet(placement="pre", block=block, shortcut=shortcut, **kwargs)


@register_model(fixed={"depth": 164, "placement": "pre", "block": "bottleneck"})
def preact_resnet164(*, shortcut: str = "B", **kwargs) -> CifarResNet:
    """pre-activation ResNet-164, bottleneck (He et al. 2016)

    1,703,258 parameters. He et al. 2016, "Identity Mappings in Deep Residual Networks", Table 3
    (CIFAR).
    """
    return CifarResNet(depth=164, placement="pre", block="bottleneck", shortcut=shortcut, **kwargs)


@register_model(fixed={"depth": 1001, "placement": "pre", "block": "bottleneck"})
def preact_resnet1001(*, shortcut: str = "B", **kwargs) -> CifarResNet:
    """pre-activation ResNet-1001, bottleneck (He et al. 2016)

    10,327,706 parameters. He et al. 2016, "Identity Mappings in Deep Residual Networks", Table
    3 (CIFAR).
    """
    return CifarResNet(depth=1001, placement="pre", block="bottleneck", shortcut=shortcut, **kwargs)
