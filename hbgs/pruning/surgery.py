"""Structural surgery (``surgery=remove``): channels leave the network for real.

The paper's adapters keep every activation at its original width, so the FLOPs they save do not
become time saved. Here a pruning step removes a set of *coupled* channels everywhere they
appear: the producing convs' filters, their BatchNorm channels, and the matching input slices of
every consumer, across residual additions and concatenations. Which channels are coupled is
Torch-Pruning's ``DependencyGraph`` business (it traces the network once per call, tens of ms
for a CIFAR ResNet); this module decides *which* channels go and compensates for them.

* **Which channels**: the lower-level selectors (FP-Backward, FP-OMP, norms, random) run on the
  group's root filters (the conv or linear whose output channels define the group), exactly as
  on the output side of a wrapped conv.
* **Compensation**: with no adapter to absorb them, each removed input channel ``x_r`` of a
  consumer is replaced by its best linear fit from the kept ones, ``x_r ≈ Σ_k A_rk x_k``, fitted
  by least squares over every pixel of the calibration batch at that consumer's input, and
  folded into the consumer's remaining weights: ``W'[:, k] = W[:, k] + Σ_r A_rk W[:, r]``.
  Exact when the removed channel is a linear combination of the kept ones at that point (a
  linear, bias-free path from a dependent filter); the best linear fit otherwise. No intercept:
  a constant would be wrong at the consumer's zero padding. Grouped consumers (depthwise) only
  lose the channels; they are compensated where their outputs are consumed.

Everything here is plain PyTorch on a plain (unwrapped) model: no Hydra, no adapters.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hbgs.errors import HbgsError
from hbgs.pruning.compensation import combine, propose
from hbgs.pruning.selectors import RIDGE, Selection, select_filters

# How a pruning run takes channels away: the paper's 1×1 adapters, or removal for real (here).
SURGERIES = ("adapters", "remove")
# A consumer whose input has more features than this is not compensated (its Gram matrix would
# not fit in memory: torchvision VGG's first Linear reads 25,088 features).
MAX_COMPENSATED_WIDTH = 8192


def require_torch_pruning(what: str = "surgery=remove"):
    """The ``torch_pruning`` module, or an HbgsError naming the fix."""
    try:
        import torch_pruning
    except ImportError as err:
        raise HbgsError(f"{what} needs Torch-Pruning, which is not installed: "
                        "pip install torch-pruning") from err
    return torch_pruning


@dataclass(frozen=True)
class ChannelGroup:
    """A set of coupled channels, named by its root: the module whose output channels index it.

    ``width``: the root's current output channels; ``groups``: the root conv's groups (removal
    counts are multiples of it); ``members``: names of every module that loses channels with it;
    ``consumers``: the modules whose input loses them and that are compensated.
    """

    root: str
    width: int
    groups: int
    members: tuple[str, ...]
    consumers: tuple[str, ...]


def output_layer(model: nn.Module, example_input: torch.Tensor) -> str | None:
    """Name of the conv or linear whose output is the network's output (the classifier, whose
    output channels are the classes and never pruned); None when there is no such module."""
    found = []
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: found.append((name, out)))
               for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            output = model(example_input)
            model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return next((name for name, out in reversed(found) if out is output), None)


def dependency_graph(model: nn.Module, example_input: torch.Tensor):
    """Torch-Pruning's ``DependencyGraph`` of ``model`` (traced on ``example_input``). It traces
    through autograd, so gradients are switched on for the trace (and restored after)."""
    tp = require_torch_pruning()
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    except Exception as err:
        raise HbgsError(f"Torch-Pruning cannot trace {type(model).__name__} "
                        f"({type(err).__name__}: {err}); surgery=remove needs a traceable model: "
                        "use surgery=adapters") from err
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(False)


class ChannelSurgery:
    """The channel groups of one model and the means to remove channels from them.

    ``example_input``: one input batch (e.g. ``calib_x[:1]``) to trace with. ``ignored``:
    modules whose output channels must stay (default: the classifier). Groups are found afresh
    on every call, so the object stays valid as the model shrinks.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor,
                 ignored: Iterable[str] | None = None):
        self.model, self.example_input = model, example_input
        if ignored is None:
            classifier = output_layer(model, example_input)
            ignored = [classifier] if classifier else []
        self.ignored = tuple(ignored)
        self._consistent: dict[str, bool] = {}  # root → its removal keeps the network valid
        self._graph = None

    # -- groups -----------------------------------------------------------------------------

    def groups(self) -> list[ChannelGroup]:
        """Every prunable channel group of the model as it is now, in module order."""
        names = {m: n for n, m in self.model.named_modules()}
        ignored = [self.model.get_submodule(n) for n in self.ignored]
        found = self.graph.get_all_groups(ignored_layers=ignored,
                                     root_module_types=[nn.Conv2d, nn.Linear])
        groups = []
        for group in found:
            root_module = group[0].dep.target.module
            if root_module not in names:
                continue
            described = _describe(group, self.model, names, root_module)
            if self._removal_is_consistent(described):
                groups.append(described)
        order = {n: i for i, n in enumerate(names.values())}
        return sorted(groups, key=lambda g: order[g.root])

    def _removal_is_consistent(self, group: ChannelGroup) -> bool:
        """Whether removing a channel of ``group`` leaves a network that runs and gives outputs
        of the same shape. Torch-Pruning cannot resize what it does not see as a layer, e.g. the
        zero-padding of the CIFAR ResNets' option-A shortcuts (``F.pad`` by a fixed count), so
        such residual streams are not offered. Checked once per root."""
        if group.root not in self._consistent:
            try:
                spaced = range(0, group.width, group.width // group.groups)  # one per group
                clone, _ = self.removed_copy(group.root, list(spaced))
                with torch.no_grad():
                    clone.eval()
                    consistent = clone(self.example_input).shape == self._output_shape()
            except Exception:  # any failure to run means the group cannot be removed alone
                consistent = False
            self._consistent[group.root] = consistent
        return self._consistent[group.root]

    def _output_shape(self) -> torch.Size:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.model(self.example_input).shape
        finally:
            self.model.train(was_training)

    def propose(self, group: ChannelGroup, n_remove: int, method: str = "backward", *,
                seed: int = 0) -> Selection:
        """Which ``n_remove`` of the group's root output channels to remove, chosen by ``method``
        on the root's filters (the same count from each of ``group.groups`` consecutive blocks,
        each block selected on its own); changes nothing."""
        module = self.model.get_submodule(group.root)
        blocks = group.groups
        if n_remove % blocks or not 1 <= n_remove < group.width:
            raise HbgsError(f"cannot remove {n_remove} of the {group.width} channels of "
                            f"{group.root}: give a count in [1, {group.width - 1}] that is a "
                            f"multiple of {blocks} (a grouped conv reads these channels)")
        if isinstance(module, nn.Conv2d) and 1 < module.groups == blocks:
            return propose(module, "out", n_remove, method, seed=seed)  # balanced per group
        filters = module.weight.detach().flatten(1)
        per_block = group.width // blocks
        keep = per_block - n_remove // blocks
        selections = [select_filters(block, keep, method, seed=seed + j)
                      for j, block in enumerate(filters.split(per_block))]
        return combine(selections, per_block)

    def remove(self, root: str, removed: Sequence[int], calib_x: torch.Tensor | None = None, *,
               grams: dict | None = None) -> dict[str, list[int]]:
        """Remove the root's output channels ``removed`` and everything coupled to them, in
        place. With ``calib_x`` (or precomputed ``grams`` from ``input_grams``) each consumer is
        compensated by the least-squares fit of its removed inputs from its kept ones; without,
        the channels are simply dropped. Returns ``{module: output channels removed}`` for
        every member that lost output channels (indices before the removal)."""
        group, items = self._plan(root, removed)
        weights = self._compensated_weights(self.model, items, calib_x, grams)
        group.prune()  # through the graph, which keeps its index bookkeeping for later removals
        self._write(self.model, weights)
        return _lost_outputs(items)

    def removed_copy(self, root: str, removed: Sequence[int], calib_x=None, *,
                     grams: dict | None = None) -> tuple[nn.Module, dict[str, list[int]]]:
        """A deep copy of the model with ``remove`` applied, and what ``remove`` returned; the
        model itself is unchanged. The copy is cut by replaying the group's per-module pruning
        functions on the copy's modules of the same names (no new trace)."""
        _, items = self._plan(root, removed)
        clone = copy.deepcopy(self.model)
        weights = self._compensated_weights(clone, items, calib_x, grams)
        for name, handler, idxs in items:
            handler(clone.get_submodule(name), idxs)
        self._write(clone, weights)
        return clone, _lost_outputs(items)

    @property
    def graph(self):
        """The dependency graph, traced once; ``remove`` keeps it in step with the model."""
        if self._graph is None:
            self._graph = dependency_graph(self.model, self.example_input)
        return self._graph

    def _plan(self, root: str, removed: Sequence[int]):
        """The Torch-Pruning group removing ``removed`` from ``root`` and its items as
        ``(module name, pruning function, indices)``."""
        tp = require_torch_pruning()
        removed = sorted(set(int(i) for i in removed))
        root_module = self.model.get_submodule(root)
        handler = (tp.prune_conv_out_channels if isinstance(root_module, nn.Conv2d)
                   else tp.prune_linear_out_channels)
        group = self.graph.get_pruning_group(root_module, handler, idxs=removed)
        if not self.graph.check_pruning_group(group):
            raise HbgsError(f"removing {len(removed)} channels of {root} would leave a layer "
                            "with none; remove fewer")
        return group, _named_items(group, {m: n for n, m in self.model.named_modules()})

    @staticmethod
    def _compensated_weights(model, items, calib_x, grams) -> dict[str, torch.Tensor]:
        """The consumers' new weights over their kept inputs (before anything is cut)."""
        consumers = _compensated_consumers(model, items)
        if grams is None and calib_x is not None:
            grams = input_grams(model, calib_x, [name for name, _ in consumers])
        return {name: _compensated_weight(model.get_submodule(name), grams[name], idxs)
                for name, idxs in consumers if grams and grams.get(name) is not None}

    @staticmethod
    def _write(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, weight in weights.items():
                model.get_submodule(name).weight.copy_(weight)


def _lost_outputs(items) -> dict[str, list[int]]:
    return {name: sorted(set(idxs)) for name, handler, idxs in items
            if handler.__name__ == "prune_out_channels"}


class _InputsCollected(Exception):
    """Raised by the last hook ``input_grams`` needs: the rest of the forward is not run."""


def input_grams(model: nn.Module, calib_x: torch.Tensor, names: Iterable[str], *,
                chunk_size: int = 256) -> dict[str, torch.Tensor | None]:
    """``{name: XᵀX}`` over every pixel (conv) or sample (linear) of the calibration batch, for
    the inputs of the modules ``names``, in float64; None for one wider than
    ``MAX_COMPENSATED_WIDTH`` or a grouped conv (not compensated). Each forward stops once
    every named module has read its input."""
    grams: dict[str, torch.Tensor | None] = {}
    for name in dict.fromkeys(names):
        module = model.get_submodule(name)
        width = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
        compensated = width <= MAX_COMPENSATED_WIDTH and getattr(module, "groups", 1) == 1
        grams[name] = (torch.zeros(width, width, dtype=torch.float64, device=calib_x.device)
                       if compensated else None)
    pending: set[str] = set()

    def accumulate(module, args, name):
        x = args[0].detach()
        x = (x.transpose(0, 1).flatten(1) if x.dim() == 4 else x.flatten(0, -2).T).double()
        grams[name] += x @ x.T
        pending.discard(name)
        if not pending:
            raise _InputsCollected

    needed = [name for name, gram in grams.items() if gram is not None]
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: accumulate(module, args, name)) for name in needed]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(calib_x) if needed else 0, chunk_size):
                pending.update(needed)
                try:
                    model(calib_x[start:start + chunk_size])
                except _InputsCollected:
                    pass
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return grams


