"""One device for the whole run (issue 10): every module the pruning builds lands where the model
is, accounting and evaluation leave the caller's model where and as it was, fine-tunes keep float32
weights under mixed precision, and (on a GPU) CUDA scores pick what the CPU picks.

This machine has no GPU: float64 models stand in for "a place other than torch's default" (a
module built with the defaults would be float32 there, as it would be on the CPU in a CUDA model).
"""

import copy
import json
from contextlib import contextmanager

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from hbgs.accounting import count_macs, count_params, measure_latencies
from hbgs.checkpoint import load_model
from hbgs.data import DeviceBatches, ImageSplit
from hbgs.devices import fast_layout, full_precision, lightning_precision, module_device, run_device
from hbgs.finetune import finetune
from hbgs.models import resnet20
from hbgs.module import evaluate_accuracy
from hbgs.pruning import fold_identity_adapters, wrap_model
from hbgs.pruning.adapters import AdaptedConv
from hbgs.pruning.acra import layer_sensitivity
from hbgs.pruning.hierarchical import build_pruner
from hbgs.pruning.ratios import prune_uniform_fraction
from hbgs.zoo import zoo_checkpoint
from conftest import REPO, hbgs_run

F64 = torch.float64


@contextmanager
def created_parameters():
    """(module type, name, dtype) of every parameter registered on any module meanwhile,
    transient modules included (e.g. the skeleton ``check_target`` counts)."""
    seen = []
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: seen.append((type(module).__name__, name, param.dtype))
        if param is not None else None)
    try:
        yield seen
    finally:
        handle.remove()


def dtypes(created) -> set:
    return {dtype for *_, dtype in created}


def float_dtypes(model: nn.Module) -> set:
    return {t.dtype for t in model.state_dict().values() if t.is_floating_point()}


def float64_net(seed: int = 0):
    torch.manual_seed(seed)
    original = resnet20().to(F64).eval().requires_grad_(False)
    x = torch.randn(16, 3, 32, 32, dtype=F64)
    return original, x, torch.randint(0, 10, (16,))


@pytest.mark.parametrize("criterion,signal,score", [("hbgts", "features", "error"), ("hbgs", "features", "error"),
                                                     ("hbgts", "loss", "error_per_cost")])
def test_adapter_rounds_build_every_module_on_the_models_dtype(one_thread, criterion, signal, score):
    original, x, y = float64_net()
    model = copy.deepcopy(original)
    with created_parameters() as created:
        wrap_model(model)
        pruner = build_pruner(model, original, x, y, criterion=criterion, signal=signal, step=0.25, score=score)
        pruner.check_target(target_params=30, target_flops=None)  # counts a skeleton of new modules
        for _ in range(2):
            pruner.run_round("params", 30)
        fold_identity_adapters(model)
    assert float_dtypes(model) == {F64}
    assert created and dtypes(created) == {F64}, created[:5]


def test_removal_and_acra_build_every_module_on_the_models_dtype(one_thread):
    pytest.importorskip("torch_pruning")
    original, x, y = float64_net()
    model, wrapped = copy.deepcopy(original), copy.deepcopy(original)
    with created_parameters() as created:
        pruner = build_pruner(model, original, x, y, surgery="remove", step=0.25)
        pruner.check_target(target_params=30, target_flops=None)
        pruner.run_round("params", 30)
        wrap_model(wrapped)
        layer_sensitivity(wrapped, x, y, ratios=[0.5])
        prune_uniform_fraction(wrapped, 0.5, "backward")
    assert float_dtypes(model) == float_dtypes(wrapped) == {F64}
    assert created and dtypes(created) == {F64}, created[:5]


