"""stage=prune end to end on the offline CIFAR-10 at a tiny scale, through the command line."""

import csv
import json
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hbgs.accounting import count_macs, count_params
from hbgs.checkpoint import load_meta, load_model, save_model
from hbgs.finetune import finetune
from hbgs.models import resnet20
from hbgs.module import evaluate_accuracy
from hbgs.pruning import ReferenceCosts, channel_widths, prune_conv, saved_cost, wrap_model
from conftest import REPO, hbgs_run

TINY = ["logger=csv", "dataset.calib_size=100", "dataset.limit_train=128", "dataset.limit_test=100",
        "latency.repeats=2", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet20.pt"
    save_model(resnet20(), path, model_cfg={"_target_": "hbgs.models.resnet20", "num_classes": 10})
    return path


def prune_run(tmp_path, checkpoint, *args):
    out = hbgs_run("stage=prune", f"ckpt={checkpoint}", f"hydra.run.dir={tmp_path}", *TINY, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "summary.json").read_text())


def read_history(run_dir):
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def assert_valid_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def assert_costs_match_saved_model(run_dir, summary):
    model = load_model(run_dir / "model.pt")
    assert count_params(model) == summary["cost"]["pruned"]["params"]
    assert count_macs(model) == summary["cost"]["pruned"]["flops"]
    original = summary["cost"]["original"]
    expected = 100 * (1 - count_params(model) / original["params"])
    assert summary["cost"]["reduction_vs_original_pct"]["params"] == pytest.approx(expected, abs=1e-9)


# hbgs.run as `python -m hbgs.run` runs it (python -c: the working directory on the path), with
# hbgs.prune_stage.finetune wrapped by a spy: a Lightning callback that records, at every training
# batch of every fine-tune, whether each conv with a spatial kernel carries Bridgeout and really
# draws noise (two reads of its weight differ); the records go to $FINETUNE_SPY as JSON.
FINETUNE_SPY = """
import json, os, runpy, sys
from pathlib import Path

import lightning as L
import torch

import hbgs.prune_stage as stage
from hbgs.bridgeout import has_bridgeout, is_target

calls, real = [], stage.finetune


class Spy(L.Callback):
    def __init__(self, record):
        self.record = record

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        convs = [m for m in pl_module.model.modules() if is_target(m)]
        self.record["batches"].append({
            "targets": len(convs), "with_bridgeout": sum(has_bridgeout(m) for m in convs),
            "training": all(m.training for m in convs),
            "noisy": sum(not torch.equal(m.weight, m.weight) for m in convs)})


def spied(model, *args, callbacks=(), **kwargs):
    record = {"steps": kwargs.get("steps", 0), "epochs": kwargs.get("epochs", 0), "batches": []}
    calls.append(record)
    try:
        return real(model, *args, callbacks=[*callbacks, Spy(record)], **kwargs)
    finally:
        record["bridgeout_left"] = sum(has_bridgeout(m) for m in model.modules())
        Path(os.environ["FINETUNE_SPY"]).write_text(json.dumps(calls))


stage.finetune = spied
sys.argv[0] = "hbgs.run"
runpy.run_module("hbgs.run", run_name="__main__", alter_sys=True)
"""


def replay_widths(history, checkpoint, reference):
    """Apply each history row's width change to a fresh wrapped copy of the checkpoint (L1
    filters: the costs depend on the widths alone), checking that the row starts from the width
    the rows before left; yield (row, cost of the network as saved after it)."""
    replay = load_model(checkpoint)
    wrap_model(replay)
    for row in history:
        widths = channel_widths(replay)[row["layer"]]
        assert getattr(widths, f"{row['side']}_current") == int(row["width_before"]) > int(row["width_after"]) > 0
        prune_conv(replay, row["layer"], row["side"], int(row["width_before"]) - int(row["width_after"]), "l1")
        yield row, saved_cost(replay, reference)


