"""The suffix cache (hbgs/pruning/suffix.py, docs/algorithms.md §2): the traced network, the
cached boundary, and scores through it equal to full-network scores. Random weights and inputs;
small models so the file runs in seconds on one core."""
import copy

import pytest
import torch
from torch import nn

from hbgs.errors import HbgsError
from hbgs.models import resnet18, resnet20, resnet56, resnext29_2x32d, vgg16
from hbgs.models.vgg import CifarVGG
from hbgs.pruning import channel_widths, propose, pruned
from hbgs.pruning.activations import FullNetworkEvaluator, last_batchnorm
from hbgs.pruning.hierarchical import HierarchicalPruner, hierarchical_prune
from hbgs.pruning.suffix import SuffixCache, trace
from helpers import randomised, same_state, wrapped


def tiny_vgg() -> nn.Module:
    torch.manual_seed(2)
    layout = (16, "M", 24, 24, "M", 32, "M", 32, "M", 32, "M")
    return randomised(CifarVGG(layout=layout, num_classes=10))


@pytest.mark.parametrize("build,images", [(resnet20, 4), (tiny_vgg, 16)])
def test_suffix_scores_equal_full_network_scores_for_every_signal(build, images):
    torch.manual_seed(3)
    original = randomised(build())
    x, y = torch.randn(images, 3, 32, 32), torch.randint(0, 10, (images,))
    for signal in ("features", "logits", "loss"):
        scores = {}
        for use_cache, chunk_size in ((True, 3), (False, None)):
            pruner = HierarchicalPruner(wrapped(original), original, x, y, criterion="hbgts",
                                        signal=signal, step=0.3, use_cache=use_cache,
                                        chunk_size=chunk_size)
            scores[use_cache] = {(c.layer, c.side): s for c, s in pruner.scored_candidates()}
        assert scores[True].keys() == scores[False].keys() and len(scores[True]) >= 6
        for key, score in scores[True].items():
            assert score == pytest.approx(scores[False][key], rel=1e-5, abs=1e-7), (signal, key)


def test_suffix_cache_stores_the_boundary_and_runs_only_the_suffix():
    torch.manual_seed(4)
    model = wrapped(randomised(resnet20()))
    x = torch.randn(2, 3, 32, 32)
    layers = list(channel_widths(model))
    end = last_batchnorm(model, x)
    assert end == "layer3.2.bn2"
    cache = SuffixCache(model, x, layers, end=end)
    full = FullNetworkEvaluator(model, x, layers, end=end)
    cache.refresh()
    torch.testing.assert_close(cache.end_values()[0][1], full.end_values()[0][1])
    # The last layer runs only itself and the last BatchNorm; the first all 80 compute nodes but
    # the stem (conv, bn, relu), layer1.0's shortcut and the 6 nodes after the last BatchNorm
    # (the last shortcut, add, relu, pool, flatten, fc).
    assert cache.compute_nodes == 80
    for layer, nodes in (("layer3.2.conv2", 2), ("layer1.0.conv1", 80 - 3 - 1 - 6)):
        before = cache.stats.nodes_run
        cache.end_values(layer, model.get_submodule(layer))
        assert cache.stats.nodes_run - before == nodes
    # Stored per image, in floats: every block's input (3 + 1 at 16×32×32, 2 + 1 at 32×16×16,
    # 2 at 64×8×8, counting the input of each stage's first block in the stage before), every
    # conv2's input (3 per stage), the two zero-padded shortcuts and the end signal.
    floats = 16 * 32 * 32 * (4 + 3) + 32 * 16 * 16 * (3 + 3 + 1) + 64 * 8 * 8 * (2 + 3 + 1 + 1)
    assert cache.nbytes() == 2 * 4 * floats


@pytest.mark.parametrize("build", [resnet20, resnet56, vgg16, resnext29_2x32d, resnet18])
def test_zoo_models_trace_and_their_suffixes_match_the_full_network(build):
    torch.manual_seed(7)
    model = wrapped(randomised(build()))
    called = [n.target for n in trace(model).nodes if n.op == "call_module"]
    layers = list(channel_widths(model))
    for name in layers:  # each wrapped layer is one node, never traced into
        assert called.count(name) == 1
        assert not any(target.startswith(name + ".") for target in called)
    x = torch.randn(1, 3, 32, 32)
    end = last_batchnorm(model, x)
    cache = SuffixCache(model, x, layers, end=end)
    cache.refresh()
    full = FullNetworkEvaluator(model, x, layers, end=end)
    for name in (layers[0], layers[len(layers) // 2], layers[-1]):
        layer = model.get_submodule(name)
        candidate = pruned(layer, "out", propose(layer, "out", layer.conv.groups * 2, "l2"))
        torch.testing.assert_close(cache.end_values(name, candidate)[0][1],
                                   full.end_values(name, candidate)[0][1])


class ReadsAfterInPlace(nn.Module):
    """Overwrites a tensor in place (``y.relu_()`` as a statement) and reads it afterwards."""

    def __init__(self):
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.body(x)
        y.relu_()
        return self.fc((x + y).mean((2, 3)))


def test_in_place_changes_read_afterwards_are_refused_by_the_cache_only():
    original = ReadsAfterInPlace().eval()
    x = torch.randn(4, 3, 8, 8)
    model = wrapped(original)
    before = copy.deepcopy(model)
    with pytest.raises(HbgsError, match="changes body in place .* use_cache=False"):
        hierarchical_prune(model, original, x, None, signal="logits", step=2, target_params=5,
                           input_size=(3, 8, 8))
    assert same_state(model, before)
    records = hierarchical_prune(model, original, x, None, signal="logits", step=2,
                                 target_params=5, input_size=(3, 8, 8), use_cache=False)
    assert records[-1].target_met
