"""ACRA baselines: uniform and sensitivity-based ratio allocation (docs/algorithms.md §3)."""
import copy

import pytest
import torch
from torch import nn

from hbgs.accounting import count_macs, count_params
from hbgs.errors import HbgsError
from hbgs.models import resnet20
from hbgs.pruning import channel_widths, fold_identity_adapters, wrap_model
from hbgs.pruning.acra import layer_sensitivity, sensitivity_allocation, uniform_allocation
from hbgs.pruning.costs import ReferenceCosts, saved_cost
from hbgs.pruning.ratios import fraction_count, prune_uniform_fraction


class ThreeConvNet(nn.Module):
    """Stem 3→16, then conv-BN-ReLU layers ``a``, ``b``, ``c`` (16→16), pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.a, self.b, self.c = (nn.Conv2d(16, 16, 3, padding=1, bias=False) for _ in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(16) for _ in range(4))
        self.fc = nn.Linear(16, 10)

    def features(self, x):
        for conv, bn in zip((self.stem, self.a, self.b, self.c), self.bns):
            x = torch.relu(bn(conv(x)))
        return x.mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


def wrapped(original):
    model = copy.deepcopy(original)
    wrap_model(model)
    return model


def folded_counts(model, input_size=(3, 32, 32)):
    saved = copy.deepcopy(model)
    fold_identity_adapters(saved)
    return count_params(saved), count_macs(saved, input_size)


def test_fraction_counts():
    assert fraction_count(16, 0.5) == 8
    assert fraction_count(10, 0.25) == 3  # 2.5 rounds half up
    assert fraction_count(16, 1.0, min_channels=2) == 14
    assert fraction_count(16, 0.02) == 0
    assert fraction_count(32, 0.3, groups=4) == 8  # 0.3 · 8 per group → 2 per group


def test_prune_uniform_fraction_prunes_every_layer_on_both_sides():
    model = wrapped(resnet20())
    widths = prune_uniform_fraction(model, 0.5, "l1")
    assert all(w.out_current == w.out_original // 2 and w.in_current == w.in_original // 2
               for w in widths.values())


def test_uniform_ratio_meets_the_flops_target_within_the_tolerance():
    torch.manual_seed(0)
    original = resnet20().eval()
    model = wrapped(original)
    before = copy.deepcopy(model.state_dict())
    result = uniform_allocation(model, original, target_flops=60, tolerance=0.5, method="l2")
    assert result.within_tolerance and 60 <= result.reduction <= 60.5
    params, macs = folded_counts(result.model)
    assert result.cost.flops == macs and result.cost.params == params
    assert result.reduction == pytest.approx(100 * (1 - macs / count_macs(original)))
    again = copy.deepcopy(model)  # the ratio alone reproduces the network
    prune_uniform_fraction(again, result.ratio, "l2")
    assert channel_widths(again) == channel_widths(result.model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched


def test_uniform_reports_when_no_ratio_lands_within_the_tolerance():
    original = resnet20().eval()
    model = wrapped(original)
    reference = ReferenceCosts.measure(original)
    result = uniform_allocation(model, original, target_flops=20, tolerance=0.5, method="l2")
    assert not result.within_tolerance and result.below < 20 <= result.reduction
    # A slightly smaller ratio falls short: no uniform ratio gets closer to the target.
    smaller = copy.deepcopy(model)
    prune_uniform_fraction(smaller, result.ratio - 2e-4, "l2")
    assert saved_cost(smaller, reference).flops_reduction < 20


def planted_net(x):
    """``ThreeConvNet`` where ``a`` is redundant on both sides (weights of rank 4 over output
    channels and over input channels: pruning up to 12 of 16 channels per side is lossless) and
    ``b`` is dense. The head is centred on ``x``'s mean features, so that the network predicts
    varied classes rather than one class for every input, as random networks tend to."""
    torch.manual_seed(0)
    model = ThreeConvNet().eval()
    with torch.no_grad():
        mix_out, mix_in = torch.randn(16, 4), torch.randn(16, 4)
        core = torch.randn(4, 4, 3, 3) * 0.3
        model.a.weight.copy_(torch.einsum("oj,ck,jkhw->ochw", mix_out, mix_in, core))
        model.fc.bias.copy_(-model.fc.weight @ model.features(x).mean(0))
    return model


def test_sensitivity_gives_the_insensitive_layer_the_larger_ratio():
    x = torch.randn(256, 3, 16, 16)
    original = planted_net(x)
    model = wrapped(original)
    with torch.no_grad():
        y = original(x).argmax(1)  # the network's own predictions: 100 % before pruning
    assert y.unique().numel() >= 5
    table = layer_sensitivity(model, x, y, method="backward")
    assert table.base == 100
    assert table.drops["a"][:7] == [0.0] * 7  # lossless up to 11 of 16 channels (ratio 0.7)
    assert table.drops["b"][0] > 0  # b loses accuracy already at ratio 0.1
    uncached = layer_sensitivity(model, x, y, method="backward", use_cache=False)
    assert uncached.drops == table.drops

    result = sensitivity_allocation(model, original, x, y, target_flops=30, method="backward",
                                    input_size=(3, 16, 16))
    assert result.ratios["a"] > result.ratios["b"]
    assert result.ratios == result.table.allocation(result.threshold)
    assert result.reduction >= 30
    params, macs = folded_counts(result.model, (3, 16, 16))
    assert result.cost.flops == macs
    assert result.reduction == pytest.approx(100 * (1 - macs / count_macs(original, (3, 16, 16))))


def test_acra_errors_before_anything_changes():
    original = resnet20().eval()
    model = wrapped(original)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(HbgsError, match="out of reach"):
        uniform_allocation(model, original, target_params=100, method="l2")
    with pytest.raises(HbgsError, match="exactly one target"):
        uniform_allocation(model, original, method="l2")
    with pytest.raises(HbgsError, match="valid: backward, omp"):
        uniform_allocation(model, original, target_flops=50, method="norm")
    x, y = torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(HbgsError, match=r"out of reach: the most this strategy prunes \(ratio 0.5"):
        sensitivity_allocation(model, original, x, y, target_flops=90, ratios=(0.25, 0.5))
    with pytest.raises(HbgsError, match="ratios must be"):
        layer_sensitivity(model, x, y, ratios=(0.5, 0.2))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
