"""The test split never enters a decision (docs/algorithms.md §2, §5): two prune runs that
differ only in their test images, and in those images' labels, make the same choices with the
same scores, fine-tune to the same weights and report the same calibration figures; only the
test figures differ."""
import csv
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, REPO
from hbgs.checkpoint import load_model

ZOO_RESNET20 = REPO / "zoo" / "resnet20-cifar10.pt"
TIMING = {"propose_seconds", "score_seconds", "wall_seconds"}  # the only columns allowed to differ


def image_folder(root: Path, source: Path, split: str, names: list[str], rotate: int = 0) -> None:
    """``root/split/<class>/`` with the files ``names`` of ``source/split/<class>/``, each class's
    images filed under the class ``rotate`` places further on (so labelled wrongly)."""
    classes = sorted(d.name for d in (source / split).iterdir() if d.is_dir())
    for i, name in enumerate(classes):
        target = root / split / classes[(i + rotate) % len(classes)]
        target.mkdir(parents=True)
        for file in names:
            shutil.copy(source / split / name / file, target / file)


def read_history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def prune_run(run_dir: Path, data_root: Path) -> dict:
    """stage=prune in this process (what ``python -m hbgs.run`` calls once the options are
    checked): HBGTS-B on the zoo ResNet-20 to 3 % fewer FLOPs (two rounds), a one-step fine-tune
    after each round and a one-epoch (one-step) final fine-tune; returns the summary."""
    from hbgs.prune_stage import prune

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "stage=prune", f"ckpt={ZOO_RESNET20}", f"dataset.root={data_root}",
            "dataset.cache_dir=null", "dataset.calib_size=64", "criterion=hbgts",
            "criterion.target.params=null", "criterion.target.flops=3", "criterion.step=0.5",
            "criterion.calib_batch=32", "finetune.every=1", "finetune.steps=1",
            "finetune.final_epochs=1", "logger=none", "latency.repeats=1",
            "latency.batch_sizes=[1]", "trainer.enable_progress_bar=false"])
    run_dir.mkdir(parents=True)
    return prune(cfg, run_dir)


@pytest.mark.usefixtures("one_thread")
def test_prune_decisions_do_not_depend_on_the_test_split(tmp_path, cifar10_root):
    source = Path(cifar10_root)
    runs = {}
    # The same training (and so calibration) images; 40 other test images, mislabelled in "b".
    for label, first_test, rotate in (("a", 0, 0), ("b", 100, 3)):
        root = tmp_path / label / "cifar10"
        image_folder(root, source, "train", [f"{i:04d}.jpg" for i in range(16)])
        image_folder(root, source, "test",
                     [f"{i:04d}.jpg" for i in range(first_test, first_test + 4)], rotate)
        runs[label] = (tmp_path / label / "run", prune_run(tmp_path / label / "run", root))
    (dir_a, a), (dir_b, b) = runs["a"], runs["b"]
    # The test splits really differ, and the reports read them.
    assert a["test_images"] == b["test_images"] == 40
    assert a["accuracy"]["dense_test"] > b["accuracy"]["dense_test"] + 0.3
    # Every decision, score and calibration figure is the same, and so is the saved model.
    history = read_history(dir_a)
    assert len(history) >= 2 and history == read_history(dir_b)
    assert a["accuracy"]["dense_calib"] == b["accuracy"]["dense_calib"]
    assert a["accuracy"]["final_finetune_steps"] == b["accuracy"]["final_finetune_steps"] == 1
    assert a["widths"] == b["widths"]
    # cost.exported depends on the export's layout choices, made by timing: not a pruning decision
    assert {k: v for k, v in a["cost"].items() if k != "exported"} == {k: v for k, v in b["cost"].items() if k != "exported"}
    state_a = load_model(dir_a / "model.pt").state_dict()
    state_b = load_model(dir_b / "model.pt").state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