def _compensated_weight(module: nn.Module, gram: torch.Tensor, removed) -> torch.Tensor:
    """``module``'s weight over its kept input channels with the removed ones folded in
    through the least-squares fit ``x_r ≈ A x_k`` (``A = G_rk G_kk⁻¹``)."""
    width = gram.shape[0]
    removed = torch.as_tensor(sorted(set(removed)), dtype=torch.long, device=gram.device)
    kept_mask = torch.ones(width, dtype=torch.bool, device=gram.device)
    kept_mask[removed] = False
    kept = kept_mask.nonzero().flatten()
    g_kk = gram[kept][:, kept]
    ridge = RIDGE * g_kk.diagonal().mean().clamp_min(1e-30)
    g_kk = g_kk + ridge * torch.eye(len(kept), dtype=gram.dtype, device=gram.device)
    fit = torch.linalg.solve(g_kk, gram[kept][:, removed]).T  # (removed, kept)
    weight = module.weight.detach().to(torch.float64)
    if weight.dim() == 4:
        folded = weight[:, kept] + torch.einsum("orhw,rk->okhw", weight[:, removed], fit)
    else:
        folded = weight[:, kept] + weight[:, removed] @ fit
    return folded.to(module.weight.dtype)


def _named_items(group, names: dict) -> list[tuple[str, object, list[int]]]:
    """``group``'s items on the model's own modules as ``(name, pruning function, indices)``
    (Torch-Pruning's internal operation nodes left out)."""
    return [(names[item.dep.target.module], item.dep.handler, list(map(int, item.idxs)))
            for item in group if item.dep.target.module in names]


