"""Residual networks and their plain twins.

- CIFAR ResNets (He et al. 2015, section 4.2): a 3x3 stem, three stages of 16/32/64
  channels with n basic blocks each (6n+2 layers), option-A shortcuts; ``resnet20`` ...
  ``resnet1202`` and the plain twins ``plain20`` ... ``plain110``.
- The same layout with 1-D convolutions for sequences such as MNIST-1D: ``resnet1d_20``...
- Pre-activation CIFAR ResNets (He et al. 2016): bottleneck, 9n+2 layers,
  ``preact_resnet164`` and ``preact_resnet1001``.
- ImageNet ResNets (torchvision's layout and state-dict keys): ``resnet18`` ... ``resnet152``
  and the plain twins ``plain18``, ``plain34`` of the paper's Table 2.

Each registered name is a function at the end of this file (``resnet56()``, as in torchvision),
which builds one of the two classes above; their ``forward`` is the model's.
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice, check_int
from ..blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck, make_activation
from ..blocks.conv import conv
from ..errors import UsageError
from ..norms import make_norm
from .common import check_image_input, drop_path_rates, kaiming_init_convs
from .registry import register_model

BLOCKS = {
    ("basic", False): BasicBlock, ("bottleneck", False): Bottleneck,
    ("basic", True): PreActBasicBlock, ("bottleneck", True): PreActBottleneck,
}


def _stages(block_cls, in_channels: int, planes: tuple[int, ...], counts: tuple[int, ...],
            strides: tuple[int, ...], drop_path: float, **block_options) -> tuple[list, int]:
    """Build one ``nn.Sequential`` of blocks per stage; returns them and the output channels."""
    rates = iter(drop_path_rates(sum(counts), drop_path))
    stages = []
    for width, count, stride in zip(planes, counts, strides):
        blocks = []
        for i in range(count):
            # Basic blocks take their output width, bottlenecks their "planes" (x4 out).
            blocks.append(block_cls(in_channels, width, stride if i == 0 else 1,
                                    drop_path=next(rates), **block_options))
            in_channels = blocks[-1].out_channels
        stages.append(nn.Sequential(*blocks))
    return stages, in_channels


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2015): ``conv3x3 -> 3 stages -> pool -> fc``.

    ``depth`` is 6n+2 with basic blocks (n blocks of two 3x3 convolutions per stage) or
    9n+2 with bottlenecks. ``widths`` are the stages' widths (bottleneck blocks output
    4x that). ``preact=True`` uses pre-activation blocks (He et al., 2016): the stem is a
    bare convolution and the network ends with ``Norm -> Act``. ``dims=1`` builds the same
    network with 1-D convolutions for (N, C, L) sequences. ``residual=False`` is the plain
    twin. ``drop_path`` is the last block's stochastic-depth rate (linear rule).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, *,
                 block: str = "basic", preact: bool = False, norm="batch", shortcut: str = "A",
                 residual: bool = True, dims: int = 2, widths: tuple[int, int, int] = (16, 32, 64),
                 activation: str = "relu", scale=None, layerscale_init: float = 1e-5,
                 drop_path: float = 0.0, zero_init_last: bool = False,
                 norm_options: dict | None = None) -> None:
        super().__init__()
        check_choice("block", block, ("basic", "bottleneck"))
        check_int("depth", depth, minimum=1)
        layers_per_block = 2 if block == "basic" else 3
        per_stage, rest = divmod(depth - 2, 3 * layers_per_block)
        if rest or per_stage < 1:
            form = "6n+2 (20, 32, 44, 56, 110, ...)" if block == "basic" else "9n+2 (29, 56, 164, 1001, ...)"
            raise UsageError(f"depth={depth} is not of the form {form} needed by "
                             f"block={block!r}")
        if len(widths) != 3:
            raise UsageError(f"widths must give 3 stage widths, got {widths!r}")
        self.depth, self.in_channels, self.dims, self.preact = depth, in_channels, dims, preact
        options = dict(norm_options or {})
        self.conv1 = conv(dims, in_channels, widths[0], 3)
        if not preact:
            self.bn1 = make_norm(norm, widths[0], **options)
        self.act = make_activation(activation)
        block_options = {"norm": norm, "shortcut": shortcut, "residual": residual, "dims": dims,
                         "activation": activation, "scale": scale,
                         "layerscale_init": layerscale_init, "norm_options": options}
        if not preact:
            block_options["zero_init_last"] = zero_init_last
        stages, out_channels = _stages(BLOCKS[block, preact], widths[0], tuple(widths),
                                       (per_stage,) * 3, (1, 2, 2), drop_path, **block_options)
        self.layer1, self.layer2, self.layer3 = stages
        if preact:
            self.final_norm = make_norm(norm, out_channels, **options)
        self.pool = (nn.AdaptiveAvgPool1d if dims == 1 else nn.AdaptiveAvgPool2d)(1)
        self.fc = nn.Linear(out_channels, num_classes)
        kaiming_init_convs(self)

    @property
    def example_input_shape(self) -> tuple[int, ...]:
        """One sample: a CIFAR image (C, 32, 32), or an MNIST-1D sequence (C, 40) when 1-D."""
        return (self.in_channels, 40) if self.dims == 1 else (self.in_channels, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_image_input(type(self).__name__, x, self.in_channels, self.dims)
        x = self.conv1(x)
        if not self.preact:
            x = self.act(self.bn1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.preact:
            x = self.act(self.final_norm(x))
        return self.fc(self.pool(x).flatten(1))


IMAGENET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class ImageNetResNet(nn.Module):
    """The ImageNet ResNet of He et al. (2015), in torchvision's layout (v1.5: stride on the
    bottleneck's 3x3): ``conv7x7/2 -> maxpool -> 4 stages (64..512) -> pool -> fc``.
    Parameter names, shapes and counts equal torchvision's ``resnet{depth}``, so its
    weights load with ``load_state_dict``. ``residual=False`` gives the paper's plain nets.
    """

    def __init__(self, depth: int = 50, num_classes: int = 1000, in_channels: int = 3, *,
                 norm="batch", shortcut: str = "B", residual: bool = True,
                 activation: str = "relu", scale=None, layerscale_init: float = 1e-5,
                 drop_path: float = 0.0, zero_init_last: bool = False,
                 norm_options: dict | None = None) -> None:
        super().__init__()
        if depth not in IMAGENET_LAYOUTS:
            raise UsageError(f"depth={depth} is not an ImageNet ResNet depth; accepted: "
                             f"{', '.join(map(str, IMAGENET_LAYOUTS))}")
        block, counts = IMAGENET_LAYOUTS[depth]
        self.depth, self.in_channels = depth, in_channels
        options = dict(norm_options or {})
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, 64, **options)
        self.act = make_activation(activation)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, out_channels = _stages(
            BLOCKS[block, False], 64, (64, 128, 256, 512), counts, (1, 2, 2, 2), drop_path,
            norm=norm, shortcut=shortcut, residual=residual, dims=2, activation=activation,
            scale=scale, layerscale_init=layerscale_init, zero_init_last=zero_init_last,
            norm_options=options)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_channels, num_classes)
        kaiming_init_convs(self)

    @property
    def example_input_shape(self) -> tuple[int, ...]:
        """One ImageNet sample, (C, 224, 224)."""
        return (self.in_channels, 224, 224)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_image_input(type(self).__name__, x, self.in_channels, 2)
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


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


@register_model(fixed={"preact": True})
def preact_resnet(*, block: str = "bottleneck", shortcut: str = "B", **kwargs) -> CifarResNet:
    """pre-activation CIFAR ResNet (He et al. 2016), bottleneck, any depth 9n+2

    "Identity Mappings in Deep Residual Networks" (He et al. 2016). At the default depth of 20
    (2 blocks per stage; the paper's depths are 164 and 1001): 219,482 parameters.
    """
    return CifarResNet(preact=True, block=block, shortcut=shortcut, **kwargs)


@register_model(fixed={"depth": 164, "preact": True, "block": "bottleneck"})
def preact_resnet164(*, shortcut: str = "B", **kwargs) -> CifarResNet:
    """pre-activation ResNet-164, bottleneck (He et al. 2016)

    1,703,258 parameters. He et al. 2016, "Identity Mappings in Deep Residual Networks", Table 3
    (CIFAR).
    """
    return CifarResNet(depth=164, preact=True, block="bottleneck", shortcut=shortcut, **kwargs)


@register_model(fixed={"depth": 1001, "preact": True, "block": "bottleneck"})
def preact_resnet1001(*, shortcut: str = "B", **kwargs) -> CifarResNet:
    """pre-activation ResNet-1001, bottleneck (He et al. 2016)

    10,327,706 parameters. He et al. 2016, "Identity Mappings in Deep Residual Networks", Table
    3 (CIFAR).
    """
    return CifarResNet(depth=1001, preact=True, block="bottleneck", shortcut=shortcut, **kwargs)


@register_model
def resnet_imagenet(**kwargs) -> ImageNetResNet:
    """ImageNet ResNet of depth 18/34/50/101/152

    "Deep Residual Learning for Image Recognition" (He et al. 2015), Table 1. At the default
    depth of 50: 25,557,032 parameters.
    """
    return ImageNetResNet(**kwargs)


@register_model(fixed={"depth": 18})
def resnet18(**kwargs) -> ImageNetResNet:
    """ResNet-18 (ImageNet, torchvision keys)

    11,689,512 parameters, as torchvision's resnet18. He et al. 2015, "Deep Residual Learning
    for Image Recognition", Table 1.
    """
    return ImageNetResNet(depth=18, **kwargs)


@register_model(fixed={"depth": 34})
def resnet34(**kwargs) -> ImageNetResNet:
    """ResNet-34 (ImageNet, torchvision keys)

    21,797,672 parameters, as torchvision's resnet34. He et al. 2015, "Deep Residual Learning
    for Image Recognition", Table 1.
    """
    return ImageNetResNet(depth=34, **kwargs)


@register_model(fixed={"depth": 50})
def resnet50(**kwargs) -> ImageNetResNet:
    """ResNet-50 (ImageNet, torchvision keys)

    25,557,032 parameters, as torchvision's resnet50. He et al. 2015, "Deep Residual Learning
    for Image Recognition", Table 1.
    """
    return ImageNetResNet(depth=50, **kwargs)


@register_model(fixed={"depth": 101})
def resnet101(**kwargs) -> ImageNetResNet:
    """ResNet-101 (ImageNet, torchvision keys)

    44,549,160 parameters, as torchvision's resnet101. He et al. 2015, "Deep Residual Learning
    for Image Recognition", Table 1.
    """
    return ImageNetResNet(depth=101, **kwargs)


@register_model(fixed={"depth": 152})
def resnet152(**kwargs) -> ImageNetResNet:
    """ResNet-152 (ImageNet, torchvision keys)

    60,192,808 parameters, as torchvision's resnet152. He et al. 2015, "Deep Residual Learning
    for Image Recognition", Table 1.
    """
    return ImageNetResNet(depth=152, **kwargs)


@register_model(fixed={"depth": 18, "residual": False})
def plain18(**kwargs) -> ImageNetResNet:
    """plain-18 (ImageNet, He et al. 2015 Table 2)

    11,515,688 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition",
    Tables 1 and 2.
    """
    return ImageNetResNet(depth=18, residual=False, **kwargs)


@register_model(fixed={"depth": 34, "residual": False})
def plain34(**kwargs) -> ImageNetResNet:
    """plain-34 (ImageNet, He et al. 2015 Table 2)

    21,623,848 parameters. He et al. 2015, "Deep Residual Learning for Image Recognition",
    Tables 1 and 2.
    """
    return ImageNetResNet(depth=34, residual=False, **kwargs)
