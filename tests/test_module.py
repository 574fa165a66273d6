"""The Lightning module: a real fit on CPU, the schedules, and the distillation loss."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from hbgs.models import resnet20
from hbgs.module import Classifier, distillation_loss


def test_distillation_loss_equals_its_definition():
    torch.manual_seed(0)
    s, t, T = torch.randn(8, 10), torch.randn(8, 10), 2.0
    p, q = F.softmax(s / T, 1), F.softmax(t / T, 1)
    kl = (q * (q.log() - p.log())).sum(1).mean() * T**2
    assert torch.allclose(distillation_loss(s, t, T), kl, atol=1e-6)
    assert distillation_loss(s, s, T).abs() < 1e-6


def test_fast_dev_run_trains_and_distils(cifar10, tmp_path):
    torch.manual_seed(0)
    student, teacher = resnet20(), resnet20()
    before = [p.clone() for p in student.parameters()]
    teacher_before = [p.clone() for p in teacher.parameters()]
    module = Classifier(student, num_classes=10, teacher=teacher)
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False)
    trainer.fit(module, datamodule=cifar10)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    assert not teacher.training
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/kd_loss", "val/acc"} <= set(metrics)


@pytest.mark.parametrize("schedule", ["cosine", "multistep", "onecycle"])
def test_schedules_follow_the_whole_fit(schedule, tmp_path):
    module = Classifier(torch.nn.Linear(4, 3), num_classes=3, lr=0.1, schedule=schedule, milestones=(0.5,))
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[Record()], default_root_dir=tmp_path)
    trainer.fit(module, loader, loader)
    assert len(lrs) == 20
    if schedule == "cosine":
        assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.1 * (1 + math.cos(math.pi / 2)) / 2)
    elif schedule == "multistep":
        assert lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.01)
    else:
        assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[0] < 0.01 and lrs[-1] < 1e-3


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="cosine, multistep, onecycle, constant"):
        Classifier(torch.nn.Linear(2, 2), num_classes=2, schedule="linear")
