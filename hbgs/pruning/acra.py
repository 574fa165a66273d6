"""ACRA baselines: how much to prune each layer, found by binary search (docs/algorithms.md §3).

* ``uniform_allocation``: one ratio ``r`` for every wrapped layer, both sides.
* ``sensitivity_allocation``: each layer's calibration-accuracy drop when only it is pruned at
  ratios 0.1…0.9; a global knob ``t`` gives every layer the largest ratio up to which its drop
  stays ≤ ``t`` (less sensitive layers lose more).

Both search for the smallest knob whose network meets a params or FLOPs target (% reduction
against the original network, measured on the actually pruned network as saved), and work with
any lower-level selector. A ratio ``r`` removes ``round(r · width)`` channels from the output
side, then from the input side, of a conv (compensated through its adapters), keeping at least
``min_channels`` (rounded to whole groups for grouped convs; ``ratios.py``).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hbgs.devices import full_precision
from hbgs.errors import HbgsError, check_choice
from hbgs.pruning.activations import FullNetworkEvaluator, WorkStats
from hbgs.pruning.adapters import wrapped_layers
from hbgs.pruning.costs import (NetworkCost, ReferenceCosts, check_not_met, parse_target,
                                saved_cost)
from hbgs.pruning.ratios import fraction_pruned, prune_layers
from hbgs.pruning.removal import remove_by_ratios
from hbgs.pruning.scoring import accuracy, loss
from hbgs.pruning.selectors import METHODS
from hbgs.pruning.suffix import SuffixCache
from hbgs.pruning.surgery import SURGERIES, ChannelGroup, ChannelSurgery

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MEASURES = ("accuracy", "loss")


# -- results ----------------------------------------------------------------------------------

@dataclass
class Allocation:
    """A pruned copy of the model meeting (or nearest above) the target.

    ``reduction`` is the achieved % reduction of ``metric`` against the original network;
    ``within_tolerance`` says whether it lies in ``[target, target + tolerance]`` (% points).
    Reductions move in steps (whole channels), so when no knob value lands inside, the
    smallest knob meeting the target is returned and ``below``, the nearest reduction found
    under the target, shows the gap no knob value fills.
    """

    model: nn.Module
    ratios: dict[str, float]
    cost: NetworkCost
    metric: str
    target: float
    tolerance: float
    reduction: float
    within_tolerance: bool
    below: float  # the largest reduction under the target among the knobs tried
    evaluations: int


@dataclass
class UniformAllocation(Allocation):
    ratio: float = 0.0


@dataclass
class SensitivityTable:
    """``drops[layer][i]``: how much ``measure`` worsens (accuracy: % points lost; loss: CE
    gained) on the calibration batch when only ``layer`` is pruned at ``ratios[i]``."""

    measure: str
    base: float  # the measure of the unpruned network
    ratios: tuple[float, ...]
    drops: dict[str, list[float]]

    def allocation(self, threshold: float) -> dict[str, float]:
        """Each layer's largest ratio up to which every drop is ≤ ``threshold`` (0 when the
        smallest ratio already drops more). Measured drops are noisy and need not grow with
        the ratio; a large ratio that happens to look harmless after a smaller one did not is
        not trusted."""
        allocation = {}
        for layer, drops in self.drops.items():
            allocation[layer] = 0.0
            for ratio, drop in zip(self.ratios, drops):
                if drop > threshold:
                    break
                allocation[layer] = ratio
        return allocation


@dataclass
class SensitivityAllocation(Allocation):
    threshold: float = 0.0
    table: SensitivityTable | None = None


# -- uniform ----------------------------------------------------------------------------------

def uniform_allocation(model: nn.Module, original: nn.Module, *, target_params: float | None = None,
                       target_flops: float | None = None, method: str = "backward",
                       tolerance: float = 0.5, min_channels: int = 1,
                       input_size: Sequence[int] = (3, 32, 32), seed: int = 0,
                       resolution: float = 1e-4, surgery: str = "adapters",
                       calib_x: torch.Tensor | None = None) -> UniformAllocation:
    """ACRA uniform: the smallest ratio ``r`` (to ``resolution``) whose pruned network meets the
    target, by bisection on ``r ∈ [0, 1]``; stops early once the reduction lies within
    ``tolerance`` % points above the target. ``model`` (wrapped) is not changed: the result
    holds a pruned copy. ``surgery="remove"``: ``model`` unwrapped, the ratio applies to every
    channel group, compensated on ``calib_x`` (required)."""
    search = _Search(model, original, method, min_channels, seed, input_size, target_params,
                     target_flops, tolerance, surgery, calib_x)
    layers = search.layers
    # r = 0 (no pruning) falls short: _Search checked that the model does not meet the target.
    ratio = search.bisect(lambda r: dict.fromkeys(layers, r), 0.0, 1.0, resolution)
    return UniformAllocation(**search.result(), ratio=ratio)


# -- sensitivity ------------------------------------------------------------------------------

@full_precision()
def layer_sensitivity(model: nn.Module, calib_x: torch.Tensor, calib_y: torch.Tensor, *,
                      method: str = "backward", ratios: Sequence[float] = DEFAULT_RATIOS,
                      measure: str = "accuracy", min_channels: int = 1, seed: int = 0,
                      use_cache: bool = True, chunk_size: int | None = None,
                      stats: WorkStats | None = None) -> SensitivityTable:
    """Each wrapped layer's drop in calibration ``measure`` when only it is pruned (both sides)
    at each of ``ratios``; with ``use_cache`` only the part of the network after the layer
    runs for each (layer, ratio). ``model`` is not changed."""
    check_choice("measure", measure, MEASURES)
    check_choice("method", method, METHODS)
    _check_ratios(ratios)
    layers = wrapped_layers(model)
    kind = SuffixCache if use_cache else FullNetworkEvaluator
    evaluator = kind(model, calib_x, layers, chunk_size=chunk_size, stats=stats)
    evaluator.refresh()
    score = accuracy if measure == "accuracy" else loss
    base = score(evaluator.end_values(), calib_y)
    sign = 1.0 if measure == "accuracy" else -1.0  # a drop is lost accuracy or gained loss
    drops = {}
    with torch.no_grad():
        for name in layers:
            layer = model.get_submodule(name)
            drops[name] = [
                sign * (base - score(evaluator.end_values(name, fraction_pruned(
                    layer, r, method, min_channels=min_channels, seed=seed)), calib_y))
                for r in ratios]
    return SensitivityTable(measure, base, tuple(ratios), drops)


@full_precision()
def group_sensitivity(model: nn.Module, calib_x: torch.Tensor, calib_y: torch.Tensor,
                      groups: Sequence[ChannelGroup], *, method: str = "backward",
                      ratios: Sequence[float] = DEFAULT_RATIOS, measure: str = "accuracy",
                      min_channels: int = 1, seed: int = 0) -> SensitivityTable:
    """``layer_sensitivity`` for ``surgery="remove"``: each channel group's drop in calibration
    ``measure`` when only it loses each ratio of its channels (compensated); whole-network
    forwards. ``model`` is not changed."""
    score = accuracy if measure == "accuracy" else loss

    def measured(net):
        with torch.no_grad():
            net.eval()
            return score([(slice(None), net(calib_x))], calib_y)

    base = measured(copy.deepcopy(model))
    sign = 1.0 if measure == "accuracy" else -1.0
    drops = {}
    for group in groups:
        drops[group.root] = []
        for r in ratios:
            candidate = copy.deepcopy(model)
            remove_by_ratios(candidate, {group.root: r}, [group], method, calib_x,
                             min_channels=min_channels, seed=seed)
            drops[group.root].append(sign * (base - measured(candidate)))
    return SensitivityTable(measure, base, tuple(ratios), drops)


def sensitivity_allocation(model: nn.Module, original: nn.Module, calib_x: torch.Tensor,
                           calib_y: torch.Tensor, *, target_params: float | None = None,
                           target_flops: float | None = None, method: str = "backward",
                           ratios: Sequence[float] = DEFAULT_RATIOS, measure: str = "accuracy",
                           tolerance: float = 0.5, min_channels: int = 1,
                           input_size: Sequence[int] = (3, 32, 32), seed: int = 0,
                           use_cache: bool = True, chunk_size: int | None = None,
                           surgery: str = "adapters") -> SensitivityAllocation:
    """ACRA sensitivity: measure ``layer_sensitivity`` (on the calibration batch, never the
    test split), then by bisection over the measured drops a threshold ``t`` whose allocation
    ``table.allocation(t)`` meets the target: the smallest such with ``tolerance=0``, otherwise
    the first found within ``tolerance`` points of the target (fewer evaluations). ``model`` (wrapped) is not
    changed: the result holds a pruned copy, the ratios and the table. ``surgery="remove"``:
    ``model`` unwrapped, one sensitivity row per channel group (``group_sensitivity``)."""
    _check_ratios(ratios)
    check_choice("measure", measure, MEASURES)
    search = _Search(model, original, method, min_channels, seed, input_size, target_params,
                     target_flops, tolerance, surgery, calib_x)
    search.require(dict.fromkeys(search.layers, max(ratios)))  # before measuring
    if surgery == "remove":
        table = group_sensitivity(model, calib_x, calib_y, search.groups, method=method,
                                  ratios=ratios, measure=measure, min_channels=min_channels,
                                  seed=seed)
    else:
        table = layer_sensitivity(model, calib_x, calib_y, method=method, ratios=ratios,
                                  measure=measure, min_channels=min_channels, seed=seed,
                                  use_cache=use_cache, chunk_size=chunk_size)
    thresholds = sorted({d for drops in table.drops.values() for d in drops})
    # Index −1 stands for "prune nothing", which falls short (checked by _Search).
    index = search.bisect(lambda i: table.allocation(thresholds[i]), -1, len(thresholds) - 1)
    return SensitivityAllocation(**search.result(), threshold=thresholds[index], table=table)


class _Search:
    """Bisection on a knob whose allocation's reduction grows with it; remembers the best
    network meeting the target and the nearest reduction below it. The allocation maps wrapped
    layers (``surgery="adapters"``) or channel-group roots (``"remove"``) to ratios."""

    def __init__(self, model, original, method, min_channels, seed, input_size, target_params,
                 target_flops, tolerance, surgery="adapters", calib_x=None):
        check_choice("method", method, METHODS)
        check_choice("surgery", surgery, SURGERIES)
        if not tolerance >= 0:
            raise HbgsError(f"tolerance must be ≥ 0 % points, got {tolerance!r}")
        self.model, self.method, self.min_channels, self.seed = model, method, min_channels, seed
        self.metric, self.target = parse_target(target_params, target_flops)
        self.tolerance, self.surgery, self.calib_x = tolerance, surgery, calib_x
        if surgery == "remove":
            if calib_x is None:
                raise HbgsError("surgery='remove' compensates on calibration images: pass calib_x")
            self.groups = ChannelSurgery(model, calib_x[:1]).groups()
            if not self.groups:
                raise HbgsError(f"{type(model).__name__} has no channel group that can be removed")
            self.layers = [g.root for g in self.groups]
        else:
            self.layers = wrapped_layers(model)
        self.reference = ReferenceCosts.measure(original, input_size)
        current = saved_cost(model, self.reference)
        check_not_met(current, self.metric, self.target)
        self.best = None  # (model, ratios, cost) of the smallest knob meeting the target so far
        self.below = current.reduction(self.metric)  # where the knob's low end (no pruning) is
        self.evaluations = 0

    def bisect(self, allocation: Callable, low, high, resolution: float | None = None):
        """The smallest knob in ``(low, high]`` meeting the target (HbgsError if ``high`` does
        not); ``low`` must be known to fall short. ``resolution`` None: integer knobs."""
        self.require(allocation(high))
        while high - low > (resolution or 1) and not self._within_tolerance():
            middle = (low + high) / 2 if resolution else (low + high) // 2
            if self._meets(allocation(middle)):
                high = middle
            else:
                low = middle
        return high

    def require(self, ratios: dict[str, float]) -> None:
        """HbgsError unless the network pruned by ``ratios`` (the most this strategy prunes)
        meets the target."""
        if not self._meets(ratios):
            raise HbgsError(f"target_{self.metric}={self.target:g}% is out of reach: the most "
                            f"this strategy prunes (ratio {max(ratios.values()):g}, "
                            f"min_channels={self.min_channels}) gives {self.below:.2f}%")

    def result(self) -> dict:
        model, ratios, cost = self.best
        reduction = cost.reduction(self.metric)
        return dict(model=model, ratios=ratios, cost=cost, metric=self.metric, target=self.target,
                    tolerance=self.tolerance, reduction=reduction,
                    within_tolerance=self._within_tolerance(), below=self.below,
                    evaluations=self.evaluations)

    def _meets(self, ratios: dict[str, float]) -> bool:
        candidate = copy.deepcopy(self.model)
        if self.surgery == "remove":
            remove_by_ratios(candidate, ratios, self.groups, self.method, self.calib_x,
                             min_channels=self.min_channels, seed=self.seed)
        else:
            prune_layers(candidate, ratios, self.method, min_channels=self.min_channels,
                         seed=self.seed)
        cost = saved_cost(candidate, self.reference)
        self.evaluations += 1
        reduction = cost.reduction(self.metric)
        if reduction < self.target:
            self.below = max(self.below, reduction)
            return False
        self.best = (candidate, dict(ratios), cost)  # bisection only lowers a meeting knob
        return True

    def _within_tolerance(self) -> bool:
        return self.best is not None and \
            self.best[2].reduction(self.metric) - self.target <= self.tolerance


def _check_ratios(ratios: Sequence[float]) -> None:
    if not ratios or list(ratios) != sorted(set(ratios)) or not 0 < ratios[0] <= ratios[-1] <= 1:
        raise HbgsError(f"ratios must be distinct, ascending and in (0, 1], got {list(ratios)}")
