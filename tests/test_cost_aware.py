"""The cost-aware upper level (criterion.score=error_per_cost) and BatchNorm recalibration."""
import copy
import json
import math

import pytest
import torch

from hbgs import load_model
from hbgs.finetune import recalibrate_batchnorm
from hbgs.pruning import apply, propose
from hbgs.pruning.costs import (LayerLatencies, ReferenceCosts, as_saved, layer_key, saved_cost, time_layer,
                                timed_layers)
from hbgs.pruning.hierarchical import HierarchicalPruner, channels_to_remove, per_cost
from hbgs.pruning.removal import RemovalPruner, removed_channels
from hbgs.pruning.surgery import ChannelSurgery, input_grams

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


# -- criterion.score=error_per_latency: the measured-latency table ----------------------------

def planted_timer(layer, input_shape, layout):
    """Seconds that do not follow MACs (narrow outputs use the vector units less, so they cost
    more per MAC), so the latency score can choose differently from the FLOPs one;
    deterministic, so a brute force can recompute it."""
    if isinstance(layer, torch.nn.Linear):
        return 1e-9 * layer.in_features * layer.out_features * (1 + 8 / layer.out_features)
    pixels = input_shape[2] * input_shape[3] // (layer.stride[0] * layer.stride[1])
    macs = layer.in_channels * layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1] * pixels
    return 1e-9 * macs * (1 + 8 / layer.out_channels)


