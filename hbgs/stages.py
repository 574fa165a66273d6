"""What each `stage=` does. Every stage writes into the Hydra run directory and finishes by
writing summary.json, so a directory without one is a run that did not complete."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from hbgs.accounting import count_macs, count_params, measure_latencies
from hbgs.bridgeout import regularizer_callbacks
from hbgs.checkpoint import load_meta, load_model, save_model
from hbgs.atomic import write_atomically
from hbgs.devices import lightning_precision, run_device
from hbgs.loggers import build_logger
from hbgs.module import Classifier, evaluate_accuracy


def write_json(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=2) + "\n")


def model_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.model, resolve=True)


def build_trainer(cfg: DictConfig, run_dir: Path, run_name: str, callbacks=()) -> L.Trainer:
    logger = build_logger(cfg.logger, run_dir, run_name, OmegaConf.to_container(cfg, resolve=True))
    # SyncBatchNorm needs CUDA: trainer=ddp on the CPU (trainer.accelerator=cpu) trains without it,
    # each process normalising with its own batch statistics (DDP broadcasts rank 0's buffers).
    sync = {"sync_batchnorm": False} if cfg.trainer.get("sync_batchnorm") and run_device(cfg.trainer).type == "cpu" \
        else {}
    return instantiate(cfg.trainer, default_root_dir=str(run_dir), logger=logger, callbacks=list(callbacks),
                       precision=lightning_precision(cfg.trainer), **sync)


def measurements(model, datamodule, test_acc: float) -> dict:
    """The figures every stage reports of a model: test accuracy, params, MACs."""
    input_size = datamodule.input_size
    return {"dataset": datamodule.name, "test_acc": test_acc, "test_images": len(datamodule.splits["test"]),
            "params": count_params(model), "macs": count_macs(model, input_size), "input_size": list(input_size)}


def train(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Train a baseline from scratch (or resume one), test it, save model.pt. The options were
    checked by hbgs.validation. Under DDP (trainer=ddp) every rank trains and tests its share;
    rank 0 alone writes model.pt and returns the summary, the other ranks return None."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset)
    model = instantiate(cfg.model)
    module = Classifier(model, num_classes=cfg.dataset.num_classes, **OmegaConf.to_container(cfg.optim))
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0)
    callbacks = [checkpoints, *regularizer_callbacks(cfg.regularizer)]
    trainer = build_trainer(cfg, run_dir, f"train-{cfg.model._target_.rsplit('.', 1)[-1]}", callbacks)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume)
    train_seconds = time.perf_counter() - start
    accuracy = float(trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"])  # all ranks' images
    if not trainer.is_global_zero:
        return None
    summary = {
        "stage": "train",
        "model": model_config(cfg),
        **measurements(model, datamodule, accuracy),
        "epochs": trainer.current_epoch,
        "optimizer_steps": trainer.global_step,
        "fit_seconds": train_seconds,  # wall time of trainer.fit: training and validation
        "fit_seconds_per_step": train_seconds / max(1, trainer.global_step),
        "batch_size": cfg.dataset.batch_size,
        "seed": cfg.seed,
        "regularizer": OmegaConf.to_container(cfg.regularizer, resolve=True),
    }
    save_model(model, run_dir / "model.pt", model_cfg=model_config(cfg),
               meta={k: summary[k] for k in ("dataset", "test_acc", "test_images", "input_size", "epochs", "seed", "regularizer")})
    summary["checkpoint"] = str(run_dir / "model.pt")
    return summary


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Accuracy on the test split (on the run's device, trainer=), params, FLOPs (MACs) and
    latency of a saved model (CPU, and GPU when there is one). hbgs.validation made sure there
    is a ckpt."""
    device = run_device(cfg.trainer)
    model = load_model(cfg.ckpt, map_location=device)
    meta = load_meta(cfg.ckpt) or {}
    datamodule = instantiate(cfg.dataset)
    accuracy = evaluate_accuracy(model, datamodule.test_dataloader())
    logger = build_logger(cfg.logger, run_dir, "eval", OmegaConf.to_container(cfg, resolve=True))
    if logger:
        logger.log_metrics({"test/acc": accuracy})
    latency = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        timed = measure_latencies({"model": model}, list(cfg.latency.batch_sizes), datamodule.input_size,
                                  threads=cfg.latency.threads, repeats=cfg.latency.repeats, device=device)
        latency += [{"batch_size": b, "latency_ms": timed["median_ms"]["model"][str(b)], "threads": timed["threads"],
                     "device": device, "repeats": timed["repeats"]} for b in timed["batch_sizes"]]
    return {
        "stage": "eval",
        "device": str(device),  # where the accuracy was measured
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "checkpoint_meta": meta,
        **measurements(model, datamodule, accuracy),
        "latency": latency,
        "torch": torch.__version__,
    }


def prune(cfg: DictConfig, run_dir: Path) -> dict:
    from hbgs.prune_stage import prune as run_prune

    return run_prune(cfg, run_dir)


def robustness(cfg: DictConfig, run_dir: Path) -> dict:
    from hbgs.robustness import run

    return run(cfg, run_dir)


STAGES = {"train": train, "eval": evaluate, "prune": prune, "robustness": robustness}
