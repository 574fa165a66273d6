"""surgery=remove: channels leave the network for real (hbgs.pruning.surgery / removal)."""
import copy

import pytest
import torch
import torchvision
from torch import nn

from hbgs import load_model, save_model
from hbgs.accounting import count_macs, count_params
from hbgs.errors import HbgsError
from hbgs.models import resnet18, resnet56, resnext29_2x32d, vgg16
from hbgs.pruning.acra import uniform_allocation
from hbgs.pruning.compensation import propose
from hbgs.pruning.removal import RemovalPruner, removed_channels
from hbgs.pruning.surgery import ChannelSurgery

from conftest import QUICK, REPO, hbgs_run

ZOO_RESNET20 = REPO / "zoo" / "resnet20-cifar10.pt"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _linear_path_net() -> nn.Module:
    """conv → conv (no bias, no nonlinearity between: a linear path) → pool → classifier."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                        nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():  # filter 5 is an exact linear combination of filters 1 and 2
        net[0].weight[5] = 0.7 * net[0].weight[1] - 1.3 * net[0].weight[2]
    return net.eval()


def test_removing_a_planted_dependent_channel_leaves_outputs_unchanged():
    net = _linear_path_net()
    x = torch.randn(16, 3, 12, 12)
    before = net(x)
    surgery = ChannelSurgery(net, x[:1])
    group = next(g for g in surgery.groups() if g.root == "0")
    assert group.consumers == ("1",) and group.width == 8
    selection = surgery.propose(group, 1, "backward")
    removed = removed_channels(group, selection.keep)
    assert removed[0] in (1, 2, 5)  # any one of the three dependent filters costs nothing

    plain, _ = surgery.removed_copy("0", removed)  # negative control: no compensation
    assert _relative(plain(x), before) > 1e-2

    surgery.remove("0", removed, x)
    assert net[0].out_channels == 7 and net[1].in_channels == 7
    assert _relative(net(x), before) < 1e-5


def test_compensation_is_the_least_squares_fit_of_the_removed_inputs():
    """Brute force: the compensated consumer equals the original consumer applied to the
    removed channels' least-squares reconstruction from the kept ones."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.Flatten(),
                        nn.Linear(5 * 8 * 8, 3)).eval()
    x = torch.randn(32, 3, 8, 8)
    hidden = net[1](net[0](x)).double()
    removed, kept = [0, 4], [1, 2, 3, 5]
    flat = hidden.transpose(0, 1).flatten(1)  # channels × pixels
    fit = torch.linalg.lstsq(flat[kept].T, flat[removed].T).solution.T  # removed × kept
    reconstructed = hidden.clone()
    reconstructed[:, removed] = torch.einsum("rk,nkhw->nrhw", fit, hidden[:, kept])
    expected = nn.functional.conv2d(reconstructed, net[2].weight.double(), padding=1)

    surgery = ChannelSurgery(net, x[:1])
    surgery.remove("0", removed, x)
    got = net[2](net[1](net[0](x)))
    assert _relative(got.double(), expected) < 1e-5


