"""Smaller claims of the code made to hold by a test (issue 15, item 8): the distillation loss in
the training step, Bridgeout on a model with 1×1 convs, ACRA sensitivity's search and its
``measure="loss"``, ``limit_test``'s class-mixed subset, ``min_channels`` and the "no candidate
left" stop of a hierarchical run, and smoke runs of the two benchmark scripts."""
import copy
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO
from helpers import PlainNet, wrapped
from hbgs.bridgeout import add_bridgeout, has_bridgeout
from hbgs.errors import HbgsError
from hbgs.models import resnet18
from hbgs.module import Classifier
from hbgs.pruning import channel_widths
from hbgs.pruning.acra import layer_sensitivity, sensitivity_allocation
from hbgs.pruning.costs import ReferenceCosts, saved_cost
from hbgs.pruning.hierarchical import HierarchicalPruner, hierarchical_prune, run_rounds
from hbgs.pruning.ratios import prune_layers


def small_net(seed: int) -> nn.Module:
    """``PlainNet`` (stem 3→8, 3×3 conv-BN-ReLU layers ``a`` 8→16, ``b`` and ``c`` 16→16, pool,
    linear) in eval mode with seeded weights and non-trivial BatchNorm statistics, all drawn from
    torch's global generator (the tests below were sized on these values)."""
    torch.manual_seed(seed)
    model = PlainNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for tensor, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2),
                                      (m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5)):
                tensor.data.uniform_(low, high)
    return model.eval()


# -- distillation -----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer: a bare training step
def test_training_loss_is_cross_entropy_plus_weighted_distillation(one_thread):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    T, w = 3.0, 0.7
    module = Classifier(student, num_classes=5, teacher=teacher, kd_temperature=T, kd_weight=w)
    module.train()
    loss = module.training_step((x, y), 0)

    # Independently, in float64: CE(student) + w · T² · mean over the batch of KL(q_T ‖ p_T).
    s, t = student(x).detach().double(), teacher(x).detach().double()
    log_softmax = lambda z: z - z.exp().sum(1, keepdim=True).log()  # noqa: E731
    ce = -log_softmax(s)[torch.arange(len(y)), y].mean()
    log_p, log_q = log_softmax(s / T), log_softmax(t / T)
    kl = (log_q.exp() * (log_q - log_p)).sum(1).mean()
    expected = ce + w * T**2 * kl
    assert kl > 0.01  # the teacher disagrees with the student: the KD term matters
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.requires_grad  # the student trains on it
    assert F.cross_entropy(student(x), y).item() == pytest.approx(ce.item(), rel=1e-5)


# -- Bridgeout on a model with 1×1 convs ------------------------------------------------------

def test_bridgeout_noises_3x3_convs_and_leaves_1x1_convs_plain(one_thread):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    plain = copy.deepcopy(model)
    assert add_bridgeout(model, p=0.5, target_fraction=1.0) == ["0", "4"]
    pointwise, spatial = (model[2], model[6]), (model[0], model[4])
    assert not any(has_bridgeout(m) for m in pointwise) and all(has_bridgeout(m) for m in spatial)

    # Each conv's output against the plain conv on the same input, in training mode.
    inputs, outputs = {}, {}

    def record(index):
        def hook(module, args, out):
            inputs[index], outputs[index] = args[0], out
        return hook

    for index in (0, 2, 4, 6):
        model[index].register_forward_hook(record(index))
    model.train()
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):  # three draws: noise on a 3×3 conv shows up in every one
        with torch.no_grad():
            model(x)
        for index in (2, 6):  # 1×1: exactly the plain conv
            assert torch.equal(outputs[index], plain[index](inputs[index]))
        for index in (0, 4):  # 3×3: noisy
            assert (outputs[index] - plain[index](inputs[index])).abs().max() > 1e-3
    # A real model: ResNet-18's 1×1 shortcut convs are left plain, every 3×3 conv is targeted.
    net = resnet18()
    names = add_bridgeout(net)
    spatial_names = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    pointwise_names = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)}
    assert len(pointwise_names) == 3 and set(names) == spatial_names


# -- ACRA sensitivity -------------------------------------------------------------------------

