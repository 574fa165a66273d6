"""The cost-aware upper level (criterion.score=error_per_cost) and BatchNorm recalibration."""
import copy
import math

import pytest
import torch

from hbgs import load_model
from hbgs.finetune import recalibrate_batchnorm
from hbgs.pruning import apply, propose
from hbgs.pruning.costs import ReferenceCosts, saved_cost
from hbgs.pruning.hierarchical import HierarchicalPruner, channels_to_remove, per_cost
from hbgs.pruning.removal import RemovalPruner

from conftest import REPO
from helpers import PlainNet, randomised, wrapped


def test_per_cost_prefers_the_step_that_saves_more_at_equal_error():
    scores = per_cost([0.3, 0.3, 0.3], [0.1, 0.1, 0.1], [0.02, 0.05, 0.0])
    assert scores[1] < scores[0] and scores[0] == pytest.approx(0.2 / 0.02)
    assert scores[2] == math.inf  # saving nothing is never preferred
    assert per_cost([0.2, 0.1], [0.0, 0.0], [0.0, -0.01]) == [0.2, 0.1]  # nothing saves: errors decide
    assert per_cost([0.05], [0.1], [0.01]) == [0.0]  # an error below the current one adds nothing


@pytest.mark.parametrize("metric", ["params", "flops"])
def test_error_per_cost_scores_equal_a_brute_force_computation(metric):
    """After a first round, every candidate's score recomputed from scratch: the candidate
    applied to a copy, its logits' relative error against the original network's minus the
    current network's, divided by the drop of the whole saved network's params or FLOPs."""
    torch.manual_seed(0)
    original = randomised(PlainNet())
    model = wrapped(original)
    x = torch.randn(32, 3, 8, 8)
    pruner = HierarchicalPruner(model, original, x, None, criterion="hbgts", signal="logits",
                                step=4, score="error_per_cost", input_size=(3, 8, 8))
    pruner.run_round(metric, 90.0)
    before = copy.deepcopy(model)
    record = pruner.run_round(metric, 90.0)
    reference = ReferenceCosts.measure(original, (3, 8, 8))
    with torch.no_grad():
        target = original(x).double()

        def error(net):
            return float((net.eval()(x).double() - target).norm() / target.norm())

        def cost(net):
            value = getattr(saved_cost(net, reference), metric)
            return value / (reference.params_original if metric == "params" else reference.flops_original)

        current = error(before)
        for key, score in record.scores.items():
            name, side = key.split(":")
            candidate = copy.deepcopy(before)
            layer = candidate.get_submodule(name)
            width = layer.conv.out_channels if side == "out" else layer.conv.in_channels
            apply(layer, side, propose(layer, side, channels_to_remove(width, 4), "backward"))
            saved = cost(before) - cost(candidate)
            expected = max(error(candidate) - current, 0.0) / saved if saved > 0 else math.inf
            assert score == pytest.approx(expected, rel=1e-6, abs=1e-12), key
    assert record.saved > 0 and record.error is not None


def test_error_per_cost_with_surgery_reaches_its_target(cifar10):
    x, y = cifar10.calibration_batch(64)
    original = load_model(REPO / "zoo" / "resnet20-cifar10.pt").requires_grad_(False)
    model = copy.deepcopy(original)
    records = RemovalPruner(model, original, x, y, step=0.25,
                            score="error_per_cost").run(target_flops=10)
    assert records[-1].flops_reduction >= 10
    assert all(r.saved > 0 for r in records)
    # the score is the error's increase per fraction of FLOPs saved: finite and ≥ 0
    assert all(0 <= r.score < math.inf for r in records)


def test_batchnorm_recalibration_changes_only_running_statistics():
    torch.manual_seed(0)
    model = randomised(PlainNet())
    before = copy.deepcopy(model)
    images = torch.randn(24, 3, 8, 8)
    inputs = {}
    handles = [bn.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, a[0]))
               for i, bn in enumerate(model.bns)]
    assert recalibrate_batchnorm(model, images, chunk_size=24) == 4
    for handle in handles:
        handle.remove()
    assert not model.training and all(not m.training for m in model.modules())
    for (name, tensor), (_, old) in zip(model.state_dict().items(), before.state_dict().items()):
        if name.endswith(("running_mean", "running_var")):
            continue
        assert torch.equal(tensor, old), name  # weights, biases, num_batches_tracked
    for i, bn in enumerate(model.bns):
        seen = inputs[i].transpose(0, 1).flatten(1)  # channels × (images·pixels)
        assert torch.allclose(bn.running_mean, seen.mean(1), atol=1e-5)
        assert torch.allclose(bn.running_var, seen.var(1, unbiased=True), rtol=1e-4)
        assert bn.momentum == before.bns[i].momentum
    assert not torch.equal(model.bns[1].running_mean, before.bns[1].running_mean)


def test_batchnorm_recalibration_averages_over_chunks():
    torch.manual_seed(1)
    model = randomised(PlainNet())
    images = torch.randn(24, 3, 8, 8)
    whole, chunked = copy.deepcopy(model), copy.deepcopy(model)
    recalibrate_batchnorm(whole, images, chunk_size=24)
    recalibrate_batchnorm(chunked, images, chunk_size=8)
    # The first BatchNorm reads the same values either way: equal-sized chunks average to the
    # whole batch's mean. (Later ones read activations normalised with each chunk's own
    # statistics, as in training, so they differ slightly.)
    assert torch.allclose(whole.bns[0].running_mean, chunked.bns[0].running_mean, atol=1e-6)
    assert not torch.equal(whole.bns[0].running_mean, model.bns[0].running_mean)
