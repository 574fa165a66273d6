"""Batch Bridgeout (docs/algorithms.md §4): noise statistics, targeting, one draw per batch, the
induced penalty, and its life cycle around a Lightning fit."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hbgs.bridgeout import (BatchBridgeout, BridgeoutCallback, add_bridgeout, has_bridgeout,
                            remove_bridgeout, target_mask)
from hbgs.errors import HbgsError
from hbgs.models import resnet20
from hbgs.module import Classifier

P, Q, TAU = 0.3, 1.5, 0.75


def test_noise_is_unbiased_with_the_stated_variance_on_the_targeted_slices():
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3)
    draws = 40_000
    # one weight repeated `draws` times: a single forward gives `draws` independent draws
    noisy = BatchBridgeout(P, Q, TAU).train()(weight.repeat(draws, 1, 1, 1)).view(draws, *weight.shape)
    mask = target_mask(weight, TAU)
    expected_var = P / (1 - P) * mask * weight.abs() ** Q
    mean, var = noisy.mean(0), noisy.var(0)
    # mean: within 5 standard errors of W elementwise; variance: within 5 % (40k draws of a
    # two-point noise give a relative standard error of about 1 %)
    assert ((mean - weight).abs() <= 5 * (expected_var / draws).sqrt() + 1e-6).all()
    targeted = mask.bool()
    assert torch.allclose(var[targeted], expected_var[targeted], rtol=0.05)
    assert (var[~targeted] == 0).all() and torch.equal(noisy[:, ~targeted], weight[~targeted].expand(draws, -1))


def test_mask_covers_exactly_the_lowest_norm_slices_of_each_filter():
    torch.manual_seed(1)
    weight = torch.randn(5, 8, 3, 3)
    mask = target_mask(weight, TAU)
    for j in range(5):
        norms = [weight[j, c].norm().item() for c in range(8)]
        lowest = sorted(range(8), key=norms.__getitem__)[:6]  # 0.75 · 8 slices
        for c in range(8):
            assert (mask[j, c] == (1.0 if c in lowest else 0.0)).all()
    assert target_mask(weight, 0.0).sum() == 0 and (target_mask(weight, 1.0) == 1).all()


def test_eval_mode_is_the_plain_conv_and_deterministic():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    plain = nn.Conv2d(4, 6, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    add_bridgeout(conv)
    conv.eval()
    x = torch.randn(3, 4, 8, 8)
    assert torch.equal(conv(x), conv(x)) and torch.allclose(conv(x), plain(x), atol=1e-6)
    conv.train()
    assert not torch.allclose(conv(x), plain(x), atol=1e-3)  # training mode does add noise


def test_one_draw_per_mini_batch():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    add_bridgeout(conv)
    conv.train()
    x = torch.randn(1, 4, 8, 8).expand(16, -1, -1, -1)  # sixteen copies of one example
    out = conv(x)
    assert torch.equal(out, out[:1].expand_as(out))  # every example saw the same noisy weight
    assert not torch.allclose(conv(x[:1]), out[:1], atol=1e-4)  # the next batch draws afresh


def test_linear_unit_squared_loss_gains_the_lq_penalty():
    """E[(t − w̃·x)²] − (t − w·x)² = p/(1−p) Σ x_i² |w_i|^q for a unit whose weights are all targeted."""
    torch.manual_seed(4)
    d, draws = 5, 400_000
    w, x, t = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64), 0.7
    # a 1×1 "conv" of d inputs: each weight is its own kernel slice; target_fraction 1 targets all
    noisy = BatchBridgeout(P, Q, 1.0).train()(w.view(1, d, 1, 1).repeat(draws, 1, 1, 1)).view(draws, d)
    losses = (t - noisy @ x) ** 2
    gain = losses.mean().item() - ((t - w @ x) ** 2).item()
    expected = P / (1 - P) * (x**2 * w.abs() ** Q).sum().item()
    standard_error = losses.std().item() / draws**0.5
    assert abs(gain - expected) < 5 * standard_error  # Monte-Carlo tolerance: 5 standard errors
    assert abs(gain - expected) < 0.03 * expected


def test_add_targets_spatial_convs_only_and_remove_restores_plain_weights():
    model = resnet20()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = add_bridgeout(model)
    assert len(names) == 19  # every 3×3 conv of ResNet-20, the stem included
    assert any(k.endswith("parametrizations.weight.original") for k in model.state_dict())
    assert sorted(remove_bridgeout(model)) == sorted(names)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(HbgsError, match="no conv with a spatial kernel"):
        add_bridgeout(nn.Sequential(nn.Conv2d(3, 4, 1)))
    with pytest.raises(HbgsError, match=r"^bridgeout p \(drop probability\) must lie in \[0, 1\), got 1\.0$"):
        BatchBridgeout(p=1.0)


def test_callback_trains_with_noise_and_leaves_a_plain_model(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    before = model[0].weight.detach().clone()
    data = DataLoader(TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))), batch_size=16)
    callback = BridgeoutCallback(P, Q, TAU)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(has_bridgeout(pl_module.model[0]))

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback, Spy()], default_root_dir=tmp_path)
    trainer.fit(Classifier(model, num_classes=10, lr=0.05), train_dataloaders=data)
    assert seen == [True] * 4 and callback.targets == ["0"]
    assert not has_bridgeout(model[0]) and isinstance(model[0].weight, nn.Parameter)
    assert not torch.equal(model[0].weight, before)  # the underlying weight was trained
    assert sorted(model.state_dict()) == ["0.bias", "0.weight", "4.bias", "4.weight"]
