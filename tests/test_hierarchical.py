"""Upper level: HBGS/HBGTS rounds, proposal caching, accounting (docs/algorithms.md §2, §5; the
suffix cache: test_suffix.py). Random weights and inputs; small models so the file runs in seconds
on one core."""
import copy

import pytest
import torch
from torch import nn

from hbgs.accounting import count_macs, count_params
from hbgs.checkpoint import load_model, save_model
from hbgs.errors import HbgsError
from hbgs.models import resnet20
from hbgs.models.resnet_cifar import CifarResNet
from hbgs.pruning import (AdaptedConv, apply, channel_widths, fold_identity_adapters, propose,
                          pruned, with_identity_adapters)
from hbgs.pruning.costs import ReferenceCosts, saved_cost
from hbgs.pruning.hierarchical import (HierarchicalPruner, channels_to_remove,
                                       hierarchical_prune, smallest_reachable_cost,
                                       smallest_width)
from hbgs.pruning.ratios import prune_uniform_fraction
from hbgs.pruning.removal import RemovalPruner, removed_channels
from hbgs.pruning.surgery import ChannelSurgery
from helpers import PlainNet, randomised, same_state, wrapped

RESNET20 = {"_target_": "hbgs.models.resnet20", "num_classes": 10}


def planted_net() -> nn.Module:
    """``PlainNet`` in float64 whose conv ``b`` has 5 filters that are exact linear combinations
    of its other 11: removing them on the out side changes nothing."""
    torch.manual_seed(1)
    model = randomised(PlainNet()).double()
    with torch.no_grad():
        weight = model.b.weight
        weight[11:] = torch.einsum("rk,kchw->rchw", torch.randn(5, 11, dtype=torch.float64),
                                   weight[:11])
    return model


# -- step sizes and reachability -----------------------------------------------------------

def test_step_counts_and_smallest_widths():
    assert channels_to_remove(64, 5) == 5
    assert channels_to_remove(64, 0.1) == 6  # 6.4 rounds to 6
    assert channels_to_remove(10, 0.25) == 3  # 2.5 rounds half up
    assert channels_to_remove(3, 0.1) == 1  # at least one channel
    assert channels_to_remove(64, 5, groups=4) == 8  # whole groups
    assert smallest_width(16, 5, 1, 1) == 1  # 16 → 11 → 6 → 1
    assert smallest_width(16, 5, 1, 2) == 6
    assert smallest_width(32, 0.5, 1, 1) == 1  # 32 → 16 → 8 → 4 → 2 → 1


def test_smallest_reachable_cost_equals_the_network_stepped_down():
    original = randomised(PlainNet())
    model = wrapped(original)
    reference = ReferenceCosts.measure(original)
    predicted = smallest_reachable_cost(model, reference, 5, 2)
    for layer in (model.a, model.b, model.c):  # step every side down with the lower level
        for side in ("out", "in"):
            while getattr(layer.conv, f"{side}_channels") - 5 >= 2:
                apply(layer, side, propose(layer, side, 5, "l2"))
    actual = saved_cost(model, reference)
    assert (predicted.params, predicted.flops) == (actual.params, actual.flops)
    assert [w.out_current for w in channel_widths(model).values()] == [6, 6, 6]


# -- choices ----------------------------------------------------------------------------------

@pytest.mark.parametrize("criterion,signal", [("hbgs", "features"), ("hbgts", "features"),
                                              ("hbgts", "logits")])
def test_planted_redundant_layer_is_chosen_first_with_zero_score(criterion, signal):
    original = planted_net()
    x = torch.randn(32, 3, 16, 16, dtype=torch.float64)
    pruner = HierarchicalPruner(wrapped(original), original, x, None, criterion=criterion,
                                signal=signal, step=5, input_size=(3, 16, 16))
    scored = {(c.layer, c.side): s for c, s in pruner.scored_candidates()}
    assert len(scored) == 6
    planted = scored.pop(("b", "out"))
    assert planted < 1e-6
    assert min(scored.values()) > 1e-3 > planted
    record = pruner.run_round()
    assert (record.layer, record.side, record.width_before, record.width_after) == \
        ("b", "out", 16, 11)
    assert record.score == planted


