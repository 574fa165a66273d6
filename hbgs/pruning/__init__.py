"""Pruning, plain PyTorch (no Hydra or Lightning), usable on a user's own model.

Lower level (which filters of one layer): selectors, adapters, compensation::

    names = wrap_model(model)
    prune_conv(model, names[0], "out", n_remove=8, method="backward")
    fold_identity_adapters(model)

Upper level (which layer next): ``hierarchical_prune`` (HBGS / HBGTS, with the suffix cache),
and the ACRA baselines ``uniform_allocation`` / ``sensitivity_allocation``; ``costs`` reports
params and FLOPs against the original and the adapter-augmented network.
"""
from hbgs.pruning.adapters import (AdaptedConv, LayerWidths, channel_widths,
                                   fold_identity_adapters, is_prunable, replace_module,
                                   with_identity_adapters, wrap_model)
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
from hbgs.pruning.acra import (Allocation, SensitivityAllocation, SensitivityTable,
                               UniformAllocation, fraction_pruned, layer_sensitivity,
                               prune_layers, prune_uniform_fraction, sensitivity_allocation,
                               uniform_allocation)

__all__ = [
    "AdaptedConv", "LayerWidths", "METHODS", "SIDES", "Selection", "apply", "backward_naive",
    "channel_widths", "filter_matrices", "filter_matrix", "fold_identity_adapters", "is_prunable",
    "least_squares_selection", "propose", "prune_conv", "pruned", "replace_module",
    "select_filters", "uncompensated", "with_identity_adapters", "wrap_model",
    # upper level: costs, the activation cache, HBGS/HBGTS, ACRA
    "Allocation", "CRITERIA", "Candidate", "FullNetworkEvaluator", "HierarchicalPruner",
    "ModuleSnapshot", "NetworkCost", "ProposalCache", "ReferenceCosts", "RoundRecord", "SIGNALS",
    "SensitivityAllocation", "SensitivityTable", "SuffixCache", "UniformAllocation", "WorkStats",
    "as_saved", "channels_to_remove", "drop_identity_adapters", "fraction_pruned",
    "hierarchical_prune", "last_batchnorm", "layer_sensitivity", "prune_layers",
    "prune_uniform_fraction", "saved_cost", "sensitivity_allocation", "smallest_reachable_cost",
    "trace", "uniform_allocation",
]
