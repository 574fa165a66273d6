"""Sweeps: parallel local jobs through the joblib launcher (each its own W&B run), the SLURM
launcher's composition, method/experiment configs, and the table a multirun of prune jobs ends
with."""

import csv
import json

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, REPO, hbgs_run
from hbgs.collect import main as collect_main, table_row
from hbgs.errors import HbgsError
from hbgs.zoo import resolve_ckpt, zoo_checkpoint


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_joblib_runs_jobs_in_parallel_each_its_own_wandb_run(tmp_path):
    out = hbgs_run("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=1", "stage=eval",
                   "ckpt=zoo", "dataset.limit_test=100,200", "latency.batch_sizes=[1]", "latency.repeats=2",
                   "dataset.calib_size=100", "logger=wandb", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr
    jobs = sorted(p.parent for p in tmp_path.glob("*/summary.json"))
    assert [json.loads((j / "summary.json").read_text())["test_images"] for j in jobs] == [100, 200]
    runs = [sorted((j / "wandb").glob("offline-run-*")) for j in jobs]
    assert [len(r) for r in runs] == [1, 1] and runs[0][0].name != runs[1][0].name


def test_slurm_launcher_composes_with_our_settings():
    cfg = compose_with("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                       "hydra.launcher.gpus_per_node=1", "trainer=gpu")
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.gpus_per_node) == ("gpu", 1)
    assert cfg.trainer.accelerator == "gpu"


METHODS = {"hbgs": ("hbgs", "omp"), "hbgs_b": ("hbgs", "backward"), "hbgts": ("hbgts", "omp"),
           "hbgts_b": ("hbgts", "backward"), "fp_backward": ("uniform", "backward"), "fp_omp": ("uniform", "omp"),
           "random": ("uniform", "random"), "l1": ("uniform", "l1"), "sensitivity": ("sensitivity", "backward"),
           "hbgts_b_cost": ("hbgts", "backward"), "hbgts_b_latency": ("hbgts", "backward"),
           "tp_l1": ("tp_l1", "backward"), "tp_group_norm": ("tp_group_norm", "backward")}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_sets_criterion_and_selector(method):
    cfg = compose_with(f"method={method}")
    assert (cfg.criterion.name, cfg.selector.method, cfg.method) == (*METHODS[method], method)


EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_each_of_its_methods(experiment):
    cfg = compose_with(f"experiment={experiment}")
    methods = str((cfg.hydra.sweeper.params or {}).get("method", "")).split(",")
    if methods == [""]:  # a single-method row names its method itself
        assert cfg.stage == "prune" and (cfg.paper is None or cfg.method in cfg.paper)
    for method in filter(None, methods):
        job = compose_with(f"experiment={experiment}", f"method={method}")
        assert (job.criterion.name, job.selector.method) == METHODS[method]
        assert job.stage == "prune" and job.criterion.target == cfg.criterion.target
        if job.paper:  # a paper row stores the published figure of every method it sweeps
            assert method in job.paper and "dense" in job.paper


def test_zoo_checkpoint_resolves_and_a_missing_one_says_how_to_train_it():
    assert resolve_ckpt("zoo", "resnet20", "cifar10") == str(REPO / "zoo" / "resnet20-cifar10.pt")
    assert resolve_ckpt("a/model.pt", "resnet20", "cifar10") == "a/model.pt"
    with pytest.raises(HbgsError, match="stage=train model=vgg16 dataset=cifar100"):
        zoo_checkpoint("vgg16", "cifar100")


def test_multirun_of_prune_jobs_ends_with_a_table(tmp_path, trained_run):
    paper = "+paper={dense: 90.0, fp_backward: 88.5}"
    out = hbgs_run("-m", "method=fp_backward,l1", f"ckpt={trained_run / 'model.pt'}", "criterion.target.params=30",
                   "finetune=none", "dataset.calib_size=100", "dataset.limit_test=100",
                   "latency.repeats=2", "logger=none", paper, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["fp_backward", "l1"]
    summaries = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")}
    for row in rows:
        summary = summaries[row["method"]]
        assert float(row["params_reduction"]) == pytest.approx(summary["cost"]["reduction_vs_original_pct"]["params"])
        assert float(row["acc_before_finetune"]) == pytest.approx(100 * summary["accuracy"]["pruned_test_before_finetune"])
        assert row["acc_after_finetune"] == ""  # finetune=none: no "after" figure
        assert float(row["params_reduction"]) >= 30
    assert rows[0]["paper_acc"] == "88.5" and rows[1]["paper_acc"] == ""
    table = (tmp_path / "table.md").read_text()
    assert "| fp_backward | uniform + backward | adapters | resnet20 | -30% params |" in table and "88.5 (90.0)" in table
    for row in rows:  # the exported model's speed-up, as the summary measured it
        summary = summaries[row["method"]]
        assert float(row["speedup_b64"]) == pytest.approx(summary["latency_cpu"]["speedup_vs_dense"]["exported"]["64"])
    assert "MACs of conv+linear" in table and "JPEG" in table
    # the same table from the command line, elsewhere
    collect_main([str(tmp_path), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "table.md").read_text() == table


@pytest.mark.parametrize("final_steps,short_seconds,after", [(79, 0.0, 80.2), (0, 0.0, None), (0, 12.0, None)])
def test_table_has_an_after_figure_only_when_a_final_finetune_ran(final_steps, short_seconds, after):
    summary = {"criterion": "uniform", "selector": "backward", "target": {"params": 50, "flops": None},
               "accuracy": {"dense_test": 0.8685, "pruned_test_before_finetune": 0.1107,
                            "pruned_test_after_finetune": 0.802 if final_steps else 0.1107,
                            "final_finetune_steps": final_steps},
               "cost": {"reduction_vs_original_pct": {"params": 50.29, "flops": 48.57}, "convention": "MACs"},
               "seconds": {"pruning": 6.0, "short_finetunes": short_seconds, "final_finetune": 60.0 if final_steps else 0.0},
               "dataset": "cifar10", "test_images": 10000}
    row = table_row(summary, {}, REPO)
    assert row["method"] == "fp_backward" and row["acc_before_finetune"] == pytest.approx(11.07)
    assert row["acc_after_finetune"] == (None if after is None else pytest.approx(after))


def test_runs_of_one_method_at_one_target_are_averaged_over_their_seeds(tmp_path):
    """Two seeds of uniform FP-Backward and one of L1: the mean table holds their mean, lowest and
    highest after-fine-tune accuracy (by hand), best first, and is written beside the run table."""
    def run(method, seed, after, flops):
        summary = {"stage": "prune", "criterion": "uniform", "selector": method,
                   "target": {"params": None, "flops": 50},
                   "accuracy": {"dense_test": 0.8685, "pruned_test_before_finetune": 0.4,
                                "pruned_test_after_finetune": after, "final_finetune_steps": 79},
                   "cost": {"reduction_vs_original_pct": {"params": 51.0, "flops": flops}, "convention": "MACs"},
                   "seconds": {"pruning": 6.0, "short_finetunes": 0.0, "final_finetune": 60.0},
                   "dataset": "cifar10", "test_images": 10000, "surgery": "remove"}
        folder = tmp_path / f"{method}_{seed}"
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(summary))
        (folder / "config.yaml").write_text(f"seed: {seed}\nmodel: {{_target_: hbgs.models.resnet20}}\n")

    run("backward", 0, 0.8131, 50.9)
    run("backward", 1, 0.8129, 51.1)
    run("l1", 0, 0.8055, 51.0)
    collect_main([str(tmp_path)])
    with open(tmp_path / "table_means.csv") as f:
        means = {r["method"]: r for r in csv.DictReader(f)}
    assert means["fp_backward"]["runs"] == "2" and means["fp_backward"]["seeds"] == "0 1"
    assert float(means["fp_backward"]["acc_after_finetune"]) == pytest.approx(81.30)
    assert float(means["fp_backward"]["acc_after_finetune_min"]) == pytest.approx(81.29)
    assert float(means["fp_backward"]["flops_reduction"]) == pytest.approx(51.0)
    assert means["l1"]["runs"] == "1"
    table = (tmp_path / "table.md").read_text()
    assert "| resnet20 | -50% FLOPs | fp_backward | remove | 0, 1 | 51.00 | 51.00 | 40.00 (40.00–40.00) | 81.30 (81.29–81.31) | – |" in table
    assert table.index("| fp_backward | remove | 0, 1") < table.index("| l1 | remove | 0 |")  # best first


def test_an_experiment_or_method_config_wins_over_the_defaults_and_the_command_line_over_both():
    """config.yaml's own values come before method= and experiment= (its _self_ is listed first):
    an experiment's surgery: remove once lost silently to the default adapters."""
    assert compose_with("experiment=resnext101_cifar10_p98").surgery == "remove"
    assert compose_with("experiment=resnet20_cifar10_equal_flops").surgery == "remove"
    assert compose_with("experiment=resnet20_cifar10_equal_flops", "surgery=adapters").surgery == "adapters"
    cfg = compose_with("method=hbgts_b_cost")
    assert (cfg.criterion.score, cfg.finetune.bn_recalibrate, cfg.surgery) == ("error_per_cost", 0, "adapters")
    assert compose_with().surgery == "adapters" and compose_with().seed == 0


@pytest.mark.parametrize("config,name", [
    ({"method": "hbgts_b", "criterion": {"score": "error_per_cost"}, "finetune": {"bn_recalibrate": 0}}, "hbgts_b_cost"),
    ({"method": "hbgts_b", "criterion": {"score": "error_per_cost"}, "finetune": {"bn_recalibrate": 256}},
     "hbgts_b_cost, BN recal 256"),
    ({"method": "hbgts_b_latency", "criterion": {"score": "error_per_latency"}, "finetune": {"bn_recalibrate": 256}},
     "hbgts_b_latency, BN recal 256"),
    ({"method": "hbgts_b", "finetune": {"bn_recalibrate": 256}}, "hbgts_b, BN recal 256")])
def test_table_names_a_run_by_the_method_whose_settings_it_has(config, name):
    summary = {"criterion": "hbgts", "selector": "backward", "target": {"params": 50, "flops": None},
               "accuracy": {"dense_test": 0.8685, "pruned_test_before_finetune": 0.5,
                            "pruned_test_after_finetune": 0.8, "final_finetune_steps": 79},
               "cost": {"reduction_vs_original_pct": {"params": 50.1, "flops": 60.0}, "convention": "MACs"},
               "seconds": {"pruning": 6.0, "short_finetunes": 0.0, "final_finetune": 60.0},
               "dataset": "cifar10", "test_images": 10000}
    assert table_row(summary, config, REPO)["method"] == name
