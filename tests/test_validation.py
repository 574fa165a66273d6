"""hbgs.validation: every option checked before any work, each bad one answered in one line that
names it, its value and a valid example; every shipped configuration passes."""

import copy
import functools
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO
from hbgs.errors import HbgsError
from hbgs.validation import ACCELERATORS, CRITERIA, PRECISIONS, STAGES, check_config, validate

GROUPS = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


@functools.cache
def composed_groups(groups: tuple[str, ...], hydra: bool):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(groups), return_hydra_config=hydra)


def composed(*overrides: str, hydra: bool = False):
    """The config Hydra composes for ``overrides``. Composing takes a tenth of a second, so each
    set of group choices is composed once and the values are applied to a copy by Hydra's own
    code, as ``compose`` applies them."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    is_group = [o.key_or_group.split("/")[0] in GROUPS for o in parsed]
    cfg = copy.deepcopy(composed_groups(tuple(o.input_line for o, g in zip(parsed, is_group) if g), hydra))
    ConfigLoaderImpl._apply_overrides_to_config([o for o, g in zip(parsed, is_group) if not g], cfg)
    return cfg


def test_composed_is_what_hydra_composes():
    overrides = ["method=tp_l1", "stage=train", "criterion.tolerance=3", "+extra=${seed}", "dataset=cifar100"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        expected = compose("config", overrides=overrides)
    assert OmegaConf.to_container(composed(*overrides)) == OmegaConf.to_container(expected)


def refusal(*overrides: str, check=validate) -> str:
    with pytest.raises(HbgsError) as error:
        check(composed(*overrides))
    message = str(error.value)
    assert "\n" not in message  # one line
    return message


# The bad-input table: overrides (on top of the defaults, stage=prune) -> the message, or its key part.
BAD_INPUTS = [
    # found late or not at all before (issue 14)
    (["finetune.final_epochs=-1"], "finetune.final_epochs=-1 must be an integer ≥ 0, e.g. finetune.final_epochs=1"),
    (["dataset.limit_train=-5"], "dataset.limit_train=-5 must be null or an integer ≥ 1, e.g. dataset.limit_train=10000"),
    (["stage=train", "trainer.max_epochs=0"], "trainer.max_epochs=0 must be an integer ≥ 1 for stage=train (or -1 "
                                              "with trainer.max_steps ≥ 1), e.g. trainer.max_epochs=30"),
    (["criterion.calib_batch=0"], "criterion.calib_batch=0 must be an integer ≥ 1, e.g. criterion.calib_batch=256"),
    (["finetune.lr=-1"], "finetune.lr=-1 must be a positive number, e.g. finetune.lr=0.001"),
    (["stage=train", "dataset.batch_size=0"], "dataset.batch_size=0 must be an integer ≥ 1, e.g. dataset.batch_size=128"),
    (["criterion.step=1.5"], "criterion.step=1.5 must be a channel count (an integer ≥ 1) or a fraction of the current "
                             "width in (0, 1), e.g. criterion.step=5 or criterion.step=0.25"),
    (["criterion.min_channels=0"], "criterion.min_channels=0 must be an integer ≥ 1, e.g. criterion.min_channels=1"),
    (["criterion.signal=bogus"], "criterion.signal=bogus must be one of features, logits, loss, "
                                 "e.g. criterion.signal=features"),
    # the run
    (["stage=fly"], "stage=fly must be one of train, eval, prune, robustness, e.g. stage=prune"),
    (["seed=-1"], "seed=-1 must be an integer in [0, 4294967295], e.g. seed=0"),
    (["threads=0"], "threads=0 must be null or an integer ≥ 1, e.g. threads=1"),
    (["surgery=cut"], "surgery='cut': use surgery=adapters"),
    (["stage=eval", "ckpt=null"], "ckpt=null: stage=eval needs a trained model: pass ckpt=<path to model.pt>"),
    (["ckpt=null"], "ckpt=null: stage=prune needs a trained model"),
    (["stage=robustness", "ckpt=null"], "stage=robustness needs models"),
    (["logger.name=tensorboard"], "logger.name=tensorboard must be one of wandb, csv, none, e.g. logger=csv"),
    (["logger=wandb", "logger.mode=cloud"], "logger.mode=cloud must be one of offline, online, disabled"),
    (["+extra=${nope}"], "extra=${nope} does not resolve (Interpolation key 'nope' not found)"),
    # dataset
    (["dataset.eval_batch_size=0"], "dataset.eval_batch_size=0 must be an integer ≥ 1"),
    (["dataset.batch_size=abc"], "dataset.batch_size=abc must be an integer ≥ 1"),
    (["dataset.num_workers=-1"], "dataset.num_workers=-1 must be an integer ≥ 0"),
    (["dataset.calib_size=0"], "dataset.calib_size=0 must be an integer ≥ 1 (stage=prune decides on held-out "
                               "calibration images), e.g. dataset.calib_size=1000"),
    (["dataset.limit_test=0"], "dataset.limit_test=0 must be null or an integer ≥ 1"),
    (["dataset.image_size=0"], "dataset.image_size=0 must be null or an integer ≥ 1"),
    (["dataset.num_classes=1"], "dataset.num_classes=1 must be an integer ≥ 2"),
    (["dataset.download=maybe"], "dataset.download=maybe must be true or false"),
    (["dataset.mean=[0.5,0.5,0.5]"], "dataset.mean=[0.5,0.5,0.5] and dataset.std=null: give both or neither"),
    (["dataset.mean=[0.5,0.5,0.5]", "dataset.std=[0.2,0,0.2]"], "dataset.std=[0.2,0,0.2] must be null or 3 numbers"),
    (["dataset=cifar100", "dataset.root=null"], "dataset.root=null leaves dataset=cifar100 without data"),
    (["dataset=imagefolder"], "dataset.root=null leaves dataset=imagefolder without data: give its folder, "
                              "e.g. dataset.root=/path/to/imagefolder"),
    (["dataset.num_classes=???"], "dataset.num_classes=??? has no value: give one, e.g. dataset.num_classes=10"),
    (["dataset.name=mnist"], "dataset.name=mnist must be one of cifar10, cifar100, imagefolder"),
    # criterion and selector
    (["criterion.target.flops=50"], "give exactly one target (a % reduction against the original network) and set "
                                    "the other to null, e.g. criterion.target.params=null criterion.target.flops=50"),
    (["criterion.target.params=0"], "criterion.target.params=0 must be a % reduction greater than 0 and below 100"),
    (["criterion.target.params=100"], "out of reach"),
    (["criterion.name=hbgx"], "criterion.name=hbgx must be one of hbgs, hbgts, uniform, sensitivity, "
                              "uniform_fraction, tp_l1, tp_group_norm, e.g. criterion=hbgts"),
    (["criterion.step=0"], "criterion.step=0 must be a channel count"),
    (["criterion.score=cost"], "criterion.score=cost must be one of error, error_per_cost, error_per_latency"),
    (["criterion=uniform", "criterion.tolerance=-1"], "criterion.tolerance=-1 must be a number ≥ 0 (% points of "
                                                      "the target), e.g. criterion.tolerance=0.5"),
    (["criterion=sensitivity", "criterion.ratios=[0.5,0.2]"], "criterion.ratios=[0.5,0.2] must be distinct "
                                                              "ascending ratios in (0, 1]"),
    (["criterion=uniform_fraction", "criterion.fraction=1.5"], "criterion.fraction=1.5 must be a number in (0, 1]"),
    (["method=tp_l1", "criterion.importance=l3"], "criterion.importance=l3 must be one of l1, group_norm"),
    (["method=tp_l1", "criterion.global_pruning=yes"], "criterion.global_pruning=yes must be true, false or null"),
    (["selector.method=l3"], "selector.method=l3 must be one of backward, omp, l1, l2, random, e.g. selector=backward"),
    # fine-tuning
    (["finetune.every=-1"], "finetune.every=-1 must be an integer ≥ 0 (rounds between short fine-tunes; 0: never)"),
    (["finetune.steps=1.5"], "finetune.steps=1.5 must be an integer ≥ 0"),
    (["finetune.momentum=1"], "finetune.momentum=1 must be a number in [0, 1)"),
    (["finetune.kd_temperature=0"], "finetune.kd_temperature=0 must be a positive number"),
    (["finetune.bn_recalibrate=-3"], "finetune.bn_recalibrate=-3 must be an integer ≥ 0"),
    (["finetune.final_lr=nan"], "finetune.final_lr=nan must be a positive number"),
    (["finetune.weight_decay=-1e-4"], "finetune.weight_decay=-0.0001 must be a number ≥ 0"),
    (["stop_after_rounds=0"], "stop_after_rounds=0 must be null or an integer ≥ 1, e.g. stop_after_rounds=10"),
    # trainer and optimiser
    (["trainer.precision=8"], "trainer.precision=8 must be one of 32-true, 16-mixed, bf16-mixed"),
    (["stage=train", "trainer.devices=0"], "trainer.devices=0 must be a process count ≥ 1 (or auto) on "
                                           "trainer.accelerator=cpu"),
    (["stage=train", "trainer=gpu", "trainer.devices=0"], "trainer.devices=0 must be a device count ≥ 1, -1 (all)"),
    (["stage=train", "trainer.accelerator=tpu9"], "trainer.accelerator=tpu9 must be one of cpu, gpu, cuda, mps, auto"),
    (["stage=train", "trainer.max_steps=0"], "trainer.max_steps=0 must be an integer ≥ 1, or -1"),
    # one device for prune and robustness (issue 10): no rank repeating the loop, no weights cast for good
    (["trainer=ddp"], "trainer.strategy=ddp would run stage=prune in every process, each repeating the pruning; it "
                      "runs in one process on one device, e.g. trainer=gpu trainer.devices=1"),
    (["stage=robustness", "trainer=ddp"], "trainer.strategy=ddp would run stage=robustness in every process"),
    (["trainer.devices=2"], "trainer.devices=2 asks for several devices; stage=prune runs in one process on one "
                            "device, e.g. trainer=gpu trainer.devices=1"),
    (["trainer=gpu", "trainer.devices=[0,1]"], "trainer.devices=[0,1] asks for several devices"),
    (["trainer.precision=bf16-true"], "trainer.precision=bf16-true casts the model and its teacher for good"),
    (["trainer.precision=16-true"], "trainer.precision=16-true casts the model"),
    (["trainer.precision=64-true"], "trainer.precision=64-true casts the model"),
    (["stage=train", "trainer.max_epochs=-1"], "trainer.max_epochs=-1 must be an integer ≥ 1 for stage=train"),
    (["stage=train", "trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5 must be null, a batch "
                                                         "count ≥ 1 or a fraction in (0, 1]"),
    (["stage=train", "trainer.limit_test_batches=0"], "trainer.limit_test_batches=0 must be null, a batch count ≥ 1"),
    (["stage=train", "trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 must be an integer ≥ 1"),
    (["stage=train", "optim.lr=0"], "optim.lr=0 must be a positive number, e.g. optim.lr=0.1"),
    (["stage=train", "optim.weight_decay=-0.1"], "optim.weight_decay=-0.1 must be a number ≥ 0"),
    (["stage=train", "optim.milestones=[0.5,1.5]"], "optim.milestones=[0.5,1.5] must be a list of fractions"),
    (["stage=train", "optim.schedule=linear"], "optim.schedule=linear must be one of cosine, multistep, onecycle, "
                                               "constant"),
    (["stage=train", "model.num_classes=7"], "model.num_classes=7 must equal dataset.num_classes=10"),
    (["stage=train", "model._target_=hbgs.models.resnet21"], "model._target_=hbgs.models.resnet21 is not an "
                                                             "importable model builder"),
    # regulariser
    (["stage=train", "regularizer=bridgeout", "regularizer.p=1.5"], "regularizer.p=1.5 must be a number in [0, 1) "
                                                                    "(the bridgeout p, a drop probability)"),
    (["regularizer=bridgeout", "regularizer.q=0"], "regularizer.q=0 must be a positive number"),
    (["regularizer.name=dropout"], "regularizer.name=dropout must be one of none, bridgeout"),
    # latency
    (["stage=eval", "latency.batch_sizes=[]"], "latency.batch_sizes=[] must be a non-empty list of batch sizes ≥ 1"),
    (["latency.repeats=0"], "latency.repeats=0 must be an integer ≥ 1"),
    (["latency.export_repeats=0"], "latency.export_repeats=0 must be an integer ≥ 1"),
    (["stage=eval", "latency.threads=-2"], "latency.threads=-2 must be null or an integer ≥ 1"),
    # robustness
    (["stage=robustness", "robustness.fractions=[0.5,1.0]"], "robustness.fractions=[0.5,1] must be a non-empty list "
                                                             "of fractions in [0, 1)"),
    (["stage=robustness", "robustness.methods=[l3]"], "robustness.methods=[l3]: unknown robustness method 'l3'"),
    (["stage=robustness", "robustness.calib_batch=0"], "robustness.calib_batch=0 must be an integer ≥ 1"),
    (["stage=robustness", "surgery=remove", "dataset.calib_size=0"], "dataset.calib_size=0 must be an integer ≥ 1 "
                                                                     "(surgery=remove fits"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_refused_in_one_line_with_an_example(overrides, message):
    refused = refusal(*overrides, check=check_config)
    assert message in refused and (", e.g. " in refused or ": use " in refused)  # a valid value to try


def test_the_table_is_long():
    assert len(BAD_INPUTS) >= 25


# What this machine must have: the files named, the accelerator asked for, Torch-Pruning.
MACHINE_INPUTS = [
    (["stage=eval", "ckpt=/no/such/model.pt"], "ckpt=/no/such/model.pt does not exist, e.g. ckpt=<run dir>/model.pt "
                                               "(stage=train writes one) or ckpt=zoo"),
    (["ckpt=/no/such/model.pt"], "ckpt=/no/such/model.pt does not exist"),
    (["stage=train", "resume=/no/such/last.ckpt"], "resume=/no/such/last.ckpt is not a file, e.g. "
                                                   "resume=<run dir>/checkpoints/last.ckpt"),
    (["stage=robustness", "robustness.checkpoints={a: /no/such.pt}"], "robustness.checkpoints.a=/no/such.pt does "
                                                                      "not exist"),
    (["dataset=cifar100", "dataset.root=/no/such/dir"], "dataset.root=/no/such/dir does not exist, e.g. "
                                                        "dataset.root=/path/to/cifar100 (or dataset.download=true"),
]


@pytest.mark.parametrize("overrides,message", MACHINE_INPUTS, ids=[" ".join(o) for o, _ in MACHINE_INPUTS])
def test_missing_files_are_refused_before_anything_loads(overrides, message):
    cfg = composed(*overrides)
    check_config(cfg)  # a sound config, on a machine that lacks the file
    with pytest.raises(HbgsError) as error:
        validate(cfg)
    assert message in str(error.value)


def test_a_gpu_trainer_needs_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "trainer.accelerator=gpu needs a CUDA GPU, which this machine does not have, e.g. trainer=cpu" in \
        refusal("stage=train", "trainer=gpu")
    assert "needs a CUDA GPU" in refusal("trainer=gpu", "finetune=none")  # it prunes there, fine-tuning or not
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "trainer.devices=4 asks for more GPUs than the 1 this machine has" in \
        refusal("stage=train", "trainer=gpu", "trainer.devices=4")


def test_removing_channels_needs_torch_pruning(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # `import torch_pruning` raises ImportError
    assert "surgery=remove needs Torch-Pruning" in refusal("surgery=remove")
    assert "criterion=tp_l1 needs Torch-Pruning" in refusal("method=tp_l1")
    validate(composed())  # the adapters do without


# Every shipped configuration passes.
def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


SHIPPED = (  # the methods cover every criterion and selector with the adapters, but these
    [[f"stage={stage}"] for stage in STAGES]
    + [[f"method={m}"] for m in options("method")]
    + [[f"criterion={c}", "surgery=remove"] for c in options("criterion")]
    + [["criterion=uniform_fraction"], ["selector=l2"]]
    + [["finetune=none"], ["regularizer=bridgeout"], ["stage=train", "regularizer=bridgeout"]]
    + [[f"logger={lg}"] for lg in options("logger")]
    + [["stage=train", f"trainer={t}"] for t in options("trainer")]
    + [["trainer=gpu"], ["stage=robustness", "trainer=gpu"], ["stage=eval", "trainer=ddp"]]
    + [[f"dataset={d}"] + (["dataset.root=/data/x", "dataset.num_classes=5"] if d == "imagefolder" else [])
       for d in options("dataset")]
    + [["stage=robustness", "surgery=remove"], ["stage=train", "optim.schedule=multistep"]]
)


@pytest.mark.parametrize("overrides", SHIPPED, ids=[" ".join(o) for o in SHIPPED])
def test_shipped_configs_pass(overrides):
    check_config(composed(*overrides))


def test_every_experiment_passes_with_each_of_its_methods():
    for experiment in options("experiment"):
        cfg = composed(f"experiment={experiment}", hydra=True)  # Hydra's node: the sweep; skipped by the checks
        check_config(cfg)
        for method in filter(None, str((cfg.hydra.sweeper.params or {}).get("method", "")).split(",")):
            check_config(composed(f"experiment={experiment}", f"method={method}"))


def test_the_defaults_pass_on_this_machine():
    for stage in STAGES:
        validate(composed(f"stage={stage}"))


def test_restated_choices_match_their_sources():
    import lightning.fabric.connector as connector
    from lightning.pytorch.accelerators import AcceleratorRegistry

    from hbgs import prune_stage, stages
    from hbgs.pruning import criteria

    assert STAGES == tuple(stages.STAGES)
    assert CRITERIA is prune_stage.CRITERIA is criteria.CRITERIA  # one tuple, imported
    precisions = {*connector._PRECISION_INPUT_INT.__args__, *connector._PRECISION_INPUT_STR.__args__,
                  *connector._PRECISION_INPUT_STR_ALIAS.__args__}
    assert set(PRECISIONS) - {"auto"} <= precisions  # auto: hbgs.devices.lightning_precision
    assert set(ACCELERATORS) <= {*AcceleratorRegistry.available_accelerators(), "gpu", "auto"}


def test_cli_refuses_in_seconds_with_one_line_before_reading_anything(tmp_path):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "hbgs.run", "criterion.step=1.5", "logger=none",
                          f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert out.returncode == 2
    lines = [line for line in (out.stdout + out.stderr).splitlines() if not line.startswith("import time:")]
    assert len(lines) == 1 and lines[0].endswith("criterion.step=1.5 must be a channel count (an integer ≥ 1) or a "
                                                 "fraction of the current width in (0, 1), e.g. criterion.step=5 or "
                                                 "criterion.step=0.25")
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert not any(name.startswith("lightning") for name in imported)  # what costs a prune run its first seconds
    assert not (tmp_path / "config.yaml").exists()  # written only once the options pass
    assert seconds < 20, seconds  # about 3 s on an idle 2-core CPU: Python, Hydra and torch
