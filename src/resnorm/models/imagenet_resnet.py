"""The ImageNet ResNets (He et al. 2015) in torchvision's layout and state-dict keys:
``resnet18`` ... ``resnet152`` and the plain twins ``plain18``, ``plain34`` of the paper's
Table 2.

Each registered name is a function after the class (``resnet50()``, as in torchvision),
which builds an :class:`ImageNetResNet`; its ``forward`` is the model's. The CIFAR and 1-D
ResNets are in :mod:`resnorm.models.cifar_resnet`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import BasicBlock, Bottleneck, ResidualConfig, make_activation, takes_merge_fields
from ..errors import UsageError
from ..norms import make_norm
from ..norms.factory import NormSpec
from .common import build_stages, check_image_input, kaiming_init_convs
from .registry import register_model

IMAGENET_LAYOUTS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


@takes_merge_fields
class ImageNetResNet(nn.Module):
    """The ImageNet ResNet of He et al. (2015), in torchvision's layout (v1.5: stride on the
    bottleneck's 3x3): ``conv7x7/2 -> maxpool -> 4 stages (64..512) -> pool -> fc``.
    Parameter names, shapes and counts equal torchvision's ``resnet{depth}``, so its
    weights load with ``load_state_dict``. ``merge`` (a
    :class:`~resnorm.blocks.ResidualConfig`, or its fields as keyword arguments)
    configures every block's merge: ``residual=False`` gives the paper's plain nets.
    """

    # What depth= counts (models.registry.depth_unit): the 18 ... 152 of the names.
    depth_unit = "weight layers"

    def __init__(
        self,
        depth: int = 50,
        num_classes: int = 1000,
        in_channels: int = 3,
        *,
        norm: NormSpec = "batch",
        shortcut: str = "B",
        activation: str = "relu",
        zero_init_last: bool = False,
        norm_options: dict | None = None,
        merge: ResidualConfig | None = None,
        **merge_fields,
    ) -> None:
        super().__init__()
        merge = ResidualConfig.resolve(merge, owner=type(self), **merge_fields)
        if depth not in IMAGENET_LAYOUTS:
            raise UsageError(
                f"depth={depth} is not an ImageNet ResNet depth; accepted: "
                f"{', '.join(map(str, IMAGENET_LAYOUTS))}"
            )
        block, counts = IMAGENET_LAYOUTS[depth]
        self.depth, self.in_channels = depth, in_channels
        options = dict(norm_options or {})
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, 64, **options)
        self.act = make_activation(activation)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, out_channels = build_stages(
            block,
            64,
            (64, 128, 256, 512),
            counts,
            (1, 2, 2, 2),
            merge,
            norm=norm,
            shortcut=shortcut,
            dims=2,
            activation=activation,
            zero_init_last=zero_init_last,
            norm_options=options,
        )
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
