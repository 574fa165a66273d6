"""The checkpoints shipped in zoo/ load from a fresh clone and score their recorded accuracy."""

import pytest

from hbgs.accounting import count_macs, count_params
from hbgs.checkpoint import load_meta, load_model
from hbgs.data import ImageDataModule
from hbgs.module import evaluate_accuracy
from hbgs.zoo import ZOO_DIR, shipped
from hbgs.zoo_train import epochs_in_all

# name -> (params, MACs, recorded test accuracy, epochs in all, warm restarts included): what the
# README's zoo table states
EXPECTED = {"resnet20-cifar10": (269_722, 40_551_040, 0.9012, 81 + 51 + 112 + 52),
            "resnet20-cifar10-bridgeout": (269_722, 40_551_040, 0.8215, 30),
            "resnet56-cifar10": (853_018, 125_485_696, 0.9101, 8 + 60 + 34),
            "vgg16-cifar10": (14_724_042, 313_201_664, 0.9117, 4 + 15 + 14 + 36 + 14 + 16)}


def test_the_zoo_ships_what_the_readme_lists():
    assert set(EXPECTED) <= set(shipped())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_checkpoint_scores_its_recorded_accuracy(name, cifar10_root):
    path = ZOO_DIR / f"{name}.pt"
    model, meta = load_model(path), load_meta(path)
    params, macs, accuracy, epochs = EXPECTED[name]
    assert meta["test_acc"] == pytest.approx(accuracy, abs=1e-4) and epochs_in_all(meta) == epochs
    assert (count_params(model), count_macs(model)) == (params, macs)
    dm = ImageDataModule(root=cifar10_root, calib_size=100, limit_test=2000, seed=0)
    measured = evaluate_accuracy(model, dm.test_dataloader())
    # 2,000 of the 10,000 test images: the binomial standard error is under 0.8 points; allow 3.
    assert abs(measured - meta["test_acc"]) < 0.03
