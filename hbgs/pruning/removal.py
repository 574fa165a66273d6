"""The upper level with structural surgery (``surgery=remove``): HBGS/HBGTS and the ACRA
baselines over channel groups instead of (wrapped layer, side) pairs.

A candidate is a channel group (``surgery.ChannelGroup``: a conv's output channels with every
module coupled to them) losing its next ``step`` channels, chosen by the lower-level selector on
the group's root filters and compensated by least squares at every consumer. A conv's "input
side" is the output side of the group that feeds it, so each group is one candidate.

Scores, on the calibration batch:

* ``hbgts``: as with adapters, the relative error of the end signal of the network with only
  that candidate applied against the ORIGINAL network (``features``: the last BatchNorm's output,
  where removed channels count as zeros; ``logits``; or the cross-entropy, ``loss``).
* ``hbgs``: the relative error of the group's consumers' outputs, candidate against the CURRENT
  network on the same inputs. (With adapters a layer keeps its original widths and is compared
  with the original network; here its neighbours' widths have changed, so the layer's own error
  is measured against what it computes now. A group without an ungrouped consumer is scored at
  the logits.)

Every candidate is scored on a copy of the network, so the whole network runs per candidate
(no suffix cache): cheap for CIFAR networks, whose groups are fewer than the adapter mode's
(layer, side) pairs.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from hbgs.accounting import count_macs, count_params
from hbgs.devices import full_precision
from hbgs.errors import HbgsError
from hbgs.pruning.costs import (LayerLatencies, NetworkCost, ReferenceCosts, check_not_met, parse_target,
                                saved_cost)
from hbgs.pruning.activations import WorkStats, capture, chunk_slices, evaluating, last_batchnorm
from hbgs.pruning.hierarchical import (COST_AWARE, RoundRecord, channels_to_remove, check_loop_arguments,
                                       latency_state, per_cost, restore_latencies, run_rounds,
                                       smallest_width)
from hbgs.pruning.ratios import fraction_count
from hbgs.pruning.scoring import loss, relative_error
from hbgs.pruning.surgery import ChannelGroup, ChannelSurgery, input_grams


def removed_channels(group: ChannelGroup, keep: torch.Tensor) -> list[int]:
    """The root's channels not in ``keep``."""
    return sorted(set(range(group.width)) - set(keep.tolist()))


