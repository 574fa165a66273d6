"""Every option of every config group composes, and the instantiable ones instantiate."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from conftest import CONF_DIR
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
    trainer = instantiate(compose_with("trainer=cpu").trainer, default_root_dir=str(tmp_path), logger=False)
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


@pytest.mark.parametrize("group", ["selector", "criterion", "finetune"])
def test_pruning_groups_compose(group):
    for name in options(group):
        cfg = compose_with(f"{group}={name}")
        assert cfg[group] is not None
