import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


QUICK = ["logger=csv", "trainer.enable_progress_bar=false", "dataset.calib_size=100", "dataset.limit_test=200"]


def hbgs_run(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    """The command line, run as a user runs it: python -m hbgs.run in a subprocess."""
    return subprocess.run([sys.executable, "-m", "hbgs.run", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run directory of `stage=train` on 256 images for one epoch (model.pt, last.ckpt, summary)."""
    run_dir = tmp_path_factory.mktemp("train")
    out = hbgs_run("stage=train", "model=resnet20", "dataset.limit_train=256", "trainer.max_epochs=1",
                   f"hydra.run.dir={run_dir}", *QUICK)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.fixture
def one_thread():
    """One intra-op torch thread while the test runs (restored after): for tests of many tiny
    tensor operations, which thread hand-shakes slow down 10-30 fold when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped on a machine without CUDA."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