def planted_seconds(net, input_size=(3, 8, 8)):
    """The brute force: every conv and linear layer of ``net`` found by running it, its planted
    seconds at batch 64 summed."""
    total = []
    hooks = [m.register_forward_pre_hook(
                 lambda m, a: total.append(planted_timer(m, (64, *a[0].shape[1:]), None)))
             for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net.eval()(torch.zeros(1, *input_size))
    for hook in hooks:
        hook.remove()
    return sum(total)


@pytest.mark.parametrize("surgery", ["adapters", "remove"])
def test_error_per_latency_scores_equal_a_brute_force_computation(surgery):
    """After a first round, every candidate's score recomputed from scratch: the candidate
    applied to a copy, its logits' error increase over the current network's, divided by the
    drop of the saved network's planted latency as a fraction of the original network's."""
    torch.manual_seed(0)
    original = randomised(PlainNet())
    x = torch.randn(32, 3, 8, 8)
    if surgery == "adapters":
        model = wrapped(original)
        pruner = HierarchicalPruner(model, original, x, None, criterion="hbgts", signal="logits",
                                    step=4, score="error_per_latency", input_size=(3, 8, 8))
    else:
        model = copy.deepcopy(original)
        pruner = RemovalPruner(model, original, x, None, criterion="hbgts", signal="logits",
                               step=4, score="error_per_latency", input_size=(3, 8, 8))
    pruner.latencies = LayerLatencies(original, (3, 8, 8), timer=planted_timer)
    pruner.run_round("flops", 90.0)
    before = copy.deepcopy(model)
    record = pruner.run_round("flops", 90.0)
    with torch.no_grad():
        target = original(x).double()

    def error(net):
        with torch.no_grad():
            return float((net.eval()(x).double() - target).norm() / target.norm())

    def latency(net):
        return planted_seconds(as_saved(net) if surgery == "adapters" else net) / planted_seconds(original)

    current = error(before)
    assert len(record.scores) >= 3
    expected = {}
    for key in record.scores:
        name, side = key.split(":")
        candidate = copy.deepcopy(before)
        if surgery == "adapters":
            layer = candidate.get_submodule(name)
            width = layer.conv.out_channels if side == "out" else layer.conv.in_channels
            apply(layer, side, propose(layer, side, channels_to_remove(width, 4), "backward"))
        else:
            surgery_ = ChannelSurgery(candidate, x[:1])
            group = next(g for g in surgery_.groups() if g.root == name)
            keep = surgery_.propose(group, channels_to_remove(group.width, 4), "backward").keep
            surgery_.remove(name, removed_channels(group, keep), grams=input_grams(candidate, x, group.consumers))
        saved = latency(before) - latency(candidate)
        expected[key] = max(error(candidate) - current, 0.0) / saved if saved > 0 else math.inf
    if surgery == "adapters":  # an out-side step adds a 1×1 adapter: some steps cost time
        assert 0 < sum(math.isinf(v) for v in expected.values()) < len(expected)
    for key, score in record.scores.items():
        assert score == pytest.approx(expected[key], rel=1e-5, abs=1e-10), key
    assert record.saved > 0


def test_layer_latencies_time_each_shape_once_and_a_restored_table_makes_the_same_choices():
    """Each layer shape is timed once. Timings taken before a stop are noise; after it, shapes
    met for the first time get the deterministic planted timer. A pruner restored from
    ``state()`` keeps the noise it had timed, so its next round equals the uninterrupted
    pruner's exactly; one that re-times (no restore) scores differently."""
    generator = torch.Generator().manual_seed(0)
    calls, stopped = [], []

    def timer(layer, input_shape, layout):
        calls.append((repr(layer), input_shape))
        if stopped:
            return planted_timer(layer, input_shape, layout)
        return float(torch.rand((), generator=generator)) * 1e-3

    torch.manual_seed(0)
    original = randomised(PlainNet())
    x = torch.randn(32, 3, 8, 8)

    def pruner(model):
        p = RemovalPruner(model, original, x, None, criterion="hbgts", signal="logits", step=2,
                          score="error_per_latency", input_size=(3, 8, 8))
        p.latencies = LayerLatencies(original, (3, 8, 8), timer=timer)
        return p

    first = pruner(copy.deepcopy(original))
    assert len(calls) == len(set(calls)) == len(first.latencies.table) == 4  # stem; a; b and c alike; fc
    for _ in range(3):
        first.run_round("flops", 90.0)
    assert len(calls) == len(set(calls)) == len(first.latencies.table)  # never a shape twice
    state = json.loads(json.dumps(first.state()))  # as a resumable run stores it
    model = copy.deepcopy(first.model)
    stopped.append(True)
    following = first.run_round("flops", 90.0)
    resumed, fresh = pruner(copy.deepcopy(model)), pruner(copy.deepcopy(model))
    resumed.restore(state)
    fresh.restore({"rounds": state["rounds"], "end_kept": state["end_kept"]})  # timings not kept
    again, other = resumed.run_round("flops", 90.0), fresh.run_round("flops", 90.0)
    assert again.scores == following.scores and again.saved == following.saved
    assert other.scores != following.scores


def test_error_per_latency_with_measured_timings_reaches_its_target(cifar10):
    """The real timer on the zoo ResNet-20 (channels removed): the target is reached; each
    round's choice saves measured time unless no candidate did (then the plain errors decide,
    and the score is the error); every shape was timed once; the table's original latency is the
    sum of the dense network's layer timings. (What the timings are is not asserted: they
    depend on the machine and its load.)"""
    x, y = cifar10.calibration_batch(64)
    original = load_model(REPO / "zoo" / "resnet20-cifar10.pt").requires_grad_(False)
    pruner = RemovalPruner(copy.deepcopy(original), original, x, y, step=0.25,
                           score="error_per_latency")
    timed_before = len(pruner.latencies.table)
    calls = []

    def counting_timer(layer, input_shape, layout):
        calls.append(layer_key(layer, input_shape[1:], layout))
        return time_layer(layer, input_shape, layout)

    pruner.latencies.timer = counting_timer
    records = pruner.run(target_flops=10)
    assert records[-1].flops_reduction >= 10
    assert all((r.saved > 0 and 0 <= r.score < math.inf) or r.score == r.error for r in records)
    table = pruner.latencies.table
    assert len(calls) == len(set(calls)) == len(table) - timed_before > 0
    assert all(seconds > 0 for seconds in table.values())
    dense = [table[layer_key(*seen)] for seen in timed_layers(original, (3, 32, 32))]
    assert timed_before == 7 and len(dense) == 20  # ResNet-20: 7 distinct shapes among 20 layers
    assert pruner.latencies.original == pytest.approx(sum(dense), rel=1e-12)