MODELS = {
    "resnet20-zoo": lambda: load_model(ZOO_RESNET20),
    "resnet56": lambda: resnet56(),
    "vgg16": lambda: vgg16(),
    "resnet18": lambda: resnet18(),
    "resnext29_2x32d": lambda: resnext29_2x32d(),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_coupled_channels_stay_consistent_when_every_group_loses_a_quarter(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(4, 3, 32, 32)
    params, macs = count_params(model), count_macs(model)
    surgery = ChannelSurgery(model, x[:1])
    groups = surgery.groups()
    assert groups
    for group in groups:
        n_remove = max(group.groups, group.width // 4 // group.groups * group.groups)
        selection = surgery.propose(group, n_remove, "backward")
        keep = selection.keep.tolist()
        per_block = group.width // group.groups
        assert len({k // per_block for k in keep}) == group.groups  # every block keeps some
        assert [sum(k // per_block == b for k in keep) for b in range(group.groups)] == \
            [per_block - n_remove // group.groups] * group.groups  # the same count in each
        surgery.remove(group.root, removed_channels(group, selection.keep), x)
    with torch.no_grad():
        assert model(x).shape == (4, 10)  # runs: every addition and concatenation still matches
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean.numel() == module.num_features == module.weight.numel()
    assert count_params(model) < 0.9 * params and count_macs(model) < 0.9 * macs


def test_option_a_shortcut_streams_are_not_offered():
    """The zoo ResNets' zero-padding shortcuts pad by a fixed count that Torch-Pruning cannot
    resize: their residual streams are left out, every block's inner channels are offered."""
    model = load_model(ZOO_RESNET20)
    roots = [g.root for g in ChannelSurgery(model, torch.zeros(1, 3, 32, 32)).groups()]
    assert roots == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]


@pytest.fixture(scope="module")
def calibration(cifar10):
    return cifar10.calibration_batch(64)


def test_hbgts_remove_scores_equal_an_independent_computation(calibration):
    """Every candidate's score (logits) recomputed from scratch: a fresh copy of the network,
    the selector on the root's filters, the group cut through a newly traced graph and
    compensated on the calibration batch, the relative error against the original logits."""
    x, y = calibration
    original = load_model(ZOO_RESNET20).requires_grad_(False)
    model = copy.deepcopy(original)
    pruner = RemovalPruner(model, original, x, y, criterion="hbgts", signal="logits", step=0.25)
    first = pruner.run_round()
    record = pruner.run_round()  # the second round scores on an already pruned network
    assert record.layer != first.layer or record.width_before < 16
    with torch.no_grad():
        reference = original(x)
    for key, score in record.scores.items():
        root = key.split(":")[0]
        copy_before = copy.deepcopy(original)
        first_selection = propose(copy_before.get_submodule(first.layer), "out",
                                  first.width_before - first.width_after, "backward")
        width = copy_before.get_submodule(first.layer).out_channels
        ChannelSurgery(copy_before, x[:1]).remove(
            first.layer, sorted(set(range(width)) - set(first_selection.keep.tolist())), x)
        conv = copy_before.get_submodule(root)
        n_remove = max(1, int(0.25 * conv.out_channels + 0.5))
        selection = propose(conv, "out", n_remove, "backward")
        ChannelSurgery(copy_before, x[:1]).remove(
            root, sorted(set(range(conv.out_channels)) - set(selection.keep.tolist())), x)
        with torch.no_grad():
            copy_before.eval()
            expected = _relative(copy_before(x).double(), reference.double())
        assert score == pytest.approx(expected, rel=1e-6, abs=1e-9), key


def test_hbgts_remove_reaches_the_flops_target_with_real_channels(calibration):
    x, y = calibration
    original = load_model(ZOO_RESNET20).requires_grad_(False)
    model = copy.deepcopy(original)
    records = RemovalPruner(model, original, x, y, step=0.25).run(target_flops=15)
    assert records[-1].target_met and records[-1].flops_reduction >= 15
    assert count_macs(model) == records[-1].flops <= 0.85 * count_macs(original)
    assert count_params(model) == records[-1].params
    assert not any(type(m).__name__ == "AdaptedConv" for m in model.modules())


def test_uniform_allocation_with_surgery_meets_its_target(calibration):
    x, _ = calibration
    original = load_model(ZOO_RESNET20).requires_grad_(False)
    result = uniform_allocation(copy.deepcopy(original), original, target_flops=30, tolerance=2,
                                method="l2", surgery="remove", calib_x=x)
    assert 30 <= result.reduction <= 32
    assert count_macs(result.model) == result.cost.flops
    with pytest.raises(HbgsError, match="calib_x"):
        uniform_allocation(copy.deepcopy(original), original, target_flops=30, surgery="remove")


def test_removed_model_round_trips_through_the_model_file(tmp_path, calibration):
    x, _ = calibration
    model = load_model(ZOO_RESNET20)
    surgery = ChannelSurgery(model, x[:1])
    for group in surgery.groups()[::2]:
        selection = surgery.propose(group, group.width // 2, "backward")
        surgery.remove(group.root, removed_channels(group, selection.keep), x)
    path = save_model(model, tmp_path / "model.pt",
                      model_cfg={"_target_": "hbgs.models.resnet20", "num_classes": 10})
    loaded = load_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert loaded.layer1[0].conv1.out_channels == 8


def test_cli_rejects_an_unknown_surgery_before_loading_anything():
    out = hbgs_run("surgery=cut", *QUICK)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "surgery='cut'" in text and "surgery=remove" in text
    assert "Traceback" not in text


def test_prune_stage_with_surgery_remove_saves_a_smaller_model_that_scores_as_reported(tmp_path,
                                                                                         cifar10):
    out = hbgs_run("stage=prune", "surgery=remove", "criterion=hbgts", "criterion.signal=logits",
                   "criterion.target.params=null", "criterion.target.flops=10",
                   "criterion.step=0.25", "criterion.calib_batch=64", "finetune.every=1",
                   "finetune.steps=1", "finetune.final_epochs=0", "dataset.limit_train=128",
                   "latency.repeats=2", f"hydra.run.dir={tmp_path}", *QUICK)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["surgery"] == "remove"
    assert summary["cost"]["reduction_vs_original_pct"]["flops"] >= 10
    model = load_model(tmp_path / "model.pt")
    assert count_macs(model) == summary["cost"]["pruned"]["flops"]
    assert not any(type(m).__name__ == "AdaptedConv" for m in model.modules())
    narrowed = [name for name, w in summary["widths"].items() if w["out_current"] < w["out_original"]]
    assert narrowed and all(model.get_submodule(n).out_channels == summary["widths"][n]["out_current"]
                            for n in narrowed)
    exported = load_model(tmp_path / "model_exported.pt")  # BatchNorms folded into the narrowed convs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in exported.modules())
    images, _ = cifar10.calibration_batch(32)
    with torch.no_grad():
        assert _relative(exported(images), model(images)) < 1e-4


@pytest.mark.parametrize("method", ["backward", "omp", "l1", "l2", "random"])
def test_every_selector_removes_channels_and_compensation_helps(method, calibration):
    x, _ = calibration
    model = load_model(ZOO_RESNET20)
    with torch.no_grad():
        reference = model(x)
    surgery = ChannelSurgery(model, x[:1])
    group = next(g for g in surgery.groups() if g.root == "layer2.0.conv1")
    removed = removed_channels(group, surgery.propose(group, 16, method, seed=3).keep)
    assert len(removed) == 16
    compensated, _ = surgery.removed_copy(group.root, removed, x)
    plain, _ = surgery.removed_copy(group.root, removed)
    with torch.no_grad():
        assert compensated.layer2[0].conv2.in_channels == 16
        assert _relative(compensated(x), reference) < _relative(plain(x), reference)


def test_hbgs_remove_scores_the_consumers_against_the_current_network(calibration):
    x, y = calibration
    original = load_model(ZOO_RESNET20).requires_grad_(False)
    model = copy.deepcopy(original)
    record = RemovalPruner(model, original, x, y, criterion="hbgs", step=0.5).run_round()
    for key, score in record.scores.items():
        root = key.split(":")[0]
        consumer = root.replace("conv1", "conv2")  # a block's inner channels feed its conv2
        candidate = copy.deepcopy(original)
        conv = candidate.get_submodule(root)
        selection = propose(conv, "out", conv.out_channels // 2, "backward")
        ChannelSurgery(candidate, x[:1]).remove(
            root, sorted(set(range(conv.out_channels)) - set(selection.keep.tolist())), x)
        outputs = []
        for net in (candidate, original):
            hook_out = {}
            handle = net.get_submodule(consumer).register_forward_hook(
                lambda m, a, out: hook_out.setdefault("y", out))
            with torch.no_grad():
                net.eval()(x)
            handle.remove()
            outputs.append(hook_out["y"].double())
        assert score == pytest.approx(_relative(*outputs), rel=1e-6), key


def test_linear_layers_are_prunable_and_compensated_exactly_on_a_linear_path():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 12),
                        nn.Linear(12, 5)).eval()  # hidden Linear → classifier: a linear path
    with torch.no_grad():  # hidden unit 7 is an exact combination of units 0 and 3 (bias too)
        net[3].weight[7] = 2.0 * net[3].weight[0] - 0.5 * net[3].weight[3]
        net[3].bias[7] = 2.0 * net[3].bias[0] - 0.5 * net[3].bias[3]
    x = torch.randn(40, 3, 8, 8)
    before = net(x)
    surgery = ChannelSurgery(net, x[:1])
    roots = [g.root for g in surgery.groups()]
    assert roots == ["0", "3"]  # the conv and the hidden Linear; never the classifier's outputs
    surgery.remove("3", [7], x)
    assert net[3].out_features == 11 and net[4].in_features == 11
    assert _relative(net(x), before) < 1e-5


def test_depthwise_and_pointwise_convs_are_offered_with_surgery_and_explained_without():
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    wrapped_model = copy.deepcopy(model)
    from hbgs.pruning import wrap_model, wrapped_layers

    wrap_model(wrapped_model)
    with pytest.raises(HbgsError, match="surgery='remove'"):
        wrapped_layers(wrapped_model)  # no spatial conv with ≥ 2 channels per group
    groups = ChannelSurgery(model, torch.randn(1, 3, 32, 32)).groups()
    kinds = {(m.kernel_size, m.groups == m.in_channels)
             for g in groups for name in g.members
             if isinstance(m := model.get_submodule(name), nn.Conv2d)}
    assert ((1, 1), False) in kinds and ((3, 3), True) in kinds  # pointwise and depthwise
