"""Remove channels of one wrapped conv and compensate through its adapters
(docs/algorithms.md §1.2).

``propose`` chooses channels without changing anything; ``pruned`` builds the pruned layer as a
new module (the original is untouched, so a candidate can be tried and dropped); ``apply`` does
it in place; ``prune_conv`` is propose + apply by layer name. New parameters are created, so an
optimizer built before pruning must be rebuilt.

Grouped convs: filters of different groups see disjoint input channels, so each group is
pruned and compensated on its own (block-diagonal ``Λ``) and every group loses the same number
of channels, which keeps the conv's groups valid.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from hbgs.pruning.adapters import AdaptedConv
from hbgs.pruning.selectors import Selection, select_filters

SIDES = ("out", "in")


def filter_matrices(layer: AdaptedConv | nn.Conv2d, side: str) -> list[torch.Tensor]:
    """The current conv's filters on ``side``, one matrix per group (one row per channel).

    ``out``: rows are the output filters ``W[o].flatten()``; ``in``: rows are the input-channel
    slices ``h_c = W[:, c].flatten()`` (over the outputs of the channel's group). Row ``r`` of
    group ``j`` is channel ``j·(width/groups) + r`` of the conv.
    """
    conv = _conv(layer)
    _check_side(side)
    weight = conv.weight.detach()
    per_group = conv.out_channels // conv.groups
    blocks = weight.split(per_group)  # (C_out/g, C_in/g, K, K) each
    if side == "out":
        return [block.flatten(1) for block in blocks]
    return [block.transpose(0, 1).flatten(1) for block in blocks]


def filter_matrix(layer: AdaptedConv | nn.Conv2d, side: str) -> torch.Tensor:
    """``filter_matrices`` for an ungrouped conv: the one matrix ``F`` of its filters on ``side``."""
    matrices = filter_matrices(layer, side)
    if len(matrices) != 1:
        raise ValueError(f"this conv has {len(matrices)} groups; use filter_matrices() and "
                         "select within each group")
    return matrices[0]


def propose(layer: AdaptedConv | nn.Conv2d, side: str, n_remove: int, method: str = "backward",
            *, seed: int = 0) -> Selection:
    """Choose ``n_remove`` channels of ``layer``'s conv on ``side`` to remove; changes nothing.

    The returned ``Selection`` covers all current channels on that side (``coef`` is
    block-diagonal over groups; group ``j`` uses seed ``seed + j``).
    """
    conv = _conv(layer)
    _check_side(side)
    width = conv.out_channels if side == "out" else conv.in_channels
    groups = conv.groups
    if isinstance(n_remove, bool) or not isinstance(n_remove, int) or not 1 <= n_remove < width:
        raise ValueError(f"n_remove must be an integer between 1 and {width - 1} (the conv has "
                         f"{width} channels on the {side} side and keeps at least one), "
                         f"got {n_remove!r}")
    if n_remove % groups:
        raise ValueError(f"the conv has {groups} groups: n_remove must be a multiple of "
                         f"{groups} (the same number from each group), got {n_remove}")
    keep_per_group = (width - n_remove) // groups
    selections = [select_filters(F, keep_per_group, method, seed=seed + j)
                  for j, F in enumerate(filter_matrices(conv, side))]
    return combine(selections, width // groups)


def pruned(layer: AdaptedConv, side: str, selection: Selection) -> AdaptedConv:
    """A new ``AdaptedConv``: ``layer`` with only the channels ``selection.keep`` on ``side`` and
    the removed ones compensated through the adapter (``G' = G Λ`` and bias ``β + G(b − Λ b_S)``
    on the out side, ``P' = Λᵀ P`` on the in side). ``layer`` is not modified."""
    if not isinstance(layer, AdaptedConv):
        raise TypeError(f"expected an AdaptedConv (call wrap_model first), got "
                        f"{type(layer).__name__}")
    _check_side(side)
    conv = layer.conv
    width = conv.out_channels if side == "out" else conv.in_channels
    keep = selection.keep.to(conv.weight.device)
    coef = selection.coef.to(conv.weight.device, torch.float64)
    if coef.shape != (width, keep.numel()):
        raise ValueError(f"the selection is for {coef.shape[0]} channels but the conv has "
                         f"{width} on the {side} side (did its weights change since propose?)")
    per_group = keep.div(width // conv.groups, rounding_mode="floor").bincount(
        minlength=conv.groups)
    if (per_group != per_group[0]).any():
        raise ValueError(f"the conv has {conv.groups} groups and must keep the same number of "
                         f"channels in each; the selection keeps {per_group.tolist()}")
    if side == "out":
        return AdaptedConv(_conv_rows(conv, keep), copy.deepcopy(layer.in_adapter),
                           _compensated_out_adapter(layer, keep, coef))
    return AdaptedConv(_conv_input_channels(conv, keep), _compensated_in_adapter(layer, coef),
                       copy.deepcopy(layer.out_adapter))


def uncompensated(layer: AdaptedConv | nn.Conv2d, side: str, selection: Selection) -> Selection:
    """``selection``'s kept channels with plain removal instead of compensation: ``Λ`` keeps
    only the unit rows of the kept channels, so a removed output channel computes zero (its
    filter zeroed; a conv bias stays) and a removed input channel is ignored. The baseline
    that compensation is measured against; ``error`` is the removed filters' squared norm."""
    coef = torch.zeros_like(selection.coef)
    coef[selection.keep, torch.arange(len(selection.keep))] = 1.0
    filters = torch.cat(filter_matrices(layer, side)).to("cpu", torch.float64)  # as the selection
    error = float(filters[selection.removed].pow(2).sum())
    return Selection(selection.keep, coef, error, selection.order, f"{selection.method}-removal")


def apply(layer: AdaptedConv, side: str, selection: Selection) -> None:
    """``pruned`` in place: ``layer`` gets the pruned conv and compensated adapters."""
    new = pruned(layer, side, selection)
    layer.in_adapter, layer.conv, layer.out_adapter = new.in_adapter, new.conv, new.out_adapter


def prune_conv(model: nn.Module, name: str, side: str, n_remove: int, method: str = "backward",
               *, seed: int = 0) -> Selection:
    """Remove ``n_remove`` channels on ``side`` of the wrapped conv ``name`` of ``model``, with
    compensation; return the ``Selection`` used. ``model`` may be the ``AdaptedConv`` itself
    with ``name=""``."""
    layer = model.get_submodule(name)
    if not isinstance(layer, AdaptedConv):
        raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not a wrapped conv; call "
                        "wrap_model(model) first and use one of the names it returns")
    selection = propose(layer, side, n_remove, method, seed=seed)
    apply(layer, side, selection)
    return selection


def combine(selections: list[Selection], group_width: int) -> Selection:
    """One Selection over all channels from per-group Selections (block-diagonal ``coef``)."""
    if len(selections) == 1:
        return selections[0]
    offsets = [j * group_width for j in range(len(selections))]
    keep = torch.cat([s.keep + o for s, o in zip(selections, offsets)])
    coef = torch.block_diag(*[s.coef for s in selections])
    order = None
    if all(s.order is not None for s in selections):  # round-robin: prefixes stay balanced
        order = torch.stack([s.order + o for s, o in zip(selections, offsets)], 1).flatten()
    return Selection(keep, coef, sum(s.error for s in selections), order, selections[0].method)


def _conv_rows(conv: nn.Conv2d, keep: torch.Tensor) -> nn.Conv2d:
    new = _conv_like(conv, conv.in_channels, keep.numel())
    with torch.no_grad():
        new.weight.copy_(conv.weight[keep])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[keep])
    return new


