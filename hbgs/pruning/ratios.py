"""The lower level by ratio: remove the same fraction of the channels of wrapped layers
(docs/algorithms.md §3). The ACRA allocations (``acra.py``) search for the ratios; the
``uniform_fraction`` criterion and the robustness curves apply one ratio everywhere.

A ratio ``r`` removes ``round(r · width)`` channels from the output side, then from the input
side, of a conv (compensated through its adapters), keeping at least ``min_channels`` (rounded
to whole groups for grouped convs).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from hbgs.errors import HbgsError
from hbgs.pruning.adapters import (AdaptedConv, LayerWidths, channel_widths,
                                   drop_identity_adapters, replace_module, wrapped_layers)
from hbgs.pruning.compensation import SIDES, propose, pruned, uncompensated


def fraction_count(width: int, fraction: float, groups: int = 1, min_channels: int = 1) -> int:
    """Channels a ratio ``fraction`` removes from a side of ``width``: ``fraction`` of each
    group's channels rounded half up, from every group alike, leaving at least
    ``min_channels`` (and one channel per group)."""
    if not 0 <= fraction <= 1:
        raise HbgsError(f"a pruning ratio must lie in [0, 1], got {fraction!r}")
    per_group = width // groups
    count = int(fraction * per_group + 0.5)
    most = per_group - max(1, -(-min_channels // groups))
    return groups * max(0, min(count, most))


def fraction_pruned(layer: AdaptedConv, fraction: float, method: str, *, min_channels: int = 1,
                    seed: int = 0, sides: Sequence[str] = SIDES, compensate: bool = True) -> AdaptedConv:
    """``layer`` with the ratio ``fraction`` of its channels removed on each of ``sides`` in turn
    (output, then input), compensated unless ``compensate=False`` (plain removal); a new module
    (``layer`` itself when nothing is removed)."""
    for side in sides:
        width = layer.conv.out_channels if side == "out" else layer.conv.in_channels
        count = fraction_count(width, fraction, layer.conv.groups, min_channels)
        if count:
            selection = propose(layer, side, count, method, seed=seed)
            if not compensate:
                selection = uncompensated(layer, side, selection)
            layer = pruned(layer, side, selection)
    return layer


def prune_layers(model: nn.Module, ratios: Mapping[str, float], method: str, *,
                 min_channels: int = 1, seed: int = 0, sides: Sequence[str] = SIDES,
                 compensate: bool = True) -> dict[str, LayerWidths]:
    """Prune each wrapped layer named in ``ratios`` by its ratio (``fraction_pruned``), in place,
    dropping the identity adapters of its unpruned sides; return the widths of all wrapped
    layers."""
    for name, fraction in ratios.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, AdaptedConv):
            raise HbgsError(f"layer {name!r} is not a wrapped conv; call wrap_model(model) first")
        layer = fraction_pruned(layer, fraction, method, min_channels=min_channels, seed=seed,
                                sides=sides, compensate=compensate)
        drop_identity_adapters(layer)  # nothing for later fine-tuning to move on unpruned sides
        replace_module(model, name, layer)
    return channel_widths(model)


def prune_uniform_fraction(model: nn.Module, fraction: float, method: str, *,
                           min_channels: int = 1, seed: int = 0) -> dict[str, LayerWidths]:
    """The lower level alone: remove the same ``fraction`` of channels from every wrapped conv
    of ``model`` (output side, then input side), in place; return the widths."""
    return prune_layers(model, dict.fromkeys(wrapped_layers(model), fraction), method,
                        min_channels=min_channels, seed=seed)
