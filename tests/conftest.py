import os
from pathlib import Path

import pytest

from hbgs.data import find_cifar10_root

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def cifar10_root() -> str:
    root = find_cifar10_root()
    if root is None:
        pytest.fail("The offline CIFAR-10 copy ../shared/data/cifar10 is missing; the tests need it.")
    return root


@pytest.fixture(scope="session")
def cifar10(cifar10_root):
    """The offline CIFAR-10, decoded once for the whole session (small calibration split)."""
    from hbgs.data import ImageDataModule

    dm = ImageDataModule(root=cifar10_root, calib_size=500, seed=0)
    dm.setup()
    return dm