def _conv_input_channels(conv: nn.Conv2d, keep: torch.Tensor) -> nn.Conv2d:
    new = _conv_like(conv, keep.numel(), conv.out_channels)
    in_per_group, out_per_group = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    local = keep.view(conv.groups, -1) % in_per_group  # kept input channels within each group
    rows = torch.arange(conv.out_channels, device=keep.device)
    columns = local.repeat_interleave(out_per_group, dim=0)  # (C_out, kept per group)
    with torch.no_grad():
        new.weight.copy_(conv.weight[rows[:, None], columns])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _compensated_out_adapter(layer: AdaptedConv, keep, coef) -> nn.Conv2d:
    conv, old = layer.conv, layer.out_adapter
    G = _adapter_matrix(old, conv.out_channels, conv.weight)
    beta = torch.zeros(G.shape[0], dtype=torch.float64, device=G.device)
    if old is not None and old.bias is not None:
        beta = old.bias.detach().to(torch.float64)
    if conv.bias is not None:  # the constant the kept filters' biases do not reproduce
        b = conv.bias.detach().to(torch.float64)
        beta = beta + G @ (b - coef @ b[keep])
    return _adapter(G @ coef, beta, like=conv.weight)


def _compensated_in_adapter(layer: AdaptedConv, coef) -> nn.Conv2d:
    conv = layer.conv
    P = _adapter_matrix(layer.in_adapter, conv.in_channels, conv.weight)
    return _adapter(coef.T @ P, None, like=conv.weight)


def _adapter_matrix(adapter: nn.Conv2d | None, width: int, like: torch.Tensor) -> torch.Tensor:
    """The adapter's weight as a float64 matrix; the identity for an absent adapter."""
    if adapter is None:
        return torch.eye(width, dtype=torch.float64, device=like.device)
    return adapter.weight.detach().flatten(1).to(torch.float64)


def _adapter(matrix: torch.Tensor, bias: torch.Tensor | None, *, like) -> nn.Conv2d:
    out_channels, in_channels = matrix.shape
    adapter = nn.Conv2d(in_channels, out_channels, 1, bias=bias is not None, device=like.device,
                        dtype=like.dtype)
    with torch.no_grad():
        adapter.weight.copy_(matrix.view(out_channels, in_channels, 1, 1))
        if bias is not None:
            adapter.bias.copy_(bias)
    return adapter


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with ``conv``'s hyper-parameters and the given widths."""
    return nn.Conv2d(in_channels, out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype)


def _conv(layer) -> nn.Conv2d:
    conv = layer.conv if isinstance(layer, AdaptedConv) else layer
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an AdaptedConv or nn.Conv2d, got {type(layer).__name__}")
    return conv


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
