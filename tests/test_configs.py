"""Every option of every config group composes, and the instantiable ones instantiate."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from conftest import CONF_DIR
from hbgs.devices import lightning_precision
from hbgs.data import ImageDataModule
from hbgs.loggers import build_logger, finish_wandb


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


def test_every_group_has_its_options():
    assert options("model") == ["resnet110", "resnet18", "resnet20", "resnet32", "resnet56", "resnext101_32x16d",
                                "resnext29_2x32d", "resnext29_8x64d", "vgg16"]
    assert options("selector") == ["backward", "l1", "l2", "omp", "random"]
    assert options("logger") == ["csv", "none", "wandb"]
    assert options("trainer") == ["cpu", "ddp", "gpu"]
    assert set(options("criterion")) >= {"hbgs", "hbgts", "uniform", "sensitivity"}


@pytest.mark.parametrize("name", [n for n in options("model") if n != "resnext101_32x16d"])
def test_model_options_instantiate(name):
    cfg = compose_with(f"model={name}")
    model = instantiate(cfg.model)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, cfg.dataset.num_classes)


def test_model_by_target_and_class_count_follows_dataset():
    cfg = compose_with("model._target_=torchvision.models.resnet18", "model.num_classes=7", "dataset=cifar100")
    assert instantiate(cfg.model).fc.out_features == 7
    assert instantiate(compose_with("dataset=cifar100").model).fc.out_features == 100


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options_instantiate(name, tmp_path):
    overrides = [f"dataset={name}"] + (["dataset.root=/data/x", "dataset.num_classes=5"] if name == "imagefolder" else [])
    dm = instantiate(compose_with(*overrides).dataset)
    assert isinstance(dm, ImageDataModule) and dm.name == name


def test_trainer_options_compose_and_cpu_instantiates(tmp_path):
    cpu = compose_with("trainer=cpu").trainer
    trainer = instantiate(cpu, default_root_dir=str(tmp_path), logger=False, precision=lightning_precision(cpu))
    assert trainer.max_epochs == 30
    assert compose_with("trainer=gpu").trainer.accelerator == "gpu"
    ddp = compose_with("trainer=ddp").trainer
    assert (ddp.strategy, ddp.accelerator, ddp.devices) == ("ddp", "gpu", -1)


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_build(name, tmp_path):
    cfg = compose_with(f"logger={name}")
    logger = build_logger(cfg.logger, tmp_path, "test", {"a": 1})
    expected = {"wandb": WandbLogger, "csv": CSVLogger, "none": bool}[name]
    assert isinstance(logger, expected)
    if name == "wandb":
        logger.log_metrics({"x": 1.0})
        assert logger.experiment.settings.mode == "offline"
        finish_wandb()
        assert list((tmp_path / "wandb").glob("offline-run-*"))


# What each option of the pruning groups composes to (its own keys and those it inherits).
PRUNING_OPTIONS = {
    "selector": {name: {"method": name} for name in ("backward", "l1", "l2", "omp", "random")},
    "criterion": {
        "hbgs": {"name": "hbgs", "step": 5, "min_channels": 1, "calib_batch": 512, "score": "error",
                 "target": {"params": 50, "flops": None}},
        "hbgts": {"name": "hbgts", "step": 5, "min_channels": 1, "calib_batch": 512, "score": "error",
                  "target": {"params": 50, "flops": None}, "signal": "features"},
        "uniform": {"name": "uniform", "tolerance": 0.5, "target": {"params": 50, "flops": None},
                    "min_channels": 1, "calib_batch": 512},
        "sensitivity": {"name": "sensitivity", "tolerance": 0.5, "target": {"params": 50, "flops": None},
                        "min_channels": 1, "calib_batch": 512,
                        "ratios": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]},
        "uniform_fraction": {"name": "uniform_fraction", "fraction": 0.5, "min_channels": 1, "calib_batch": 256},
        "tp_l1": {"name": "tp_l1", "importance": "l1", "global_pruning": False, "tolerance": 0.5,
                  "target": {"params": 50, "flops": None}},
        "tp_group_norm": {"name": "tp_group_norm", "importance": "group_norm", "global_pruning": True,
                          "tolerance": 0.5, "target": {"params": 50, "flops": None}},
    },
    "finetune": {
        "default": {"every": 1, "steps": 20, "final_epochs": 1, "bn_recalibrate": 0, "lr": 1e-3,
                    "final_lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4, "kd_temperature": 2.0,
                    "kd_weight": 1.0},
        "none": {"every": 0, "steps": 0, "final_epochs": 0, "bn_recalibrate": 0, "lr": 1e-3,
                 "final_lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4, "kd_temperature": 2.0,
                 "kd_weight": 1.0},
    },
}


@pytest.mark.parametrize("group", ["selector", "criterion", "finetune"])
def test_pruning_groups_compose(group):
    assert options(group) == sorted(PRUNING_OPTIONS[group])  # a new option needs its row here
    for name in options(group):
        cfg = compose_with(f"{group}={name}")
        assert OmegaConf.to_container(cfg[group]) == PRUNING_OPTIONS[group][name], name
