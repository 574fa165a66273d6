"""hbgs: greedy hierarchical whole-network filter pruning of CNNs (Purohit et al., TMLR 2024).

The public Python API, usable without Hydra on any model::

    from hbgs import select_filters, wrap_model, prune_conv, fold_identity_adapters, save_model, load_model
    from hbgs import hierarchical_prune                          # the paper's method (HBGS/HBGTS)
    from hbgs import uniform_allocation, sensitivity_allocation  # the ACRA baselines
    from hbgs import export          # a pruned model as a faster inference model (hbgs/export.py)

More, and the building blocks, in ``hbgs.pruning``.
"""

from hbgs.checkpoint import load_meta, load_model, save_model
from hbgs.export import export
from hbgs.pruning import (AdaptedConv, Selection, apply, channel_widths, fold_identity_adapters, propose,
                          prune_conv, pruned, select_filters, with_identity_adapters, wrap_model)
from hbgs.pruning import hierarchical_prune, sensitivity_allocation, uniform_allocation

__version__ = "0.1.0"

__all__ = [
    # the lower level: which filters of one layer
    "AdaptedConv", "Selection", "apply", "channel_widths", "fold_identity_adapters", "propose", "prune_conv",
    "pruned", "select_filters", "with_identity_adapters", "wrap_model",
    # the upper level: the paper's method and the ACRA allocations
    "hierarchical_prune", "sensitivity_allocation", "uniform_allocation",
    # model files and inference export
    "export", "load_meta", "load_model", "save_model",
]
