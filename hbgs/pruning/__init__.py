"""Lower level of hbgs: per-layer filter selection and exact compensation through 1×1 adapters.

Plain PyTorch, no Hydra or Lightning: a user's own model can be wrapped and pruned directly::

    names = wrap_model(model)
    prune_conv(model, names[0], "out", n_remove=8, method="backward")
    fold_identity_adapters(model)
"""
from hbgs.pruning.adapters import (AdaptedConv, LayerWidths, channel_widths,
                                   fold_identity_adapters, is_prunable, replace_module,
                                   with_identity_adapters, wrap_model)
from hbgs.pruning.compensation import (SIDES, apply, filter_matrices, filter_matrix, propose,
                                       prune_conv, pruned)
from hbgs.pruning.selectors import (METHODS, Selection, backward_naive, least_squares_selection,
                                    select_filters)

__all__ = [
    "AdaptedConv", "LayerWidths", "METHODS", "SIDES", "Selection", "apply", "backward_naive",
    "channel_widths", "filter_matrices", "filter_matrix", "fold_identity_adapters", "is_prunable",
    "least_squares_selection", "propose", "prune_conv", "pruned", "replace_module",
    "select_filters", "with_identity_adapters", "wrap_model",
]