def test_sensitivity_loss_drops_and_smallest_threshold_match_brute_force(one_thread):
    original = small_net(seed=2)
    model = wrapped(original)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(64, 3, 12, 12, generator=generator)
    y = torch.randint(0, 10, (64,), generator=generator)
    ratios = (0.25, 0.5, 0.75)
    table = layer_sensitivity(model, x, y, method="l2", ratios=ratios, measure="loss")

    # measure="loss": the mean cross-entropy gained when only that layer is pruned, each case
    # measured by a whole forward of a pruned copy.
    def ce(net):
        with torch.no_grad():
            return F.cross_entropy(net(x).double(), y).item()

    base = ce(model)
    assert table.measure == "loss" and table.base == pytest.approx(base, rel=1e-6)
    assert list(table.drops) == ["a", "b", "c"]
    for name, drops in table.drops.items():
        for ratio, drop in zip(ratios, drops):
            candidate = copy.deepcopy(model)
            prune_layers(candidate, {name: ratio}, "l2")
            assert drop == pytest.approx(ce(candidate) - base, rel=1e-5, abs=1e-9), (name, ratio)
    assert max(d for drops in table.drops.values() for d in drops) > 0  # pruning costs loss somewhere

    # The search: brute force over every measured threshold, smallest first.
    reference = ReferenceCosts.measure(original, (3, 12, 12))
    thresholds = sorted({d for drops in table.drops.values() for d in drops})
    reductions = []
    for t in thresholds:
        candidate = copy.deepcopy(model)
        prune_layers(candidate, table.allocation(t), "l2")
        reductions.append(saved_cost(candidate, reference).reduction("params"))
    assert reductions == sorted(reductions)  # the bisection's premise holds here
    # targets below the first reachable reduction and between every two distinct ones
    steps = [i for i in range(1, len(reductions)) if reductions[i] > reductions[i - 1]]
    assert reductions[0] > 0 and len(steps) >= 5
    targets = [reductions[0] / 2] + [(reductions[k - 1] + reductions[k]) / 2 for k in steps]
    for target in targets:
        expected = min(i for i, r in enumerate(reductions) if r >= target)
        result = sensitivity_allocation(model, original, x, y, target_params=target, method="l2",
                                        ratios=ratios, measure="loss", tolerance=0,
                                        input_size=(3, 12, 12))
        assert result.threshold == thresholds[expected], target
        assert result.ratios == table.allocation(thresholds[expected])
        assert result.reduction == pytest.approx(reductions[expected])
        assert result.below == pytest.approx(reductions[expected - 1] if expected else 0.0)


# -- limit_test -------------------------------------------------------------------------------

def test_limit_test_draws_a_class_mixed_random_subset(cifar10_root, cifar10):
    from hbgs.data import ImageDataModule

    dm = ImageDataModule(root=cifar10_root, calib_size=100, limit_test=200, seed=0)
    dm.setup()
    subset, full = dm.splits["test"], cifar10.splits["test"]
    counts = torch.bincount(subset.labels, minlength=10)
    assert len(subset) == 200
    assert (counts > 0).sum() == 10 and counts.max() <= 40  # all classes, none dominating (20 expected)
    assert not torch.equal(subset.images, full.images[:200])  # not the first 200 files (all airplanes)
    assert full.labels[:200].unique().tolist() == [0]
    # the subset is made of test images (a random draw of them, seeded)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))[:200]
    assert torch.equal(subset.images, full.images[order]) and torch.equal(subset.labels, full.labels[order])


# -- min_channels and "no candidate left" -------------------------------------------------------

def test_a_run_stops_when_every_layer_reaches_min_channels(one_thread):
    original = small_net(seed=4)
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    # step 4, min_channels 5: 16 → 12 → 8 (one more step would leave 4 < 5); 8 stays 8.
    # a: out 16→8 (2 rounds), in 8 (none); b, c: both sides 16→8 (4 rounds each) — 10 rounds.
    final = {"a": (8, 8), "b": (8, 8), "c": (8, 8)}  # (in, out)

    pruner = HierarchicalPruner(wrapped(original), original, x, None, criterion="hbgs", step=4,
                                min_channels=5, input_size=(3, 8, 8))
    with pytest.warns(UserWarning, match=r"no candidate left after 10 rounds and the target params "
                                         r"reduction 99% is not met"):
        records = run_rounds(pruner, "params", 99.0)  # past the check: the stop itself
    assert len(records) == 10 and not any(r.target_met for r in records)
    widths = channel_widths(pruner.model)
    assert {n: (w.in_current, w.out_current) for n, w in widths.items()} == final
    assert pruner.run_round() is None

    # The most reachable reduction is met exactly with every layer at those widths ...
    reachable = records[-1].params_reduction
    model = wrapped(original)
    records = hierarchical_prune(model, original, x, None, criterion="hbgs", step=4, min_channels=5,
                                 target_params=reachable, input_size=(3, 8, 8))
    assert len(records) == 10 and records[-1].target_met
    assert {n: (w.in_current, w.out_current) for n, w in channel_widths(model).items()} == final
    # ... and anything more is refused up front, before anything changes.
    model = wrapped(original)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(HbgsError, match=rf"out of reach.*min_channels=5.*{reachable:.2f}% fewer params"):
        hierarchical_prune(model, original, x, None, criterion="hbgs", step=4, min_channels=5,
                           target_params=reachable + 0.01, input_size=(3, 8, 8))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# -- benchmark scripts ------------------------------------------------------------------------