def _compensated_consumers(model: nn.Module, items) -> list[tuple[str, list[int]]]:
    """(name, input channels removed) of every ungrouped conv or linear among ``items`` that
    loses inputs: the consumers compensation refits."""
    tp = require_torch_pruning()
    return [(name, idxs) for name, handler, idxs in items
            if handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
            and getattr(model.get_submodule(name), "groups", 1) == 1]


def _describe(group, model: nn.Module, names: dict, root_module: nn.Module) -> ChannelGroup:
    items = _named_items(group, names)
    members = tuple(dict.fromkeys(name for name, _, _ in items))
    consumers = tuple(name for name, _ in _compensated_consumers(model, items))
    width = root_module.out_channels if isinstance(root_module, nn.Conv2d) else \
        root_module.out_features
    # Grouped convs among the members need the same count removed from each of their groups;
    # a depthwise conv (one channel per group) loses whole groups and sets no constraint.
    groups = 1
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.Conv2d) and 1 < module.groups < max(module.in_channels,
                                                                      module.out_channels):
            groups = math.lcm(groups, module.groups)
    return ChannelGroup(names[root_module], width, groups, members, consumers)


def layer_widths(model: nn.Module, original: nn.Module) -> dict[str, dict[str, int]]:
    """``{name: {in_original, in_current, out_original, out_current}}`` for every conv and
    linear of ``model`` whose width differs from ``original``'s (the structural analogue of
    ``channel_widths``)."""
    originals = dict(original.named_modules())
    widths = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or name not in originals:
            continue
        before = originals[name]
        current = _io(module)
        if current != _io(before):
            widths[name] = {"in_original": _io(before)[0], "in_current": current[0],
                            "out_original": _io(before)[1], "out_current": current[1]}
    return widths


def _io(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features
