"""Fine-tuning of a pruned model through Lightning, distilled from the unpruned one.

Every call builds a fresh Classifier and Trainer, hence a fresh optimizer: pruning replaces
parameters, so optimizer state from before a prune step would not match (Torch-Pruning users
learnt this the hard way). Rebuilding is cheap beside a round (4-7 s for ResNet-20 here): on
the 2-core CPU, a Classifier and Trainer took 11 ms to build (median of 20 builds), and a fit's
fixed cost beside its steps was about 0.2 s (1-step against 4-step fits).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import lightning as L
import torch
import torch.nn as nn

from hbgs.devices import lightning_precision, module_device
from hbgs.errors import HbgsError
from hbgs.module import Classifier

# A fine-tune "collapsed" the network when calibration accuracy ends below chance + this margin
# while it was at least this margin higher before (a diverging learning rate, not a pruning loss).
COLLAPSE_MARGIN = 0.05


class FinetuneDiverged(HbgsError):
    """A fine-tune whose loss became NaN or infinite, or that collapsed the accuracy to chance."""


class FiniteLossWatch(L.Callback):
    """Ends a fine-tune at its first non-finite loss (``finetune`` then raises FinetuneDiverged):
    further steps would only spread NaNs through the weights."""

    def __init__(self):
        self.bad: tuple[int, float] | None = None  # (step, loss) of the first non-finite loss

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and self.bad is None and not torch.isfinite(loss).all():
            self.bad = (trainer.global_step, float(loss))
            trainer.should_stop = True


def check_not_collapsed(before: float, after: float, num_classes: int, what: str) -> None:
    """FinetuneDiverged when a fine-tune took calibration accuracy from well above chance
    (``before``) to about chance (``after``); ``what`` ends the message (e.g. "at lr=...")."""
    chance = 1 / num_classes
    if after < chance + COLLAPSE_MARGIN <= before - COLLAPSE_MARGIN:
        raise FinetuneDiverged(f"calibration accuracy fell from {before:.1%} to {after:.1%}, chance being "
                               f"{chance:.1%}, {what}")


def finetune(model: nn.Module, datamodule, teacher: nn.Module | None, cfg, *, steps: int = 0, epochs: int = 0,
             lr: float, trainer_cfg=None, logger=False, callbacks=(), default_root_dir=None) -> int:
    """Train `model` in place for `steps` optimizer steps or `epochs` epochs (one of them, > 0) with
    CE + KL distillation from `teacher` at `cfg.kd_temperature`; return the steps taken.

    `cfg` is the `finetune` config (momentum, weight_decay, kd_*); `trainer_cfg` the `trainer`
    config, of which only the device settings are used. The model and teacher end on the
    device they started on (the run's; Lightning's teardown leaves them on the CPU). On a GPU
    the batches come from `datamodule.train_batches` (images cropped and flipped there) when it
    has one. FinetuneDiverged when the loss becomes NaN or infinite (the fine-tune stops at
    that step) or the weights are no longer finite.
    """
    if steps <= 0 and epochs <= 0:
        return 0
    homes = [(m, module_device(m)) for m in (model, teacher) if m is not None]
    batches = (datamodule.train_batches(homes[0][1]) if hasattr(datamodule, "train_batches")
               else datamodule.train_dataloader())
    watch = FiniteLossWatch()
    module = Classifier(model, num_classes=datamodule.num_classes, lr=lr, momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay, schedule="cosine", teacher=teacher,
                        kd_temperature=cfg.kd_temperature, kd_weight=cfg.kd_weight)
    device = {} if trainer_cfg is None else {"accelerator": trainer_cfg.accelerator, "devices": trainer_cfg.devices,
                                             "precision": lightning_precision(trainer_cfg)}
    with quiet_lightning(epochs == 0):
        trainer = L.Trainer(
            max_steps=steps if steps > 0 else -1, max_epochs=epochs if epochs > 0 else None,
            logger=logger, callbacks=[*callbacks, watch], enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=epochs > 0, limit_val_batches=0, num_sanity_val_steps=0,
            default_root_dir=default_root_dir, **device,
        )
        trainer.fit(module, train_dataloaders=batches)
    for m, device in homes:
        m.to(device)
    model.eval()
    if watch.bad is not None:
        step, loss = watch.bad
        raise FinetuneDiverged(f"its loss became {loss} at step {step}, at lr={lr:g}")
    if not all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()):
        raise FinetuneDiverged(f"the weights are no longer finite, at lr={lr:g}")
    return trainer.global_step


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, chunk_size: int = 256) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``images`` (their plain
    average over all chunks), in place; weights and every other buffer stay as they were. As in
    training, each BatchNorm normalises a chunk with that chunk's own statistics meanwhile.
    Cheap recovery after a pruning step: the compensated layers' outputs have moved, and the
    statistics the following BatchNorms normalise with are stale. Returns the number of
    BatchNorms recalibrated."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    counts = [(m, m.num_batches_tracked.clone()) for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the chunks
        norm.train()  # only the BatchNorms update statistics; dropout and the rest stay in eval
    try:
        for start in range(0, len(images), chunk_size):
            model(images[start:start + chunk_size])
    finally:
        for module, training in modes:
            module.training = training
        for norm, momentum in momenta:
            norm.momentum = momentum
        for norm, count in counts:
            norm.num_batches_tracked.copy_(count)
    return len(norms)


@contextmanager
def quiet_lightning(quiet: bool):
    """Silence Lightning's start-up notices for the many short fine-tunes of a pruning run."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
