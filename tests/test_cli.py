"""The command line, run as a user runs it: python -m hbgs.run in a subprocess."""

import csv
import json

import pytest
import torch

from hbgs.checkpoint import load_model

from conftest import QUICK, hbgs_run


def test_help_lists_groups_and_options():
    out = hbgs_run("--help")
    assert out.returncode == 0
    for line in ("model: resnet110, resnet18, resnet20", "selector: backward, l1, l2, omp, random",
                 "logger: csv, none, wandb", "trainer: cpu, ddp, gpu", "dataset: cifar10, cifar100, imagefolder"):
        assert line in out.stdout


def test_cfg_job_prints_the_composed_config():
    out = hbgs_run("--cfg", "job", "model=vgg16")
    assert out.returncode == 0
    assert "_target_: hbgs.models.vgg16" in out.stdout and "stage: prune" in out.stdout


def test_unknown_option_lists_valid_choices_without_traceback():
    out = hbgs_run("model=vgg99")
    assert out.returncode != 0
    assert "Could not find 'model/vgg99'" in out.stderr
    assert "resnet56" in out.stderr and "Traceback" not in out.stderr


def test_train_writes_config_summary_and_checkpoint(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["stage"] == "train" and summary["optimizer_steps"] == 2  # 256 images, batches of 128
    assert summary["params"] == 269_722 and summary["macs"] == 40_551_040
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test_images"] == 200
    assert "limit_train: 256" in (trained_run / "config.yaml").read_text()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    model = load_model(trained_run / "model.pt")
    assert sum(p.numel() for p in model.parameters()) == 269_722


def test_eval_reports_accuracy_params_flops_latency(trained_run, tmp_path):
    out = hbgs_run("stage=eval", f"ckpt={trained_run / 'model.pt'}", f"hydra.run.dir={tmp_path}",
                   "latency.repeats=3", *QUICK)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    trained = json.loads((trained_run / "summary.json").read_text())
    assert summary["test_acc"] == pytest.approx(trained["test_acc"], abs=1e-6)  # same weights, same test subset
    assert summary["params"] == 269_722 and summary["macs"] == 40_551_040
    assert [r["batch_size"] for r in summary["latency"]] == [1, 64]
    assert all(r["latency_ms"] > 0 and r["threads"] == 1 for r in summary["latency"])


def plant_in_checkpoint(ckpt, dest):
    """A copy of a Lightning checkpoint with the classifier's bias set to a pattern no training from
    scratch comes near (±45, where a fresh bias lies within ±1/8); returns the pattern.
    Two more SGD steps move a bias by less than 1: each step by at most lr (≤ 0.1) times a
    cross-entropy gradient of at most 1 per class, plus momentum and weight decay."""
    state = torch.load(ckpt, weights_only=False)
    planted = 10.0 * torch.arange(10, dtype=torch.float32) - 45.0
    state["state_dict"]["model.fc.bias"] = planted.clone()
    torch.save(state, dest)
    return planted


def logged_epochs(run_dir):
    """(epoch, step) of every epoch-end training row the CSV logger wrote."""
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["epoch"]), int(r["step"])) for r in csv.DictReader(f) if r["train/loss_epoch"]]


def assert_resumed(run_dir, planted):
    """What only a resumed run shows: it trained the remaining epoch alone (a run started afresh
    logs epochs 0 and 1), from the checkpoint's weights (the planted bias survives into model.pt)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer_steps"] == 4 and summary["epochs"] == 2  # 2 from the first run, 2 more
    assert logged_epochs(run_dir) == [(1, 3)]  # the second epoch only, ending at step 4 (logged 0-based)
    bias = load_model(run_dir / "model.pt").fc.bias.detach()
    assert (bias - planted).abs().max() < 1.0, bias


def test_resume_continues_from_a_lightning_checkpoint(trained_run, tmp_path):
    ckpt = tmp_path / "planted.ckpt"
    planted = plant_in_checkpoint(trained_run / "checkpoints" / "last.ckpt", ckpt)
    out = hbgs_run("stage=train", "model=resnet20", "dataset.limit_train=256", "trainer.max_epochs=2",
                   f"resume={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}", "threads=1", *QUICK)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_resumed(tmp_path / "resumed", planted)


def test_multirun_gives_each_job_its_own_directory(trained_run, tmp_path):
    out = hbgs_run("-m", "stage=eval", f"ckpt={trained_run / 'model.pt'}", "latency.batch_sizes=[1]",
                   "latency.repeats=2", "dataset.limit_test=100,200", f"hydra.sweep.dir={tmp_path}", *QUICK[:3])
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2
    assert sorted(json.loads(s.read_text())["test_images"] for s in summaries) == [100, 200]


def test_train_with_bridgeout_saves_a_plain_model(tmp_path):
    out = hbgs_run("stage=train", "model=resnet20", "dataset.limit_train=256", "trainer.max_epochs=1",
                   "regularizer=bridgeout", "regularizer.p=0.2", f"hydra.run.dir={tmp_path}", *QUICK)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["regularizer"] == {"name": "bridgeout", "p": 0.2, "q": 1.5, "target_fraction": 0.75}
    model = load_model(tmp_path / "model.pt")  # plain weights: no parametrization left behind
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert not any("parametrizations" in k for k in model.state_dict())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert any("parametrizations.weight.original" in k for k in ckpt["state_dict"])  # mid-fit state
    planted = plant_in_checkpoint(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "planted.ckpt")
    resumed = hbgs_run("stage=train", "model=resnet20", "dataset.limit_train=256", "trainer.max_epochs=2",
                       "regularizer=bridgeout", f"resume={tmp_path / 'planted.ckpt'}",
                       f"hydra.run.dir={tmp_path / 'resumed'}", "threads=1", *QUICK)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed(tmp_path / "resumed", planted)
    model = load_model(tmp_path / "resumed" / "model.pt")  # plain again after the resumed fit
    assert not any("parametrizations" in k for k in model.state_dict())


@pytest.mark.parametrize("args,message", [
    (["stage=eval", "ckpt=null"], "pass ckpt=<path to model.pt>"),
    (["model=resnet32"], "the zoo has no resnet32 trained on cifar10"),
    (["stage=eval", "ckpt=/no/such/model.pt"], "stage=train"),
    (["stage=prune", "ckpt=null"], "stage=prune needs a trained model"),
    (["stage=fly"], "must be one of train, eval, prune, robustness"),
    (["stage=robustness", "ckpt=null"], "stage=robustness needs models"),
    (["stage=robustness", "ckpt=zoo/resnet20-cifar10.pt", "robustness.methods=[l3]"], "unknown robustness method"),
    (["stage=train", "regularizer=bridgeout", "regularizer.p=1.5"], "bridgeout p"),
])
def test_bad_input_gets_one_clear_message(args, message, tmp_path):
    out = hbgs_run(*args, f"hydra.run.dir={tmp_path}", "logger=none")
    assert out.returncode == 2
    assert message in out.stderr + out.stdout and "Traceback" not in out.stderr
    assert not (tmp_path / "summary.json").exists()
