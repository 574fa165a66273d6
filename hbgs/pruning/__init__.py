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
                                   fold_identity_adapters, is_prunable, replace_module,
                                   with_identity_adapters, wrap_model, wrapped_layers)
from hbgs.pruning.compensation import (SIDES, apply, filter_matrices, filter_matrix, propose,
                                       prune_conv, pruned, uncompensated)
from hbgs.pruning.selectors import (METHODS, Selection, backward_naive, least_squares_selection,
                                    select_filters)
from hbgs.pruning.costs import NetworkCost, ReferenceCosts, as_saved, saved_cost
from hbgs.pruning.suffix import (FullNetworkEvaluator, ModuleSnapshot, SuffixCache, WorkStats,
                                 last_batchnorm, trace)
from hbgs.pruning.hierarchical import (CRITERIA, SIGNALS, Candidate, HierarchicalPruner,
                                       ProposalCache, RoundRecord, channels_to_remove,
                                       drop_identity_adapters, hierarchical_prune,
                                       smallest_reachable_cost)
from hbgs.pruning.surgery import ChannelGroup, ChannelSurgery, input_grams, layer_widths
from hbgs.pruning.removal import RemovalPruner, remove_by_ratios, removed_channels
from hbgs.pruning.acra import (Allocation, SensitivityAllocation, SensitivityTable,
                               UniformAllocation, fraction_pruned, group_sensitivity,
                               layer_sensitivity,
                               prune_layers, prune_uniform_fraction, sensitivity_allocation,
                               uniform_allocation)
from hbgs.pruning.peers import PeerAllocation, ignored_layers, prune_at_ratio, torch_pruning_allocation

__all__ = [
    "AdaptedConv", "LayerWidths", "METHODS", "SIDES", "Selection", "apply", "backward_naive",
    "channel_widths", "filter_matrices", "filter_matrix", "fold_identity_adapters", "is_prunable",
    "least_squares_selection", "propose", "prune_conv", "pruned", "replace_module",
    "select_filters", "uncompensated", "with_identity_adapters", "wrap_model", "wrapped_layers",
    # upper level: costs, the activation cache, HBGS/HBGTS, ACRA
    "Allocation", "CRITERIA", "Candidate", "FullNetworkEvaluator", "HierarchicalPruner",
    "ModuleSnapshot", "NetworkCost", "ProposalCache", "ReferenceCosts", "RoundRecord", "SIGNALS",
    "SensitivityAllocation", "SensitivityTable", "SuffixCache", "UniformAllocation", "WorkStats",
    "as_saved", "channels_to_remove", "drop_identity_adapters", "fraction_pruned",
    "hierarchical_prune", "last_batchnorm", "layer_sensitivity", "prune_layers",
    "prune_uniform_fraction", "saved_cost", "sensitivity_allocation", "smallest_reachable_cost",
    "trace", "uniform_allocation",
    # structural surgery
    "ChannelGroup", "ChannelSurgery", "RemovalPruner", "group_sensitivity", "input_grams",
    "layer_widths", "remove_by_ratios", "removed_channels",
    # Torch-Pruning as a peer method
    "PeerAllocation", "ignored_layers", "prune_at_ratio", "torch_pruning_allocation",
]
