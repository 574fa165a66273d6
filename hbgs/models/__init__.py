"""Model zoo. Every builder takes `num_classes`; configs in conf/model/ name them by `_target_`."""

from hbgs.models.resnet_cifar import CifarResNet, resnet20, resnet32, resnet56, resnet110
from hbgs.models.torchvision_cifar import resnet18, resnext29_2x32d, resnext29_8x64d, resnext101_32x16d
from hbgs.models.vgg import CifarVGG, vgg16

__all__ = [
    "CifarResNet", "CifarVGG", "resnet18", "resnet20", "resnet32", "resnet56", "resnet110",
    "resnext29_2x32d", "resnext29_8x64d", "resnext101_32x16d", "vgg16",
]
