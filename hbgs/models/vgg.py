"""VGG-16 with BatchNorm for 32×32 inputs: the 13 conv layers of Simonyan & Zisserman (2015),
each followed by BatchNorm and ReLU, 5 max-pools taking 32×32 to 1×1, then one linear layer
(512 → classes), the head most CIFAR pruning papers use. 14.73 M params, 313.2 M MACs.
"""

import torch.nn as nn

from hbgs.models.resnet_cifar import _init_weights

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    def __init__(self, layout=VGG16_LAYOUT, num_classes: int = 10):
        super().__init__()
        layers, in_channels = [], 3
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def vgg16(num_classes: int = 10) -> CifarVGG:
    return CifarVGG(VGG16_LAYOUT, num_classes)
