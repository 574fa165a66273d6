"""hbgs.export (inference export), the checkpoint format's changed leaves, measure_latencies.

No timing assertions: which merges and which layout win depends on the machine; what must hold
everywhere is that the exported model computes the same function and round-trips through a file.
"""
import copy

import pytest
import torch
from torch import nn

import hbgs
from hbgs.accounting import measure_latencies
from hbgs.checkpoint import CheckpointError, is_channels_last, load_meta, load_model, save_model
from hbgs.errors import HbgsError
from hbgs.export import VARIANTS, fold_batchnorms, merge_variants
from hbgs.models import resnet20
from hbgs.pruning import AdaptedConv, fold_identity_adapters, prune_conv, wrap_model
from hbgs.pruning.ratios import prune_uniform_fraction

RESNET20 = {"_target_": "hbgs.models.resnet20", "num_classes": 10}
FAST = {"batch_size": 8, "threads": 1, "repeats": 2}  # timings only decide, nothing asserts on them


@pytest.fixture(scope="module")
def images(cifar10):
    """256 real, normalised CIFAR-10 test images."""
    x, _ = next(iter(torch.utils.data.DataLoader(cifar10.dataset("test", augment=False), batch_size=256)))
    return x


@pytest.fixture(scope="module")
def zoo():
    return hbgs.load_model("zoo/resnet20-cifar10.pt")


@pytest.fixture(scope="module")
def pruned(zoo):
    """The zoo ResNet-20 with half the channels of every wrapped conv removed (FP-Backward)."""
    model = copy.deepcopy(zoo)
    wrap_model(model)
    prune_uniform_fraction(model, 0.5, "backward")
    fold_identity_adapters(model)
    return model.eval()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def count(model, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@torch.no_grad()
def test_export_computes_the_pruned_function_on_real_images(pruned, images):
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    pruned.train()  # the input's mode must survive too
    exported, report = hbgs.export(pruned, example_input=images[:8], report=True, **FAST)
    pruned.eval()
    assert not exported.training and not any(p.requires_grad for p in exported.parameters())
    assert relative_difference(exported(images), pruned(images)) < 1e-4
    assert report.max_relative_difference < 1e-4
    # Every BatchNorm of ResNet-20 follows a conv: all folded, none left.
    assert count(exported, nn.BatchNorm2d) == 0 and len(report.batchnorms_folded) == 19
    assert report.batchnorms_kept == {}
    assert report.batchnorms_folded["bn1"] == "conv1"
    # a pruned layer's BatchNorm went into its out-adapter, or into the conv the adapter merged into
    assert report.batchnorms_folded["layer1.0.bn1"] == "layer1.0.conv1.out_adapter"
    # every pruned layer was decided, by timing every applicable variant
    assert [m.layer for m in report.merges] == [n for n, m in pruned.named_modules() if isinstance(m, AdaptedConv)]
    assert all(set(m.times_ms) == set(VARIANTS) and m.choice in VARIANTS for m in report.merges)
    assert all(m.input_shape[0] == 8 for m in report.merges)
    assert set(report.layout_ms) == {"contiguous", "channels_last"}
    assert is_channels_last(exported) == report.channels_last
    # the input model is untouched
    assert count(pruned, nn.BatchNorm2d) == 19
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())


@torch.no_grad()
def test_every_merge_variant_computes_the_same_layer():
    torch.manual_seed(0)
    model = resnet20()
    wrap_model(model)
    prune_conv(model, "layer2.1.conv1", "out", 12)
    prune_conv(model, "layer2.1.conv1", "in", 10)
    layer = model.get_submodule("layer2.1.conv1")
    with torch.no_grad():  # a bias everywhere it can be, so that the bias algebra is exercised
        layer.conv.bias = nn.Parameter(torch.randn(layer.conv.out_channels))
        layer.out_adapter.bias.normal_()
    variants = merge_variants(layer)
    assert set(variants) == set(VARIANTS)
    assert isinstance(variants["merge_both"], nn.Conv2d) and variants["merge_both"].in_channels == 32
    x = torch.randn(4, 32, 16, 16)
    for name, variant in variants.items():
        assert relative_difference(variant(x), layer(x)) < 1e-5, name


@torch.no_grad()
def test_batchnorm_folding_is_exact_on_the_plain_zoo_model(zoo, images):
    model = copy.deepcopy(zoo)
    folded, kept, warning = fold_batchnorms(model)
    assert warning is None and kept == {} and len(folded) == 19
    assert folded["layer3.2.bn2"] == "layer3.2.conv2"
    assert count(model, nn.BatchNorm2d) == 0 and model.layer3[2].conv2.bias is not None
    assert relative_difference(model(images), zoo(images)) < 1e-5
    exported = hbgs.export(zoo, **FAST)  # nothing to merge: folding alone
    assert count(exported, nn.BatchNorm2d) == 0
    assert relative_difference(exported(images), zoo(images)) < 1e-4