def bench(module: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, *args, "--threads", "1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_selector_benchmark_prints_its_ratio_rows():
    stdout = bench("hbgs.bench.selectors", "--repeats", "1", "--naive-max-n", "64")
    number = r"\d+\.\d+"
    rows = re.findall(rf"^(VGG-16|ResNet-56)\s+(\d+)x(\d+)\s+{number}\s+{number}\s+{number}\*?\s+"
                      rf"({number})\*?\s+({number})\s+(True|False|-)$", stdout, re.M)
    assert len(rows) == 11  # every layer shape
    assert {(int(n), int(d)) for _, n, d, *_ in rows} >= {(64, 27), (512, 4608), (16, 144)}
    assert all(float(naive) > 0 and float(omp) > 0 for *_, naive, omp, _ in rows)
    # naive run in full (n ≤ 64) picks the same filters as backward; estimated above
    assert {same for _, n, _, _, _, same in rows if int(n) <= 64} == {"True"}
    assert {same for _, n, _, _, _, same in rows if int(n) > 64} == {"-"}


def test_rounds_benchmark_prints_every_path_with_the_same_choices():
    stdout = bench("hbgs.bench.rounds", "--models", "resnet20", "--rounds", "2", "--calib", "16", "--step", "8",
                   "--steps", "1", "--finetune-steps", "10")
    number = r"(\d+\.\d+)"
    rows = {path: values for path, *values in re.findall(
        rf"^(full|suffix|fast)\s+{number}\s+{number}\s+{number}\s+{number}\s+(\S+)\s+(\d+)\s+(\d+)$", stdout, re.M)}
    assert set(rows) == {"full", "suffix", "fast"}
    assert rows["full"][4] == "1.00"
    # the caches compute fewer proposals and run fewer graph nodes than the full-network path
    assert int(rows["suffix"][5]) < int(rows["full"][5]) and int(rows["suffix"][6]) < int(rows["full"][6])
    assert rows["fast"][5:] == rows["suffix"][5:]  # the layout changes the speed, not the work
    assert re.search(r"^same choices on every path: True; largest relative score difference: \S+; choices: "
                     r"\S+:(in|out), \S+:(in|out)$", stdout, re.M)
    steps = re.findall(rf"^cpu (float32|channels-last, \S+ ?\S*)\s+{number}\s+{number}\s+{number}$", stdout, re.M)
    assert [label for label, *_ in steps][0] == "float32" and len(steps) == 2
    for _, step, _, paper_round in steps:  # the paper round adds 10 steps to a later round's scoring
        assert float(paper_round) >= 10 * float(step) - 0.05

def test_recovery_benchmark_fine_tunes_the_same_cut_network_for_each_length():
    stdout = bench("hbgs.bench.recovery", "--steps", "0", "3", "--test-images", "100", "--limit-train", "384")
    dense = float(re.search(r"^dense: calibration (\d+\.\d+)%", stdout, re.M).group(1))
    rows = re.findall(r"^\s+(\d+)\s+(\d+\.\d+)%\s+(\d+\.\d+)%\s+(\d+\.\d+)$", stdout, re.M)
    assert [int(steps) for steps, *_ in rows] == [0, 3]
    (_, cut_calib, _, no_seconds), (_, _, _, seconds) = rows
    assert float(cut_calib) < dense  # the 10 % cut costs calibration accuracy before any fine-tune
    assert float(no_seconds) == 0.0 and float(seconds) > 0.0
