"""The checkpoints shipped in zoo/ load from a fresh clone and score their recorded accuracy."""

import pytest

from conftest import REPO
from hbgs.accounting import count_macs, count_params
from hbgs.checkpoint import load_meta, load_model
from hbgs.data import ImageDataModule
from hbgs.module import evaluate_accuracy


def test_resnet20_checkpoint_scores_its_recorded_accuracy(cifar10_root):
    path = REPO / "zoo" / "resnet20-cifar10.pt"
    model, meta = load_model(path), load_meta(path)
    assert meta["test_acc"] == pytest.approx(0.8685, abs=1e-4) and meta["epochs"] == 30
    assert (count_params(model), count_macs(model)) == (269_722, 40_551_040)
    dm = ImageDataModule(root=cifar10_root, calib_size=100, limit_test=2000, seed=0)
    accuracy = evaluate_accuracy(model, dm.test_dataloader())
    # 2,000 of the 10,000 test images: the binomial standard error is 0.75 points; allow 3.
    assert abs(accuracy - meta["test_acc"]) < 0.03