def test_hbgts_run_writes_every_output_consistently(tmp_path):
    # The zoo's trained ResNet-20, so that the accuracies tell models apart: pruning costs a few
    # points and the final fine-tune's one step at final_lr=0.05 under Bridgeout noise moves test
    # accuracy by tens of points (the noise does it: 1 point without), so a summary measured on
    # another model than the saved one fails.
    checkpoint = REPO / "zoo" / "resnet20-cifar10.pt"
    spy_log = tmp_path / "finetunes.json"
    out = subprocess.run(
        [sys.executable, "-c", FINETUNE_SPY, "stage=prune", f"ckpt={checkpoint}", f"hydra.run.dir={tmp_path / 'run'}",
         *TINY, "threads=1", "criterion=hbgts", "criterion.target.params=null", "criterion.target.flops=5",
         "criterion.step=0.5", "criterion.calib_batch=64", "finetune.steps=1", "finetune.final_epochs=1",
         "finetune.final_lr=0.05", "regularizer=bridgeout"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "FINETUNE_SPY": str(spy_log)})
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    for name in ("history.csv", "summary.json", "model.pt", "accuracy_vs_flops.png", "widths.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    # Bridgeout was on inside every fine-tune (one short one per round, then the final one): all
    # 19 convs with a spatial kernel (the stem and the wrapped 3×3 convs; never the 1×1 adapters)
    # carried it and drew noise at every batch, and none kept it afterwards.
    finetunes = json.loads(spy_log.read_text())
    assert [(f["steps"], f["epochs"]) for f in finetunes] == [(1, 0)] * summary["details"]["rounds"] + [(0, 1)]
    for f in finetunes:
        assert f["batches"] == [{"targets": 19, "with_bridgeout": 19, "training": True, "noisy": 19}]
        assert f["bridgeout_left"] == 0
    assert_valid_png(run_dir / "accuracy_vs_flops.png")
    assert_valid_png(run_dir / "widths.png")
    history = read_history(run_dir)
    assert len(history) == summary["details"]["rounds"] >= 2  # half of one layer's side saves < 5 % FLOPs
    assert [int(r["round"]) for r in history] == list(range(1, len(history) + 1))
    # The loop stopped at the first round that met the target.
    assert float(history[-1]["flops_reduction"]) >= 5 > max([float(r["flops_reduction"]) for r in history[:-1]] + [0])

    # Every round: its width change continues from the widths the rounds before left, and its
    # recorded params/FLOPs and reductions are those of the network with the widths so far.
    # With half of a side removed per round, each round removes more weights than its adapter
    # adds, so both reductions grow strictly from round to round.
    original = load_model(checkpoint)
    reference = ReferenceCosts.measure(original)
    previous = (0.0, 0.0)
    for row, cost in replay_widths(history, checkpoint, reference):
        assert (int(row["params"]), int(row["flops"])) == (cost.params, cost.flops), row
        assert float(row["params_reduction"]) == pytest.approx(cost.params_reduction, abs=1e-9)
        assert float(row["flops_reduction"]) == pytest.approx(cost.flops_reduction, abs=1e-9)
        assert cost.params_reduction > previous[0] and cost.flops_reduction > previous[1], row
        previous = (cost.params_reduction, cost.flops_reduction)
        assert 0 <= float(row["calib_acc"]) <= 1
    # The widths the rows leave are the final widths of every layer (those no row names: unpruned).
    final = {}
    for row in history:
        final[row["layer"], row["side"]] = int(row["width_after"])
    assert len(summary["widths"]) == 18
    for layer, w in summary["widths"].items():
        for side in ("in", "out"):
            assert w[f"{side}_current"] == final.get((layer, side), w[f"{side}_original"]), (layer, side)
    # Summary, last row and the saved model agree.
    assert int(history[-1]["params"]) == summary["cost"]["pruned"]["params"]
    assert int(history[-1]["flops"]) == summary["cost"]["pruned"]["flops"]
    assert_costs_match_saved_model(run_dir, summary)
    saved = load_model(run_dir / "model.pt")
    for layer, w in summary["widths"].items():  # the saved convs have these widths inside their adapters
        conv = saved.get_submodule(layer)
        conv = conv.conv if hasattr(conv, "conv") else conv
        assert (conv.in_channels, conv.out_channels) == (w["in_current"], w["out_current"]), layer

    # The accuracies are those of the saved models on the run's own test subset.
    datamodule = instantiate(OmegaConf.load(run_dir / "config.yaml").dataset)
    datamodule.setup()
    test_loader = datamodule.test_dataloader()
    assert len(datamodule.splits["test"]) == summary["test_images"] == 100
    accuracy = summary["accuracy"]
    assert accuracy["final_finetune_steps"] == 1  # 128 images, one epoch, batches of 128
    assert evaluate_accuracy(saved, test_loader) == accuracy["pruned_test_after_finetune"]
    assert abs(accuracy["pruned_test_after_finetune"] - accuracy["pruned_test_before_finetune"]) >= 0.1
    assert evaluate_accuracy(load_model(run_dir / "model_exported.pt"), test_loader) == accuracy["exported_test"]
    assert evaluate_accuracy(original, test_loader) == accuracy["dense_test"] != accuracy["pruned_test_before_finetune"]

    assert summary["details"]["signal"] == "features"
    assert summary["regularizer"] == {"name": "bridgeout", "p": 0.3, "q": 1.5, "target_fraction": 0.75}
    with open(run_dir / "metrics.csv") as f:  # the CSV logger got every round, at step = round
        logged = [(r["prune/round"], r["step"], r["prune/flops"]) for r in csv.DictReader(f) if r["prune/round"]]
    assert logged == [(r["round"], r["round"], r["flops"]) for r in history]


def test_uniform_fraction_prunes_every_layer_by_half(tmp_path, checkpoint):
    summary = prune_run(tmp_path, checkpoint, "criterion=uniform_fraction", "criterion.fraction=0.5",
                        "selector=l1", "finetune=none")
    assert all(w["out_current"] == w["out_original"] // 2 and w["in_current"] == w["in_original"] // 2
               for w in summary["widths"].values())
    assert len(summary["widths"]) == 18  # the 19 convs of ResNet-20 but the stem
    assert summary["accuracy"]["final_finetune_steps"] == 0
    assert_costs_match_saved_model(tmp_path, summary)
    # Hand count: 3×3 convs at half width on both sides, adapters restore the widths.
    assert summary["cost"]["pruned"]["params"] == 100_282
    # The exported model beside it computes the same function, and all three were timed together.
    pruned, exported = load_model(tmp_path / "model.pt"), load_model(tmp_path / "model_exported.pt")
    x = torch.randn(4, 3, 32, 32)
    assert (exported(x) - pruned(x)).abs().max() <= 1e-4 * pruned(x).abs().max()
    assert load_meta(tmp_path / "model_exported.pt")["exported"] is True
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in exported.modules())
    assert summary["cost"]["exported"]["params"] == sum(p.numel() for p in exported.parameters())
    latency = summary["latency_cpu"]
    assert latency["threads"] == 1 and latency["batch_sizes"] == [1, 64]
    assert set(latency["median_ms"]) == {"dense", "pruned", "exported"}
    assert set(latency["speedup_vs_dense"]["exported"]) == {"1", "64"}
    assert len(summary["export"]["batchnorms_folded"]) == 19


