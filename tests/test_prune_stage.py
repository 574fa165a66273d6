"""stage=prune end to end on the offline CIFAR-10 at a tiny scale, through the command line."""

import csv
import json

import matplotlib.pyplot as plt
import pytest
import torch

from hbgs.accounting import count_macs, count_params
from hbgs.checkpoint import load_meta, load_model, save_model
from hbgs.finetune import finetune
from hbgs.models import resnet20
from hbgs.pruning import wrap_model
from conftest import hbgs_run

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


def test_hbgts_run_writes_every_output_consistently(tmp_path, checkpoint):
    summary = prune_run(tmp_path, checkpoint, "criterion=hbgts", "criterion.target.params=null",
                        "criterion.target.flops=5", "criterion.step=0.5", "criterion.calib_batch=64",
                        "finetune.steps=1", "finetune.final_epochs=1", "regularizer=bridgeout")
    for name in ("history.csv", "summary.json", "model.pt", "accuracy_vs_flops.png", "widths.png", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    assert_valid_png(tmp_path / "accuracy_vs_flops.png")
    assert_valid_png(tmp_path / "widths.png")
    history = read_history(tmp_path)
    assert len(history) == summary["details"]["rounds"] >= 1
    # The loop stopped at the first round that met the target.
    assert float(history[-1]["flops_reduction"]) >= 5 > max([float(r["flops_reduction"]) for r in history[:-1]] + [0])
    # Summary and history agree, and both agree with the saved model.
    assert int(history[-1]["params"]) == summary["cost"]["pruned"]["params"]
    assert int(history[-1]["flops"]) == summary["cost"]["pruned"]["flops"]
    assert_costs_match_saved_model(tmp_path, summary)
    # Every round's chosen layer really is narrower in the final widths.
    last = history[-1]
    widths = summary["widths"][last["layer"]]
    assert widths[f"{last['side']}_current"] == int(last["width_after"]) < widths[f"{last['side']}_original"]
    assert all(0 <= float(r["calib_acc"]) <= 1 for r in history)
    accuracy = summary["accuracy"]
    assert accuracy["final_finetune_steps"] == 1  # 128 images, one epoch, batches of 128
    assert {"dense_test", "pruned_test_before_finetune", "pruned_test_after_finetune"} <= accuracy.keys()
    assert summary["details"]["signal"] == "features"
    assert summary["regularizer"] == {"name": "bridgeout", "p": 0.3, "q": 1.5, "target_fraction": 0.75}
    assert (tmp_path / "metrics.csv").is_file()  # the CSV logger got the rounds


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
