"""Residual networks and their plain twins.

- CIFAR ResNets (He et al. 2015, section 4.2): a 3x3 stem, three stages of 16/32/64
  channels with n basic blocks each (6n+2 layers), option-A shortcuts; ``resnet20`` ...
  ``resnet1202`` and the plain twins ``plain20`` ... ``plain110``.
- The same layout with 1-D convolutions for sequences such as MNIST-1D: ``resnet1d_20``...
- Pre-activation CIFAR ResNets (He et al. 2016): bottleneck, 9n+2 layers,
  ``preact_resnet164`` and ``preact_resnet1001``.
- ImageNet ResNets (torchvision's layout and state-dict keys): ``resnet18`` ... ``resnet152``
  and the plain twins ``plain18``, ``plain34`` of the paper's Table 2.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from .._checks import check_choice, check_int
from ..blocks.conv import conv
from ..blocks import (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck,
                      make_activation)
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


_PAPER = "He et al. 2015, CIFAR-10 (Table 6)"
register_model("resnet_cifar", CifarResNet, "CIFAR ResNet of any depth 6n+2 (or 9n+2 with "
               "block='bottleneck')")
for _d in (20, 32, 44, 56, 110, 1202):
    register_model(f"resnet{_d}", CifarResNet, f"ResNet-{_d}, option-A shortcuts ({_PAPER})",
                   fixed={"depth": _d})
for _d in (20, 32, 44, 56, 110):
    register_model(f"plain{_d}", CifarResNet, f"plain-{_d}: ResNet-{_d} without skip paths",
                   fixed={"depth": _d, "residual": False})

register_model("resnet1d", CifarResNet, "the CIFAR ResNet layout with 1-D convolutions, any "
               "depth 6n+2", dims=1, in_channels=1)
for _d in (20, 32, 44, 56, 110):
    register_model(f"resnet1d_{_d}", CifarResNet, f"ResNet-{_d} with 1-D convolutions "
                   "(MNIST-1D)", fixed={"depth": _d, "dims": 1}, in_channels=1)
    register_model(f"plain1d_{_d}", CifarResNet, f"plain-{_d} with 1-D convolutions",
                   fixed={"depth": _d, "dims": 1, "residual": False}, in_channels=1)

register_model("preact_resnet", CifarResNet, "pre-activation CIFAR ResNet (He et al. 2016), "
               "bottleneck, any depth 9n+2", fixed={"preact": True}, block="bottleneck",
               shortcut="B")
for _d in (164, 1001):
    register_model(f"preact_resnet{_d}", CifarResNet, f"pre-activation ResNet-{_d}, bottleneck "
                   "(He et al. 2016)", fixed={"depth": _d, "preact": True,
                                              "block": "bottleneck"}, shortcut="B")

register_model("resnet_imagenet", ImageNetResNet, "ImageNet ResNet of depth 18/34/50/101/152")
for _d in IMAGENET_LAYOUTS:
    register_model(f"resnet{_d}", ImageNetResNet, f"ResNet-{_d} (ImageNet, torchvision keys)",
                   fixed={"depth": _d})
for _d in (18, 34):
    register_model(f"plain{_d}", ImageNetResNet, f"plain-{_d} (ImageNet, He et al. 2015 "
                   "Table 2)", fixed={"depth": _d, "residual": False})
