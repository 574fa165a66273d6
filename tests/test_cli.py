"""The command line, run as a user runs it: python -m hbgs.run in a subprocess."""

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


def test_resume_continues_from_a_lightning_checkpoint(trained_run, tmp_path):
    out = hbgs_run("stage=train", "model=resnet20", "dataset.limit_train=256", "trainer.max_epochs=2",
                   f"resume={trained_run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path}", *QUICK)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["optimizer_steps"] == 4  # 2 from the first run, 2 more


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
    resumed = hbgs_run("stage=train", "model=resnet20", "dataset.limit_train=256", "trainer.max_epochs=2",
                       "regularizer=bridgeout", f"resume={tmp_path / 'checkpoints' / 'last.ckpt'}",
                       f"hydra.run.dir={tmp_path / 'resumed'}", *QUICK)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["optimizer_steps"] == 4


@pytest.mark.parametrize("args,message", [
    (["stage=eval", "ckpt=null"], "pass ckpt=<path to model.pt>"),
    (["model=vgg16"], "the zoo has no vgg16 trained on cifar10"),
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
