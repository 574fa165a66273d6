"""Experiment loggers for Lightning, chosen by the `logger` config group."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger


def build_logger(cfg, run_dir: Path, run_name: str, config: dict) -> Logger | bool:
    """W&B (offline by default: no account or network needed), CSV, or none (False)."""
    if cfg.name == "none":
        return False
    if cfg.name == "csv":
        return CSVLogger(save_dir=str(run_dir), name="", version="")
    if cfg.name == "wandb":
        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbLogger(project=cfg.project, name=run_name, save_dir=str(run_dir), mode=cfg.mode,
                           entity=cfg.entity, tags=list(cfg.tags), config=config)
    raise ValueError(f"Unknown logger {cfg.name!r}: use logger=wandb, csv or none.")


def finish_wandb() -> None:
    """Close the W&B run so the next job of a multirun starts its own."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
