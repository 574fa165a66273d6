"""Pruning, plain PyTorch (no Hydra or Lightning), usable on a user's own model.

Lower level (which filters of one layer): selectors, adapters, compensation::

    names = wrap_model(model)
    prune_conv(model, names[0], "out", n_remove=8, method="backward")
    fold_identity_adapters(model)

Upper level (which layer next): ``hierarchical_prune`` (HBGS / HBGTS, with the suffix cache),
and the ACRA baselines ``uniform_allocation`` / ``sensitivity_allocation``; ``costs`` reports
params and FLOPs against the original and the adapter-augmented network.

Structural surgery (``surgery="remove"`` in ``hierarchical_prune`` and the ACRA functions): on an
unwrapped model, ``ChannelSurgery`` finds the coupled channel groups (Torch-Pruning's
DependencyGraph) and removes channels for real, compensating each consumer by least squares::

    surgery = ChannelSurgery(model, calib_x[:1])
    group = surgery.groups()[0]
    selection = surgery.propose(group, n_remove=4, method="backward")
    surgery.remove(group.root, removed_channels(group, selection.keep), calib_x)

Peers: ``torch_pruning_allocation`` runs Torch-Pruning's own pruner (L1 or group-norm importance)
at the smallest ratio meeting the same targets, returning an ``Allocation`` like ACRA's.
"""
from hbgs.pruning.adapters import (AdaptedConv, LayerWidths, channel_widths,
                                   drop_identity_adapters, fold_identity_adapters, is_prunable,
                                   replace_module, with_identity_adapters, wrap_model,
                                   wrapped_layers)
from hbgs.pruning.compensation import (SIDES, apply, filter_matrices, filter_matrix, propose,
                                       prune_conv, pruned, uncompensated)
from hbgs.pruning.selectors import (METHODS, Selection, backward_naive, least_squares_selection,
                                    select_filters)
from hbgs.pruning.costs import NetworkCost, ReferenceCosts, as_saved, saved_cost
from hbgs.pruning.criteria import CRITERIA, LOOP_CRITERIA
from hbgs.pruning.activations import FullNetworkEvaluator, ModuleSnapshot, WorkStats, last_batchnorm
from hbgs.pruning.suffix import SuffixCache, trace
from hbgs.pruning.hierarchical import (SIGNALS, Candidate, HierarchicalPruner, ProposalCache,
                                       RoundRecord, channels_to_remove, hierarchical_prune,
                                       smallest_reachable_cost)
from hbgs.pruning.surgery import ChannelGroup, ChannelSurgery, input_grams, layer_widths
from hbgs.pruning.removal import RemovalPruner, remove_by_ratios, removed_channels
from hbgs.pruning.ratios import fraction_pruned, prune_layers, prune_uniform_fraction
from hbgs.pruning.acra import (Allocation, SensitivityAllocation, SensitivityTable,
                               UniformAllocation, group_sensitivity, layer_sensitivity,
                               sensitivity_allocation, uniform_allocation)
from hbgs.pruning.peers import PeerAllocation, ignored_layers, prune_at_ratio, torch_pruning_allocation

# The public API; the other names imported above stay importable from here for code that
# reached them before, but their home is their module.
__all__ = [
    # lower level: which filters of one layer
    "AdaptedConv", "LayerWidths", "METHODS", "SIDES", "Selection", "apply", "channel_widths",
    "fold_identity_adapters", "propose", "prune_conv", "pruned", "select_filters",
    "uncompensated", "with_identity_adapters", "wrap_model", "wrapped_layers",
    "prune_uniform_fraction",
    # upper level: HBGS/HBGTS, the ACRA allocations, costs
    "CRITERIA", "SIGNALS", "HierarchicalPruner", "RoundRecord", "hierarchical_prune",
    "Allocation", "UniformAllocation", "SensitivityAllocation", "SensitivityTable",
    "layer_sensitivity", "sensitivity_allocation", "uniform_allocation",
    "NetworkCost", "ReferenceCosts", "saved_cost",
    # structural surgery
    "ChannelGroup", "ChannelSurgery", "removed_channels",
    # Torch-Pruning as a peer
    "PeerAllocation", "torch_pruning_allocation",
]