def test_stops_at_the_first_round_meeting_the_target_and_reports_the_saved_cost(tmp_path):
    torch.manual_seed(0)
    original = randomised(resnet20())
    model = wrapped(original)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def finetune(record, model):  # one SGD step on every parameter, adapters included
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        model.train()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        model.eval()

    records = hierarchical_prune(model, original, x, None, criterion="hbgs", step=0.5,
                                 target_params=4, callbacks=[finetune])
    assert len(records) >= 3 and [r.round for r in records] == list(range(1, len(records) + 1))
    assert records[-1].target_met and records[-1].params_reduction >= 4
    assert not any(r.target_met for r in records[:-1]) and records[-2].params_reduction < 4

    saved = copy.deepcopy(model)
    fold_identity_adapters(saved)
    params, macs = count_params(saved), count_macs(saved)
    last = records[-1]  # counted before the last fine-tuning step, which moved no identity adapter
    assert (last.params, last.flops) == (params, macs)
    assert last.params_reduction == pytest.approx(100 * (1 - params / count_params(original)))
    assert last.flops_reduction == pytest.approx(100 * (1 - macs / count_macs(original)))
    augmented = with_identity_adapters(original)
    assert last.params_reduction_vs_augmented == pytest.approx(
        100 * (1 - params / count_params(augmented)))
    assert last.flops_reduction_vs_augmented > last.flops_reduction  # the flattering figure

    path = save_model(saved, tmp_path / "model.pt", model_cfg=RESNET20)
    loaded = load_model(path)
    assert (count_params(loaded), count_macs(loaded)) == (params, macs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# -- caching across rounds ------------------------------------------------------------------

class Perturb:
    """A stand-in for fine-tuning: after each round change one conv's weights and one
    BatchNorm's running statistics in place, as training does, and replace another BatchNorm."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def on_round_end(self, record, model):
        with torch.no_grad():
            model.layer2[1].conv1.conv.weight.mul_(1.05)
            model.layer1[2].bn1.running_mean.add_(0.05 * torch.randn(8, generator=self.generator))
            model.layer3[0].bn2 = copy.deepcopy(model.layer3[0].bn2)
            model.layer3[0].bn2.bias.add_(0.01)


def test_use_cache_makes_the_same_choices_with_less_work():
    torch.manual_seed(5)
    original = randomised(CifarResNet(20, widths=(8, 16, 32)))
    x = torch.randn(8, 3, 32, 32)
    runs = {}
    for use_cache in (True, False):
        model = wrapped(original)
        runs[use_cache] = hierarchical_prune(
            model, original, x, None, criterion="hbgts", signal="features", step=3,
            target_params=90, max_rounds=4, use_cache=use_cache, callbacks=[Perturb(0)])
    cached, uncached = runs[True], runs[False]
    assert [(r.layer, r.side) for r in cached] == [(r.layer, r.side) for r in uncached]
    for a, b in zip(cached, uncached):
        assert a.scores.keys() == b.scores.keys()
        for key in a.scores:
            assert a.scores[key] == pytest.approx(b.scores[key], rel=1e-5, abs=1e-7)
    work = {k: {f: sum(getattr(r, f) for r in rs) for f in
                ("proposals_computed", "proposals_reused", "nodes_run", "full_forwards")}
            for k, rs in runs.items()}
    candidates = sum(r.candidates for r in cached)
    assert work[False]["proposals_computed"] == candidates
    assert work[False]["proposals_reused"] == 0
    # Rounds 2-4 recompute only the chosen layer and the perturbed conv (two sides each).
    assert cached[0].candidates + 3 * 2 <= work[True]["proposals_computed"] \
        <= cached[0].candidates + 3 * 4
    assert work[True]["full_forwards"] == 1
    assert work[True]["nodes_run"] < 0.6 * work[False]["nodes_run"]


def test_a_callback_changing_a_layer_invalidates_only_its_proposals():
    original = randomised(PlainNet())
    model = wrapped(original)
    x = torch.randn(16, 3, 16, 16)
    pruner = HierarchicalPruner(model, original, x, None, criterion="hbgs", step=2,
                                input_size=(3, 16, 16))
    seen = {}

    def finetune_another_layer(record, model):  # an in-place update, as an optimizer makes
        seen["touched"] = next(n for n in ("a", "b", "c") if n != record.layer)
        seen["untouched"] = next(n for n in ("a", "b", "c")
                                 if n not in (record.layer, seen["touched"]))
        seen["kept"] = {side: pruner.proposals.cached(seen["untouched"], side)
                        for side in ("out", "in")}
        with torch.no_grad():
            model.get_submodule(seen["touched"]).conv.weight.mul_(
                torch.linspace(0.5, 2, 16).view(16, 1, 1, 1))

    pruner.run(target_params=50, max_rounds=1, callbacks=[finetune_another_layer])
    touched, untouched, kept = seen["touched"], seen["untouched"], seen["kept"]
    before = pruner.stats.copy()
    scored = pruner.scored_candidates()
    work = pruner.stats.since(before)
    assert work.proposals_computed == 4  # both sides of the pruned and of the touched layer
    assert work.proposals_reused == len(scored) - 4 == 2
    layer = model.get_submodule(touched)
    for side in ("out", "in"):
        assert pruner.proposals.cached(untouched, side) is kept[side]
        cached, fresh = pruner.proposals.cached(touched, side), propose(layer, side, 2, "backward")
        assert torch.equal(cached.keep, fresh.keep)
        torch.testing.assert_close(cached.coef, fresh.coef)
    # The cached activations were refreshed too: the same scores as computing everything anew.
    anew = HierarchicalPruner(copy.deepcopy(model), original, x, None, criterion="hbgs", step=2,
                              input_size=(3, 16, 16), use_cache=False).scored_candidates()
    assert [(c.layer, c.side) for c, _ in scored] == [(c.layer, c.side) for c, _ in anew]
    for (_, score), (_, expected) in zip(scored, anew):
        assert score == pytest.approx(expected, rel=1e-6)


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(target_params=100), "out of reach"),
    (dict(target_flops=99.9, step=16, min_channels=8), "out of reach"),
    (dict(target_params=0), "greater than 0"),
    (dict(target_flops=-5), "greater than 0"),
    (dict(target_params=1), "already met"),
    (dict(target_params=50, step=64), "leaves no candidate"),
    (dict(target_params=50, target_flops=50), "exactly one target"),
    (dict(), "exactly one target"),
    (dict(target_params=50, criterion="hbgx"), "valid: hbgs, hbgts"),
    (dict(target_params=50, signal="acc"), "valid: features, logits, loss"),
    (dict(target_params=50, method="l3"), "valid: backward, omp, l1, l2, random"),
    (dict(target_params=50, step=1.5), "fraction of the"),
])
def test_bad_input_raises_before_anything_changes(kwargs, message):
    torch.manual_seed(6)
    original = randomised(resnet20())
    model = wrapped(original)
    if kwargs.get("target_params") == 1:  # a network already 1 % smaller
        prune_uniform_fraction(model, 0.5, "l2")
    model.train()
    before = copy.deepcopy(model)
    with pytest.raises(HbgsError, match=message):
        hierarchical_prune(model, original, torch.randn(4, 3, 32, 32), None, **kwargs)
    assert same_state(model, before) and model.training
    assert channel_widths(model) == channel_widths(before)


# -- every candidate's score recomputed independently, after several rounds -------------------
#
# The references below share nothing with the scoring code under test (no suffix cache, no
# ``capture``/``end_signal``/``last_batchnorm``/``relative_error``): forward hooks and whole
# forwards of deep copies, in float64, on the whole calibration batch at once while the pruners
# score it in chunks. Only the candidates themselves are built by the lower level (``propose`` +
# ``pruned``; ``ChannelSurgery.propose`` + ``removed_copy``), which test_pruning_core.py and
# test_surgery.py check on their own.

def hooked_forward(model: nn.Module, x: torch.Tensor, names=()):
    """``model(x)`` (eval mode, no gradients) and the input and output of every module in
    ``names``, copied by forward hooks as the modules run."""
    inputs, outputs = {}, {}

    def hook(name):
        def record(module, args, output):
            inputs[name], outputs[name] = args[0].clone(), output.clone()
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        model.eval()
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, inputs, outputs


def norm_ratio(pairs) -> float:
    """||(a₁, a₂, …) − (b₁, b₂, …)|| / ||(b₁, b₂, …)|| over all pairs taken as one vector."""
    a = torch.cat([a.double().flatten() for a, _ in pairs])
    b = torch.cat([b.double().flatten() for _, b in pairs])
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def end_score(signal: str, logits, features, original_logits, original_features, y) -> float:
    if signal == "loss":
        return nn.functional.cross_entropy(logits.double(), y).item()  # mean over the batch
    if signal == "logits":
        return norm_ratio([(logits, original_logits)])
    return norm_ratio([(features, original_features)])


def adapter_scores_by_hand(model, original, x, y, criterion, signal, step, end):
    """``"layer:side" → score`` of every candidate of the next adapter round, plus (HBGS) the
    same layer errors measured against the CURRENT layer's output instead of the original's."""
    layers = [n for n, m in model.named_modules() if isinstance(m, AdaptedConv)]
    _, inputs, current_outputs = hooked_forward(model, x, layers)
    original_logits, _, original_outputs = hooked_forward(original, x, [*layers, end])
    scores, against_current = {}, {}
    for name in layers:
        layer = model.get_submodule(name)
        for side in ("out", "in"):
            width = layer.conv.out_channels if side == "out" else layer.conv.in_channels
            if width - step < 1:
                continue
            candidate = pruned(layer, side, propose(layer, side, step, "backward"))
            key = f"{name}:{side}"
            if criterion == "hbgs":
                with torch.no_grad():
                    output = candidate(inputs[name])
                scores[key] = norm_ratio([(output, original_outputs[name])])
                against_current[key] = norm_ratio([(output, current_outputs[name])])
                continue
            trial = copy.deepcopy(model)
            trial.set_submodule(name, candidate)
            logits, _, outputs = hooked_forward(trial, x, [end])
            scores[key] = end_score(signal, logits, outputs[end], original_logits,
                                    original_outputs[end], y)
    return scores, against_current


def nudge(model: nn.Module, conv: str, bn: str) -> None:
    """A stand-in for a fine-tune between rounds: one conv's weights and one BatchNorm's
    running mean change in place."""
    with torch.no_grad():
        model.get_submodule(conv).weight.mul_(1.05)
        model.get_submodule(bn).running_mean.add_(0.05)


def assert_scores_agree(record, expected) -> None:
    assert record.scores.keys() == expected.keys()
    for key, score in expected.items():
        assert record.scores[key] == pytest.approx(score, rel=1e-6, abs=1e-12), (record.round, key)
    best = min(expected, key=expected.get)
    assert f"{record.layer}:{record.side}" == best
    assert record.score == pytest.approx(expected[best], rel=1e-6, abs=1e-12)


# Each upper-level score: HBGS (a layer's own output) and HBGTS on each end signal
EVERY_SCORE = [("hbgs", "features"), ("hbgts", "features"), ("hbgts", "logits"), ("hbgts", "loss")]
SMALL_RESNET_END = "layer3.2.bn2"  # the last BatchNorm2d to run in CifarResNet's forward


@pytest.mark.parametrize("criterion,signal", EVERY_SCORE)
@pytest.mark.usefixtures("one_thread")
def test_adapter_scores_equal_an_independent_recomputation_after_several_rounds(criterion,
                                                                                 signal):
    torch.manual_seed(8)
    original = randomised(CifarResNet(20, widths=(8, 16, 32))).double()
    x = torch.randn(12, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (12,))
    model = wrapped(original)
    pruner = HierarchicalPruner(model, original, x, y, criterion=criterion, signal=signal,
                                step=2, input_size=(3, 16, 16), chunk_size=5)
    for round_ in range(1, 5):
        expected, against_current = adapter_scores_by_hand(model, original, x, y, criterion,
                                                           signal, 2, SMALL_RESNET_END)
        if criterion == "hbgs" and round_ >= 3:  # the reference matters: the check can fail
            assert max(abs(expected[k] - against_current[k]) for k in expected) > 1e-3
        record = pruner.run_round()
        assert record.round == round_
        assert_scores_agree(record, expected)
        nudge(model, "layer2.1.conv1.conv", "layer1.2.bn1")
    assert len({r for r, w in channel_widths(model).items()
                if (w.out_current, w.in_current) != (w.out_original, w.in_original)}) >= 2


def surviving_channels(now: nn.BatchNorm2d, before: nn.BatchNorm2d) -> list[int]:
    """The channels of ``before`` that ``now`` still has, told apart by their (randomised,
    distinct) affine parameters and running statistics, which removal copies unchanged."""
    def rows(bn):
        return [tuple(v.item() for v in values) for values in
                zip(bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    index = {row: i for i, row in enumerate(rows(before))}
    assert len(index) == before.num_features
    return [index[row] for row in rows(now)]


def removal_scores_by_hand(model, original, x, y, criterion, signal, step, end):
    """``"root:out" → score`` of every candidate group of the next ``surgery=remove`` round."""
    def in_width(module):
        return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features

    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    current_logits, _, current_outputs = hooked_forward(model, x, layers)
    original_logits, _, original_outputs = hooked_forward(original, x, [end])
    surgery = ChannelSurgery(model, x[:1])
    scores = {}
    for group in surgery.groups():
        if group.width - step < 1:
            continue
        removed = removed_channels(group, surgery.propose(group, step, "backward").keep)
        clone, _ = surgery.removed_copy(group.root, removed, x)
        if criterion == "hbgs":  # the layers reading the removed channels, against now
            readers = [n for n in layers if getattr(clone.get_submodule(n), "groups", 1) == 1
                       and in_width(clone.get_submodule(n)) < in_width(model.get_submodule(n))]
            logits, _, outputs = hooked_forward(clone, x, readers)
            scores[f"{group.root}:out"] = norm_ratio(
                [(outputs[n], current_outputs[n]) for n in readers] or
                [(logits, current_logits)])
            continue
        logits, _, outputs = hooked_forward(clone, x, [end])
        features = outputs[end]
        kept = surviving_channels(clone.get_submodule(end), original.get_submodule(end))
        full = features.new_zeros(original_outputs[end].shape)  # removed channels read as zeros
        full[:, kept] = features
        scores[f"{group.root}:out"] = end_score(signal, logits, full, original_logits,
                                                original_outputs[end], y)
    return scores


@pytest.mark.parametrize("criterion,signal", EVERY_SCORE)
@pytest.mark.usefixtures("one_thread")
def test_removal_scores_equal_an_independent_recomputation_after_several_rounds(criterion,
                                                                                 signal):
    torch.manual_seed(9)
    original = randomised(PlainNet(), seed=9).double()
    dead = [3, 8]  # two dead channels of the end map, which cost nothing to remove: once they
    with torch.no_grad():  # are gone, channel i of the end map is no longer original channel i
        original.c.weight[dead] = 0
        original.bns[3].bias[dead] = 0
        original.bns[3].running_mean[dead] = 0
    x = torch.randn(12, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (12,))
    model = copy.deepcopy(original)
    pruner = RemovalPruner(model, original, x, y, criterion=criterion, signal=signal, step=2,
                           input_size=(3, 16, 16), chunk_size=5)
    for round_ in range(1, 6):
        expected = removal_scores_by_hand(model, original, x, y, criterion, signal, 2, "bns.3")
        record = pruner.run_round()
        assert record.round == round_
        assert_scores_agree(record, expected)
        nudge(model, "b", "bns.1")
    assert model.c.out_channels < 16  # the end map lost channels