def mixed_modes_model():
    """A model in training mode with one submodule in eval mode (as a Classifier holds a teacher)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    model.train()
    model[1].eval()
    return model


def where_and_how(model: nn.Module):
    return ([(t, t.data_ptr(), t.device, t.dtype) for t in [*model.parameters(), *model.buffers()]],
            [m.training for m in model.modules()])


def test_accounting_and_evaluation_leave_the_callers_model_as_it_was(one_thread):
    model = mixed_modes_model()
    before = where_and_how(model)
    count_params(model)
    count_macs(model, (3, 8, 8))
    measure_latencies({"m": model}, batch_sizes=[1], input_size=(3, 8, 8), warmup=0, repeats=1)
    evaluate_accuracy(model, [(torch.randn(4, 3, 8, 8), torch.arange(4))])
    after = where_and_how(model)
    assert [(p, d, dev, dt) for p, d, dev, dt in after[0]] == before[0]  # the same tensors, not moved or cast
    assert after[1] == before[1]  # every submodule's mode


def test_the_run_device_comes_from_the_trainer():
    assert run_device(OmegaConf.create({"accelerator": "gpu", "devices": 1})) == torch.device("cuda", 0)
    assert run_device(OmegaConf.create({"accelerator": "cuda", "devices": [1]})) == torch.device("cuda", 1)
    assert run_device(OmegaConf.create({"accelerator": "cpu", "devices": 2})) == torch.device("cpu")
    assert run_device(None) == torch.device("cpu")
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")


def test_full_precision_turns_tf32_off_and_restores_it():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with full_precision():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class FinetuneCfg:
    momentum, weight_decay, kd_temperature, kd_weight = 0.9, 0.0, 2.0, 1.0


class DeviceData:
    """A datamodule offering device batches, as ImageDataModule does on a GPU."""

    num_classes = 10

    def __init__(self):
        split = ImageSplit(torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8), torch.arange(32) % 10)
        self.batches = DeviceBatches(split, (0.5,) * 3, (0.25,) * 3, batch_size=8, augment=True)
        self.asked = []

    def train_batches(self, device):
        self.asked.append(device)
        return self.batches


def test_auto_precision_is_bf16_mixed_exactly_where_the_device_has_bf16_instructions():
    flags = open("/proc/cpuinfo").read()
    cpu_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    auto = {"accelerator": "cpu", "devices": 1, "precision": "auto"}
    assert lightning_precision(OmegaConf.create(auto)) == ("bf16-mixed" if cpu_bf16 else "32-true")
    assert lightning_precision(OmegaConf.create({**auto, "accelerator": "gpu"})) == "bf16-mixed"
    assert lightning_precision(OmegaConf.create({**auto, "precision": "32-true"})) == "32-true"
    assert OmegaConf.load(REPO / "conf/trainer/cpu.yaml").precision == "auto"


def test_channels_last_scores_pick_what_the_contiguous_layout_picks(one_thread):
    original = load_model(zoo_checkpoint("resnet20", "cifar10")).eval()
    x, y = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(48) % 10
    records = {}
    for layout in ("contiguous", "channels_last"):
        model, teacher, calib = copy.deepcopy(original), copy.deepcopy(original), x
        if layout == "channels_last":
            fast_layout(model), fast_layout(teacher)
            calib = fast_layout(x)
            assert calib.is_contiguous(memory_format=torch.channels_last)
            assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(calib), original(x), rtol=1e-5, atol=1e-5)
        wrap_model(model)
        pruner = build_pruner(model, teacher, calib, y, criterion="hbgts", signal="features", step=5)
        records[layout] = [pruner.run_round() for _ in range(3)]
    plain, fast = records["contiguous"], records["channels_last"]
    assert [(r.layer, r.side) for r in fast] == [(r.layer, r.side) for r in plain]
    for a, b in zip(fast, plain):
        assert a.scores.keys() == b.scores.keys()
        for key in a.scores:
            assert a.scores[key] == pytest.approx(b.scores[key], rel=1e-4)


def test_a_mixed_precision_finetune_keeps_float32_weights_on_their_device(one_thread):
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 10)).eval()
    model = copy.deepcopy(teacher)
    model[0] = AdaptedConv.wrap(model[0])  # with 1×1 adapters, which autocast must leave float32
    data = DeviceData()
    steps = finetune(model, data, teacher, FinetuneCfg, steps=2, lr=0.01,
                     trainer_cfg=OmegaConf.create({"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"}))
    assert steps == 2 and data.asked == [torch.device("cpu")]
    assert float_dtypes(model) == float_dtypes(teacher) == {torch.float32}
    assert module_device(model) == module_device(teacher) == torch.device("cpu")


# -- on a GPU (`pytest -m gpu`; skipped where there is none) --------------------------------------

def zoo_hbgts_rounds(device: torch.device, cifar10, rounds: int = 4):
    from hbgs.checkpoint import load_model

    original = load_model(zoo_checkpoint("resnet20", "cifar10"), map_location=device).requires_grad_(False)
    model = copy.deepcopy(original)
    wrap_model(model)
    x, y = cifar10.calibration_batch(256)
    pruner = build_pruner(model, original, x.to(device), y.to(device), criterion="hbgts", step=5)
    return [pruner.run_round("params", 50) for _ in range(rounds)]


@pytest.mark.gpu
def test_cuda_scores_pick_what_the_cpu_picks(cifar10):
    cpu = zoo_hbgts_rounds(torch.device("cpu"), cifar10)
    cuda = zoo_hbgts_rounds(run_device(OmegaConf.create({"accelerator": "gpu", "devices": 1})), cifar10)
    assert [(r.layer, r.side) for r in cuda] == [(r.layer, r.side) for r in cpu]
    for on_cpu, on_cuda in zip(cpu, cuda):
        assert on_cuda.scores.keys() == on_cpu.scores.keys()
        for key, score in on_cpu.scores.items():
            assert on_cuda.scores[key] == pytest.approx(score, rel=1e-4), key


@pytest.mark.gpu
def test_a_prune_run_with_short_finetunes_stays_on_the_gpu(tmp_path):
    out = hbgs_run("stage=prune", "trainer=gpu", "logger=csv", f"hydra.run.dir={tmp_path}", "dataset.calib_size=100",
                   "dataset.limit_train=512", "dataset.limit_test=200", "criterion.target.params=3",
                   "criterion.calib_batch=64", "finetune.every=1", "finetune.steps=3", "finetune.final_epochs=1",
                   "finetune.bn_recalibrate=64", "latency.repeats=2", "trainer.enable_progress_bar=false", cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "cuda:0" and summary["details"]["rounds"] >= 2
    assert "cuda" in summary["latency_cpu"]


# -- DDP -----------------------------------------------------------------------------------------

def test_ddp_training_writes_its_results_from_rank_0_only(tmp_path):
    """Every rank trains and tests (Lightning relaunches the command per rank); rank 0 alone
    writes model.pt and summary.json. About 20 s here: two processes on the CPU."""
    out = hbgs_run("stage=train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1",
                   "dataset.limit_train=256", "dataset.limit_test=256", "logger=none",
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    logs = {path.name: path.read_text() for path in tmp_path.glob("*.log")}
    assert len(logs) == 2, sorted(logs)  # run.log (rank 0) and the other rank's
    assert "summary written" in logs["run.log"]
    assert sum(text.count("summary written") for text in logs.values()) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_images"] == 256 and (tmp_path / "model.pt").is_file()