class Branchy(nn.Module):
    """A grouped conv + BN (foldable), and a conv whose output is read twice (its BN is not)."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.bn_grouped = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_shared = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.shared(torch.relu(self.bn_grouped(self.grouped(x))))
        return self.bn_shared(y) + y


class Untraceable(Branchy):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        return super().forward(x)


def randomize_batchnorms(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


@torch.no_grad()
def test_folding_covers_grouped_convs_and_keeps_batchnorms_it_cannot_fold():
    model = randomize_batchnorms(Branchy())
    x = torch.randn(2, 4, 8, 8)
    exported, report = hbgs.export(model, example_input=x, report=True, **FAST)
    assert report.batchnorms_folded == {"bn_grouped": "grouped"}
    assert "also read elsewhere" in report.batchnorms_kept["bn_shared"]
    assert isinstance(exported.bn_grouped, nn.Identity) and isinstance(exported.bn_shared, nn.BatchNorm2d)
    assert relative_difference(exported(x), model(x)) < 1e-5


@torch.no_grad()
def test_an_untraceable_model_is_exported_without_folding_and_a_warning():
    model = randomize_batchnorms(Untraceable())
    x = torch.randn(2, 4, 8, 8).abs()
    with pytest.warns(UserWarning, match="BatchNorms not folded: torch.fx cannot trace Untraceable"):
        exported, report = hbgs.export(model, example_input=x, report=True, **FAST)
    assert report.batchnorms_folded == {} and report.warnings
    assert relative_difference(exported(x), model(x)) < 1e-6


@torch.no_grad()
def test_exported_model_round_trips_through_a_model_file(pruned, images, tmp_path):
    exported, report = hbgs.export(pruned, example_input=images[:8], report=True, **FAST)
    path = save_model(exported, tmp_path / "model_exported.pt", model_cfg=RESNET20,
                      meta={"exported": True, "export": report.as_dict()})
    loaded = load_model(path)
    assert torch.equal(loaded(images), exported(images))
    assert is_channels_last(loaded) == report.channels_last
    assert load_meta(path)["export"]["merges"][0]["layer"] == "layer1.0.conv1"
    structure = torch.load(path, weights_only=True)["structure"]
    assert structure["layer1.0.bn1"] == {"kind": "Identity", "args": {}}
    assert structure["conv1"]["args"]["bias"] is True  # the stem conv gained its BatchNorm's bias
    # the layout is restored from the file whatever the timings chose
    exported.to(memory_format=torch.channels_last)
    assert is_channels_last(load_model(save_model(exported, tmp_path / "cl.pt", model_cfg=RESNET20)))


def narrowed_resnet20():
    torch.manual_seed(0)
    model = resnet20()
    model.layer1[0].conv1 = nn.Conv2d(16, 10, 3, 1, 1, bias=False)
    model.layer1[0].bn1 = nn.BatchNorm2d(10)
    model.layer1[0].conv2 = nn.Conv2d(10, 16, 3, 1, 1, bias=False)
    return randomize_batchnorms(model)


@torch.no_grad()
def test_a_structurally_narrowed_model_round_trips_with_its_original_config(tmp_path):
    model = narrowed_resnet20()
    path = save_model(model, tmp_path / "surgery.pt", model_cfg=RESNET20)
    structure = torch.load(path, weights_only=True)["structure"]
    assert set(structure) == {"layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"}
    assert structure["layer1.0.bn1"]["kind"] == "BatchNorm2d"
    assert structure["layer1.0.conv2"]["args"]["in_channels"] == 10
    loaded = load_model(path)
    assert loaded.layer1[0].conv1.out_channels == 10
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    # loading stays strict: weights that do not fit the recorded shapes are refused
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["layer1.0.bn1.weight"] = torch.ones(12)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"layer1.0.bn1.weight: file \(12,\), model \(10,\)"):
        load_model(path)


def test_a_changed_module_of_another_kind_is_refused_with_the_fix(tmp_path):
    model = resnet20()
    model.layer1[0].bn1 = nn.GroupNorm(4, 16)
    with pytest.raises(CheckpointError, match="cannot record the GroupNorm at 'layer1.0.bn1'.*save this "
                                              "model without model_cfg"):
        save_model(model, tmp_path / "model.pt", model_cfg=RESNET20)


def test_measure_latencies_times_every_model_and_leaves_them_as_they_were():
    training, evaluating = resnet20().train(), resnet20().eval()
    training.layer2.eval()  # a submodule in its own mode
    params = [p.data_ptr() for p in training.parameters()]
    threads = torch.get_num_threads()
    result = measure_latencies({"training": training, "eval": evaluating}, batch_sizes=(1, 3),
                               threads=1, warmup=1, repeats=2)
    assert result["threads"] == 1 and result["device"] == "cpu" and result["batch_sizes"] == [1, 3]
    assert set(result["median_ms"]) == {"training", "eval"}
    assert all(set(per) == {"1", "3"} and all(ms > 0 for ms in per.values()) for per in result["median_ms"].values())
    assert training.training and not training.layer2.training and training.layer1.training
    assert not evaluating.training
    assert [p.data_ptr() for p in training.parameters()] == params  # used in place, not moved or copied
    assert all(p.device.type == "cpu" for p in training.parameters())
    assert torch.get_num_threads() == threads


def test_bad_input_names_the_fix():
    with pytest.raises(HbgsError, match="at least one model"):
        measure_latencies({})
    with pytest.raises(HbgsError, match="batch_sizes must be positive integers"):
        measure_latencies({"m": resnet20()}, batch_sizes=(0,))
    with pytest.raises(HbgsError, match="batch_size=0: give the positive batch size"):
        hbgs.export(resnet20(), batch_size=0)
    with pytest.raises(HbgsError, match="example_input must be one input batch"):
        hbgs.export(resnet20(), example_input=torch.randn(3))