class RemovalPruner:
    """``hierarchical_prune`` with ``surgery="remove"``: the same arguments and records, on an
    unwrapped ``model`` that is pruned structurally in place."""

    def __init__(self, model: nn.Module, original: nn.Module, calib_x: torch.Tensor,
                 calib_y: torch.Tensor | None, *, criterion: str = "hbgts",
                 signal: str = "features", method: str = "backward", step: int | float = 5,
                 min_channels: int = 1, input_size: Sequence[int] = (3, 32, 32), seed: int = 0,
                 chunk_size: int | None = None, score: str = "error"):
        self.step = check_loop_arguments(criterion, signal, method, score, step, min_channels,
                                         calib_x, calib_y, chunk_size)
        self.chunks = chunk_slices(len(calib_x), chunk_size)
        self.model, self.original, self.calib_x, self.calib_y = model, original, calib_x, calib_y
        self.criterion, self.method, self.seed, self.min_channels = criterion, method, seed, min_channels
        self.signal = signal if criterion == "hbgts" else None
        self.score, self.metric = score, "params"  # the metric error_per_cost divides by
        self.surgery = ChannelSurgery(model, calib_x[:1])
        self.reference = ReferenceCosts.measure(original, input_size)
        self.latencies = LayerLatencies(original, input_size) if score == "error_per_latency" else None
        self.stats = WorkStats()
        self.rounds = 0
        self._end = None  # the module whose output is the features signal
        self._end_kept = None  # its original channels still present
        self._original_signal = None

    def run(self, *, target_params: float | None = None, target_flops: float | None = None,
            callbacks: Iterable = (), max_rounds: int | None = None) -> list[RoundRecord]:
        """As ``HierarchicalPruner.run``."""
        metric, target = self.check_target(target_params, target_flops)
        return run_rounds(self, metric, target, callbacks, max_rounds)

    def state(self) -> dict:
        """As ``HierarchicalPruner.state``, with the original channels still present at the end
        of the network (the ``features`` signal's; the model alone does not tell which)."""
        return {"rounds": self.rounds, "end_kept": self._end_kept} | latency_state(self.latencies)

    def restore(self, state: dict) -> None:
        self.rounds, self._end_kept = state["rounds"], state.get("end_kept")
        restore_latencies(self.latencies, state)

    def check_target(self, target_params, target_flops) -> tuple[str, float]:
        """``(metric, target)``; HbgsError if the target is missing, met or out of reach."""
        metric, target = parse_target(target_params, target_flops)
        groups = self._candidate_groups()
        if not groups:
            raise HbgsError(f"{type(self.model).__name__} has no channel group that can lose "
                            f"step={self.step} channels and keep min_channels="
                            f"{self.min_channels}: use a smaller step or min_channels")
        check_not_met(saved_cost(self.model, self.reference), metric, target)
        best = self._smallest_reachable_cost(groups)
        if best.reduction(metric) < target:
            raise HbgsError(f"target_{metric}={target:g}% is out of reach with surgery=remove: "
                            f"with every prunable channel group at its smallest width "
                            f"(step={self.step}, min_channels={self.min_channels}) the network "
                            f"has {best.reduction(metric):.2f}% fewer {metric} than the "
                            "original; ask for at most that")
        return metric, target

    @full_precision()
    def run_round(self, metric: str | None = None,
                  target: float | None = None) -> RoundRecord | None:
        """One round: score every candidate group, remove the best one's channels."""
        self.metric = metric or self.metric
        before = self.stats.copy()
        start = time.perf_counter()
        self._prepare()
        candidates = []
        for group in self._candidate_groups():
            n_remove = channels_to_remove(group.width, self.step, group.groups)
            selection = self.surgery.propose(group, n_remove, self.method, seed=self.seed)
            self.stats.proposals_computed += 1
            candidates.append((group, removed_channels(group, selection.keep)))
        propose_seconds = time.perf_counter() - start
        if not candidates:
            return None
        grams = input_grams(self.model, self.calib_x, {c for g, _ in candidates
                                                       for c in g.consumers})
        self.stats.full_forwards += 1
        current = self._current_consumer_outputs(candidates) if self.criterion == "hbgs" else None
        errors, saved = [], []
        cost_now = self._cost(self.model) if self.score in COST_AWARE else None
        for group, removed in candidates:
            clone, lost = self.surgery.removed_copy(group.root, removed, grams=grams)
            errors.append(self._score(clone, lost, group, current))
            if cost_now is not None:
                saved.append(cost_now - self._cost(clone))
        scores = errors
        if self.score in COST_AWARE:
            scores = per_cost(errors, [self._current_error()] * len(candidates), saved)
        score_seconds = time.perf_counter() - start - propose_seconds
        best = min(range(len(scores)), key=scores.__getitem__)
        group, removed = candidates[best]
        lost = self.surgery.remove(group.root, removed, grams=grams)
        self._end_kept = self._kept_at_end(lost)
        self.rounds += 1
        cost = saved_cost(self.model, self.reference)
        work = self.stats.since(before)
        return RoundRecord.of(
            self, layer=group.root, side="out", width_before=group.width,
            width_after=group.width - len(removed), score=scores[best],
            candidates=len(candidates), cost=cost, metric=metric, target=target,
            propose_seconds=propose_seconds, score_seconds=score_seconds, work=work,
            error=errors[best], saved=saved[best] if saved else None,
            scores={f"{g.root}:out": s for (g, _), s in zip(candidates, scores)})

    # -- internals ----------------------------------------------------------------------------

    def _cost(self, model: nn.Module) -> float:
        """``model``'s target metric (with ``error_per_latency``: its measured latency) as a
        fraction of the original network's."""
        if self.latencies is not None:
            return self.latencies.fraction(model)
        if self.metric == "params":
            return count_params(model) / self.reference.params_original
        return count_macs(model, self.reference.input_size) / self.reference.flops_original

    def _current_error(self) -> float:
        """The error of the network as it is: HBGTS's end-signal error (0 for HBGS, whose
        candidates are measured against the current network already)."""
        if self.criterion == "hbgs":
            return 0.0
        return self._end_error(self.model, self._end_kept)

    def _candidate_groups(self) -> list[ChannelGroup]:
        return [g for g in self.surgery.groups()
                if g.width - channels_to_remove(g.width, self.step, g.groups) >= self.min_channels]

    def _smallest_reachable_cost(self, groups: list[ChannelGroup]) -> NetworkCost:
        skeleton = copy.deepcopy(self.model)
        surgery = ChannelSurgery(skeleton, self.calib_x[:1], self.surgery.ignored)
        for group in groups:
            smallest = smallest_width(group.width, self.step, group.groups, self.min_channels)
            per_block = group.width // group.groups
            keep = per_block - (group.width - smallest) // group.groups
            surgery.remove(group.root, [b * per_block + i for b in range(group.groups)
                                        for i in range(keep, per_block)])
        return NetworkCost.of(count_params(skeleton),
                              count_macs(skeleton, self.reference.input_size), self.reference)

    def _prepare(self) -> None:
        """The original network's signal, once."""
        if self._original_signal is not None or self.criterion != "hbgts":
            return
        if self.signal == "features":
            self._end = last_batchnorm(self.original, self.calib_x[:1])
            if self._end_kept is None:  # a restored run brings the channels its rounds left
                self._end_kept = list(range(self.original.get_submodule(self._end).num_features))
        self._original_signal = [self._signal(self.original, self.calib_x[s]) for s in self.chunks]

    def _signal(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with evaluating(model):
            if self.signal == "features":
                return capture(model, x, outputs_of=[self._end])[2][self._end]
            return model(x)

    def _score(self, clone: nn.Module, lost: dict, group: ChannelGroup, current) -> float:
        if self.criterion == "hbgs":
            names = [c for c in group.consumers if c in current[0]]
            pairs = []
            for s, outputs in zip(self.chunks, current):
                with evaluating(clone):
                    logits, _, captured = capture(clone, self.calib_x[s], outputs_of=names)
                pairs += [(captured[n], outputs[n]) for n in names] if names else \
                    [(logits, outputs["logits"])]
            self.stats.full_forwards += 1
            return relative_error(pairs)
        self.stats.full_forwards += 1
        return self._end_error(clone, self._kept_at_end(lost))

    def _end_error(self, model: nn.Module, end_kept: list[int] | None) -> float:
        """HBGTS's error of ``model``: the calibration loss, or the relative error of its end
        signal against the original's (removed channels of the end map count as zeros)."""
        values = [self._signal(model, self.calib_x[s]) for s in self.chunks]
        if self.signal == "loss":
            return loss(list(zip(self.chunks, values)), self.calib_y)
        if self.signal == "features":
            values = [_scatter_channels(v, end_kept, ref.shape[1])
                      for v, ref in zip(values, self._original_signal)]
        return relative_error(zip(values, self._original_signal))

    def _kept_at_end(self, lost: dict) -> list[int] | None:
        if self._end_kept is None or self._end not in lost:
            return self._end_kept
        gone = set(lost[self._end])
        return [c for i, c in enumerate(self._end_kept) if i not in gone]

    def _current_consumer_outputs(self, candidates) -> list[dict]:
        names = sorted({c for g, _ in candidates for c in g.consumers})
        outputs = []
        for s in self.chunks:
            with evaluating(self.model):
                logits, _, captured = capture(self.model, self.calib_x[s], outputs_of=names)
            outputs.append({**captured, "logits": logits})
        self.stats.full_forwards += 1
        return outputs


def _scatter_channels(value: torch.Tensor, kept: list[int], width: int) -> torch.Tensor:
    """``value`` (channels ``kept`` of a ``width``-channel map) at full width, zeros elsewhere."""
    if len(kept) == width:
        return value
    full = value.new_zeros(value.shape[0], width, *value.shape[2:])
    full[:, kept] = value
    return full


# -- ACRA with surgery ---------------------------------------------------------------------------

def remove_by_ratios(model: nn.Module, ratios: dict[str, float], groups: Sequence[ChannelGroup],
                     method: str, calib_x: torch.Tensor, *, min_channels: int = 1, seed: int = 0,
                     compensate: bool = True, ignored: Sequence[str] | None = None) -> None:
    """Remove the ratio ``ratios[root]`` of each group's channels (as ``ratios.fraction_count``
    rounds it), group after group in place, each compensated on ``calib_x`` as the network is
    then (``compensate=False``: plain removal). ``groups``: the model's groups before any of
    them was pruned."""
    surgery = ChannelSurgery(model, calib_x[:1], ignored)
    for group in groups:
        ratio = ratios.get(group.root, 0.0)
        n_remove = fraction_count(group.width, ratio, group.groups, min_channels)
        if n_remove:
            selection = surgery.propose(group, n_remove, method, seed=seed)
            surgery.remove(group.root, removed_channels(group, selection.keep),
                           calib_x if compensate else None)
