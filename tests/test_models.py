"""Every zoo model: forward shape, and params / MACs equal to the figures in the README."""

import pytest
import torch
import torch.nn as nn

from hbgs import models
from hbgs.accounting import count_macs, count_params

# (builder, params, MACs of conv + linear for one 32×32 image): the README's model table.
ZOO = [
    ("resnet20", 269_722, 40_551_040),
    ("resnet32", 464_154, 68_862_592),
    ("resnet56", 853_018, 125_485_696),
    ("resnet110", 1_727_962, 252_887_680),
    ("vgg16", 14_724_042, 313_201_664),
    ("resnet18", 11_173_962, 555_422_720),
    ("resnext29_2x32d", 3_753_034, 578_496_512),
    ("resnext29_8x64d", 34_426_698, 5_387_266_048),
]


@pytest.mark.parametrize("name,params,macs", ZOO)
def test_zoo_model_shape_params_macs(name, params, macs):
    model = getattr(models, name)(num_classes=10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert count_params(model) == params
    assert count_macs(model) == macs


def test_published_cifar_figures():
    """The literature's figures: ResNet-56 0.85-0.86 M params and ~125.7 M MACs (counters that also
    count BatchNorm/ReLU/additions land slightly above our conv+linear count); VGG-16-BN ~313 M MACs."""
    r56, vgg = models.resnet56(), models.vgg16()
    assert 0.85e6 <= count_params(r56) <= 0.86e6
    assert abs(count_macs(r56) - 125.7e6) / 125.7e6 < 0.005
    assert abs(count_macs(vgg) - 313e6) / 313e6 < 0.005


def test_resnet56_has_option_a_shortcuts():
    """No parameters outside the 55 3×3 convs, 55 BatchNorms' affine and the head."""
    model = models.resnet56()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 55 and all(m.kernel_size == (3, 3) for m in convs)


def test_resnext101_32x16d_builds_with_paper_size():
    model = models.resnext101_32x16d(num_classes=10)
    assert 190e6 < count_params(model) < 195e6  # 194 M in the ImageNet version with a 1000-way head
    assert model.layer1[0].conv2.groups == 32


def test_macs_of_a_hand_computed_network():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2),
                        nn.Flatten(), nn.Linear(4 * 16 * 16, 10))
    expected = 32 * 32 * 8 * 3 * 9 + 16 * 16 * 4 * (8 // 2) * 9 + 4 * 16 * 16 * 10
    assert count_macs(net) == expected
    assert count_params(net) == (8 * 27 + 8) + (4 * 4 * 9 + 4) + (1024 * 10 + 10)
