"""Params and FLOPs of a wrapped network as it will be saved, and its reductions
(docs/algorithms.md §5).

"As saved" means after ``fold_identity_adapters``: sides never pruned carry no adapter, pruned
sides keep theirs and pay for them. FLOPs are multiply-accumulates (MACs) of conv and linear
layers for one image of ``input_size`` (``hbgs.accounting.count_macs``). Reductions are in %
against the ORIGINAL network (the figure hbgs reports) and, labelled, against the
adapter-augmented network (identity adapters on every prunable conv), the figure the reference
code reported, which flatters the reduction.
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass

from torch import nn

from hbgs.accounting import count_macs, count_params
from hbgs.errors import HbgsError
from hbgs.pruning.adapters import fold_identity_adapters, with_identity_adapters


@dataclass(frozen=True)
class ReferenceCosts:
    """Params and FLOPs of the original network and of its adapter-augmented version."""

    params_original: int
    flops_original: int
    params_augmented: int
    flops_augmented: int
    input_size: tuple[int, ...]

    @classmethod
    def measure(cls, original: nn.Module, input_size=(3, 32, 32)) -> "ReferenceCosts":
        """Count ``original`` (unwrapped, unpruned) and a wrapped copy of it."""
        augmented = with_identity_adapters(original)
        return cls(count_params(original), count_macs(original, input_size),
                   count_params(augmented), count_macs(augmented, input_size), tuple(input_size))


@dataclass(frozen=True)
class NetworkCost:
    """Params and FLOPs (MACs, one image) of a network, with reductions in %."""

    params: int
    flops: int
    params_reduction: float  # against the original network
    flops_reduction: float
    params_reduction_vs_augmented: float  # against the adapter-augmented network
    flops_reduction_vs_augmented: float

    @classmethod
    def of(cls, params: int, flops: int, reference: ReferenceCosts) -> "NetworkCost":
        return cls(params, flops,
                   _reduction(params, reference.params_original),
                   _reduction(flops, reference.flops_original),
                   _reduction(params, reference.params_augmented),
                   _reduction(flops, reference.flops_augmented))

    def reduction(self, metric: str) -> float:
        """``params_reduction`` or ``flops_reduction`` for ``metric`` "params" / "flops"."""
        return self.params_reduction if metric == "params" else self.flops_reduction


def as_saved(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with identity adapters folded away (``model`` is not changed)."""
    saved = copy.deepcopy(model)
    fold_identity_adapters(saved)
    return saved


def saved_cost(model: nn.Module, reference: ReferenceCosts) -> NetworkCost:
    """The cost of ``model`` as it will be saved: a folded copy counted (about 0.05 s for a
    wrapped ResNet-56 on one CPU core, so cheap enough for every pruning round)."""
    saved = as_saved(model)
    return NetworkCost.of(count_params(saved), count_macs(saved, reference.input_size), reference)


def parse_target(target_params: float | None, target_flops: float | None) -> tuple[str, float]:
    """``("params" | "flops", target)`` from the two keyword targets (% reduction against the
    original network), exactly one of which must be given and positive; else an HbgsError."""
    if (target_params is None) == (target_flops is None):
        raise HbgsError("give exactly one target: target_params or target_flops, a % "
                        "reduction against the original network (e.g. target_params=50)")
    metric, target = ("params", target_params) if target_params is not None else \
        ("flops", target_flops)
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not target > 0:
        raise HbgsError(f"target_{metric}={target!r}: give a reduction in % greater than 0 "
                        f"(e.g. 50 for half the {metric} of the original network)")
    return metric, float(target)


def check_not_met(cost: NetworkCost, metric: str, target: float) -> None:
    """HbgsError when ``cost`` already meets the target: pruning would have nothing to do."""
    if cost.reduction(metric) >= target:
        raise HbgsError(f"target_{metric}={target:g}% is already met: the network has "
                        f"{cost.reduction(metric):.2f}% fewer {metric} than the original; "
                        "give a larger target")


def _reduction(value: int, baseline: int) -> float:
    return 100.0 * (1.0 - value / baseline)
