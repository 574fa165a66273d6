"""Params and FLOPs of a wrapped network as it will be saved, and its reductions
(docs/algorithms.md §5); the measured latency of its layers (``LayerLatencies``).

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
from typing import Callable

import torch
from torch import nn

from hbgs.accounting import count_macs, count_params, measure_latencies
from hbgs.errors import HbgsError
from hbgs.pruning.activations import evaluating
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


# -- measured latency, the cost criterion.score=error_per_latency divides by -------------------

LATENCY_BATCH = 64  # the batch the latency reports quote (hbgs.accounting.measure_latencies)


def time_layer(layer: nn.Module, input_shape: tuple[int, ...],
               layout: torch.memory_format = torch.contiguous_format) -> float:
    """Median seconds of one forward pass of a copy of ``layer`` on a random input of
    ``input_shape`` (batch first) in ``layout``, where the layer's weights are, at torch's
    current threads."""
    device = next(layer.parameters()).device.type
    latency = measure_latencies({"layer": copy.deepcopy(layer)}, batch_sizes=(input_shape[0],),
                                input_size=input_shape[1:], device=device, input_memory_format=layout)
    return latency["median_ms"]["layer"][str(input_shape[0])] / 1000


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels-last for a 4-D tensor stored that way (``hbgs.devices.fast_layout``), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def timed_layers(module: nn.Module, input_size) -> list[tuple[nn.Module, tuple[int, ...], torch.memory_format]]:
    """Every conv and linear layer ``module`` runs on one input of ``input_size`` (no batch),
    with the shape (no batch) and layout of its input, in the order they run; modes restored."""
    seen = []
    hooks = [m.register_forward_pre_hook(
                 lambda m, args: seen.append((m, tuple(args[0].shape[1:]), layout_of(args[0]))))
             for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    param = next(module.parameters())
    x = torch.zeros(1, *input_size, dtype=param.dtype, device=param.device)
    if param.dim() == 4 and layout_of(param) == torch.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # as the model's own inputs are
    try:
        with evaluating(module):
            module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def layer_key(layer: nn.Module, input_shape: tuple[int, ...], layout: torch.memory_format) -> str:
    """What a layer's time depends on, as a ``LayerLatencies`` table key."""
    param = next(layer.parameters())
    return f"{layer!r} on {list(input_shape)} {layout} {param.dtype} {param.device.type}"


class LayerLatencies:
    """A network's latency as the sum of its conv and linear layers' measured times: each layer
    shape (the layer's repr, which names its channels, kernel, stride and groups; its input's
    shape and layout; dtype; device) is timed once, at batch ``LATENCY_BATCH``, when first met, and looked up
    after that. Candidates that change only a few layers then differ only by those layers' times,
    never by the noise of timing the rest again. Elementwise work (BatchNorm, ReLU, additions)
    is not counted: it is small beside the convs, and export folds BatchNorm into them.

    ``timer(layer, input_shape, layout) -> seconds`` defaults to ``time_layer`` (tests plant
    their own)."""

    def __init__(self, original: nn.Module, input_size=(3, 32, 32), batch: int = LATENCY_BATCH,
                 timer: Callable[..., float] = time_layer):
        self.input_size, self.batch, self.timer = tuple(input_size), batch, timer
        self.table: dict[str, float] = {}  # layer shape → seconds
        self.original = self.seconds(original)

    def seconds(self, module: nn.Module, input_size=None) -> float:
        """``module``'s conv and linear layers' times summed, on inputs of ``input_size``
        (default: the network's) at the table's batch."""
        total = 0.0
        for layer, shape, layout in timed_layers(module, input_size or self.input_size):
            key = layer_key(layer, shape, layout)
            if key not in self.table:
                self.table[key] = self.timer(layer, (self.batch, *shape), layout)
            total += self.table[key]
        return total

    def fraction(self, module: nn.Module, input_size=None) -> float:
        """``seconds(module)`` as a fraction of the original network's."""
        return self.seconds(module, input_size) / self.original

    def state(self) -> dict:
        """Plain data (JSON) for ``restore``: a resumed run reuses the timings, so it makes the
        choices the uninterrupted run would have made."""
        return {"table": dict(self.table), "original": self.original}

    def restore(self, state: dict) -> None:
        self.table, self.original = dict(state["table"]), state["original"]

    def summary(self) -> dict:
        """What the table holds, for a run's summary: every timed layer shape in milliseconds."""
        return {"shapes_timed": len(self.table), "batch": self.batch, "original_ms": 1000 * self.original,
                "ms": {key: 1000 * seconds for key, seconds in self.table.items()}}
