"""The Lightning module every stage trains with: classification, optional distillation."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from hbgs.devices import module_device

SCHEDULES = ("cosine", "multistep", "onecycle", "constant")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) on temperature-softened outputs, scaled by T² so gradients keep their size."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    log_q = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


class Classifier(L.LightningModule):
    """Cross-entropy training of `model`; with a `teacher`, loss = CE + kd_weight · T²·KL.

    Schedules run per optimiser step over the whole fit (`trainer.estimated_stepping_batches`),
    so they work with max_epochs or max_steps; multistep milestones are fractions of the fit.
    """

    def __init__(self, model: nn.Module, num_classes: int, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True, schedule: str = "cosine",
                 milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1,
                 teacher: nn.Module | None = None, kd_temperature: float = 2.0, kd_weight: float = 1.0):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}.")
        self.save_hyperparameters(ignore=["model", "teacher"])
        self.model = model
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.accuracy = nn.ModuleDict({f"{s}_acc": MulticlassAccuracy(num_classes, average="micro") for s in ("train", "val", "test")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's BatchNorm statistics must stay fixed
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning keeps each submodule's mode as it found it, and a loaded or just-evaluated
        # model is in eval mode: training it so (frozen BatchNorm statistics) diverges.
        self.train()

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        if stage == "train" and self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            kd = distillation_loss(logits, teacher_logits, self.hparams.kd_temperature)
            self.log("train/kd_loss", kd, on_step=True, on_epoch=True)
            loss = loss + self.hparams.kd_weight * kd
        accuracy = self.accuracy[f"{stage}_acc"]
        accuracy(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=on_step)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(self.model.parameters(), lr=hp.lr, momentum=hp.momentum,
                                    weight_decay=hp.weight_decay, nesterov=hp.nesterov and hp.momentum > 0)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        elif hp.schedule == "multistep":
            steps = sorted(int(f * total) for f in hp.milestones)
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=hp.gamma)
        elif hp.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total)
        else:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy of `model` (in eval mode) over `loader`, computed where the model is (the
    batches go there; the model stays); every submodule's mode is restored."""
    device = module_device(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            correct += (model(x.to(device, non_blocking=True)).argmax(1) == y.to(device)).sum().item()
            total += len(y)
    finally:
        for module, training in modes:
            module.training = training
    return correct / total
