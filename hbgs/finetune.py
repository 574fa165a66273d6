"""Fine-tuning of a pruned model through Lightning, distilled from the unpruned one.

Every call builds a fresh Classifier and Trainer, hence a fresh optimizer: pruning replaces
parameters, so optimizer state from before a prune step would not match (Torch-Pruning users
learnt this the hard way).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import lightning as L
import torch
import torch.nn as nn

from hbgs.module import Classifier


def finetune(model: nn.Module, datamodule, teacher: nn.Module | None, cfg, *, steps: int = 0, epochs: int = 0,
             lr: float, trainer_cfg=None, logger=False, callbacks=(), default_root_dir=None) -> int:
    """Train `model` in place for `steps` optimizer steps or `epochs` epochs (one of them, > 0) with
    CE + KL distillation from `teacher` at `cfg.kd_temperature`; return the steps taken.

    `cfg` is the `finetune` config (momentum, weight_decay, kd_*); `trainer_cfg` the `trainer`
    config, of which only the device settings are used.
    """
    if steps <= 0 and epochs <= 0:
        return 0
    module = Classifier(model, num_classes=datamodule.num_classes, lr=lr, momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay, schedule="cosine", teacher=teacher,
                        kd_temperature=cfg.kd_temperature, kd_weight=cfg.kd_weight)
    device = {} if trainer_cfg is None else {k: trainer_cfg[k] for k in ("accelerator", "devices", "precision")}
    with quiet_lightning(epochs == 0):
        trainer = L.Trainer(
            max_steps=steps if steps > 0 else -1, max_epochs=epochs if epochs > 0 else None,
            logger=logger, callbacks=list(callbacks), enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=epochs > 0, limit_val_batches=0, num_sanity_val_steps=0,
            default_root_dir=default_root_dir, **device,
        )
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    model.eval()
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