def test_uniform_meets_flops_target_within_tolerance(tmp_path, checkpoint):
    summary = prune_run(tmp_path, checkpoint, "criterion=uniform", "criterion.target.params=null", "criterion.target.flops=40",
                        "criterion.tolerance=3", "finetune=none")
    reduction = summary["cost"]["reduction_vs_original_pct"]["flops"]
    assert 40 <= reduction <= 43 and summary["details"]["within_tolerance"]
    assert_costs_match_saved_model(tmp_path, summary)


def test_finetune_trains_the_student_not_the_teacher(cifar10):
    torch.manual_seed(0)
    teacher = resnet20().eval().requires_grad_(False)
    student = resnet20()
    student.load_state_dict(teacher.state_dict())
    wrap_model(student)
    before = [p.clone() for p in teacher.parameters()]
    student.eval()  # as a loaded model is: the fine-tune must still train in train mode
    running_mean, teacher_running_mean = student.bn1.running_mean.clone(), teacher.bn1.running_mean.clone()

    class Cfg:
        momentum, weight_decay, kd_temperature, kd_weight = 0.9, 1e-4, 2.0, 1.0

    steps = finetune(student, cifar10, teacher, Cfg, steps=2, lr=0.01)
    assert steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert not torch.equal(running_mean, student.bn1.running_mean)  # BatchNorm ran in train mode
    assert torch.equal(teacher.bn1.running_mean, teacher_running_mean)  # the teacher stayed in eval mode
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, dict(teacher.named_parameters()).get(
        n.replace(".conv.", "."), p))]
    assert any(".conv." in n for n in changed)  # the wrapped convs were trained


@pytest.mark.parametrize("args,message", [
    (["criterion.target.params=100"], "out of reach"),
    (["stage=prune", "ckpt=/no/such.pt"], "stage=train"),
    (["criterion=uniform", "criterion.target.params=null", "criterion.target.flops=100"], "out of reach"),
    (["criterion.target.flops=50"], "criterion.target.params=null"),
    (["criterion.target.params=0"], "greater than 0"),
    (["criterion.step=1000"], "step"),
    (["model=resnet56"], "pass the matching model="),
])
def test_bad_prune_input_gets_one_clear_message(args, message, tmp_path, checkpoint):
    out = hbgs_run("stage=prune", f"ckpt={checkpoint}", f"hydra.run.dir={tmp_path}", *TINY, *args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in (out.stderr + out.stdout).lower() or message in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "model.pt").exists()
