"""hbgs: greedy hierarchical whole-network filter pruning of CNNs (Purohit et al., TMLR 2024).

The public Python API, usable without Hydra on any model::

    from hbgs import select_filters, wrap_model, prune_conv, fold_identity_adapters, save_model, load_model
    from hbgs import export          # a pruned model as a faster inference model (hbgs/export.py)
"""

from hbgs.checkpoint import load_meta, load_model, save_model
from hbgs.export import export
from hbgs.pruning import (AdaptedConv, Selection, apply, channel_widths, fold_identity_adapters, propose,
                          prune_conv, pruned, select_filters, with_identity_adapters, wrap_model)

__version__ = "0.1.0"

__all__ = [
    "AdaptedConv", "Selection", "apply", "channel_widths", "export", "fold_identity_adapters", "load_meta", "load_model",
    "propose", "prune_conv", "pruned", "save_model", "select_filters", "with_identity_adapters", "wrap_model",
]
