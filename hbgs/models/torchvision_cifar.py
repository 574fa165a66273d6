"""Models built from torchvision's ResNet classes, adapted to 32×32 inputs.

`resnet18`: torchvision's ResNet-18 with the usual CIFAR stem (3×3 stride-1 first conv, no
max-pool); shortcuts are 1×1 conv + BatchNorm projections where the shape changes (option B).
`resnext29_*`: the CIFAR ResNeXt-29 of Xie et al. (2017): a 3×3 stem of 64 channels and three
stages of three bottleneck blocks with outputs 256/512/1024, cardinality C and bottleneck width d.
`resnext101_32x16d`: the ImageNet-shaped model the paper fine-tunes; config only (too big to
train here). With `cifar_stem=True` it takes 32×32 inputs directly.
"""

import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet, resnet18 as tv_resnet18

from hbgs.models.resnet_cifar import _init_weights


def use_cifar_stem(model: ResNet) -> ResNet:
    """Swap the ImageNet stem (7×7 stride 2 + max-pool) for a 3×3 stride-1 conv, keeping 32×32 maps."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def resnet18(num_classes: int = 10) -> ResNet:
    return use_cifar_stem(tv_resnet18(num_classes=num_classes))


class CifarResNeXt(nn.Module):
    def __init__(self, cardinality: int, bottleneck_width: int, num_classes: int = 10, blocks_per_stage: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels, stages = 64, []
        for stage, planes in enumerate((64, 128, 256)):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                out_channels = planes * Bottleneck.expansion
                downsample = None
                if stride != 1 or in_channels != out_channels:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
                    )
                blocks.append(Bottleneck(in_channels, planes, stride, downsample, cardinality, bottleneck_width))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def resnext29_8x64d(num_classes: int = 10) -> CifarResNeXt:
    return CifarResNeXt(8, 64, num_classes)


def resnext29_2x32d(num_classes: int = 10) -> CifarResNeXt:
    return CifarResNeXt(2, 32, num_classes)


def resnext101_32x16d(num_classes: int = 10, cifar_stem: bool = True) -> ResNet:
    model = ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=16, num_classes=num_classes)
    return use_cifar_stem(model) if cifar_stem else model
