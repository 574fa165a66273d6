"""Upper level: choose which layer to prune next, round after round (docs/algorithms.md §2).

Each round every (wrapped layer, side) is a candidate: the lower level proposes removing the
next ``step`` channels of it, the candidate is scored as if it alone were pruned, and the best
one is applied. Scores, on a calibration batch (never the test split):

* ``hbgs``: ``||Y − Ŷ|| / ||Y||`` with ``Y`` the layer's output in the ORIGINAL network and ``Ŷ``
  the pruned layer's output on its input in the CURRENT network;
* ``hbgts``: the same relative error at the end of the network (``features``: the last
  BatchNorm2d's output, the authors' choice; ``logits``), or the calibration cross-entropy
  (``loss``), with only that candidate pruned.

With ``use_cache`` a layer's proposals are kept until its conv weights change, calibration
activations are refreshed only downstream of what changed, and HBGTS runs only the part of the
network after the candidate's layer (``suffix.SuffixCache``). Without it everything is
recomputed every round and HBGTS runs the whole network per candidate: the same choices, more
work (``WorkStats`` counts it).

Plain PyTorch: ``callbacks`` are where a caller fine-tunes between rounds.
"""
from __future__ import annotations

import copy
import math
import numbers
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hbgs.accounting import count_macs, count_params
from hbgs.devices import full_precision
from hbgs.errors import HbgsError, check_choice
from hbgs.pruning.adapters import (AdaptedConv, drop_identity_adapters, replace_module,
                                   wrapped_layers)
from hbgs.pruning.compensation import SIDES, apply, propose, pruned
from hbgs.pruning.costs import (LayerLatencies, NetworkCost, ReferenceCosts, as_saved,
                                check_not_met, parse_target, saved_cost)
from hbgs.pruning.selectors import METHODS, Selection
from hbgs.pruning.activations import (FullNetworkEvaluator, ModuleSnapshot, WorkStats, capture,
                                      chunk_slices, end_signal, evaluating, last_batchnorm)
from hbgs.pruning.criteria import LOOP_CRITERIA
from hbgs.pruning.scoring import loss, relative_error
from hbgs.pruning.suffix import COMPUTE_OPS, SuffixCache, trace
from hbgs.pruning.surgery import SURGERIES

# error: the paper's (the error a step causes); error_per_cost: that error's increase over the
# current network's, per unit of the target metric (params or FLOPs, as a fraction of the
# original network's) the step saves; error_per_latency: the same increase per unit of measured
# latency saved (a fraction of the original network's, from a table of layer timings).
SCORES = ("error", "error_per_cost", "error_per_latency")
COST_AWARE = ("error_per_cost", "error_per_latency")
SIGNALS = ("features", "logits", "loss")


# -- how many channels a step removes --------------------------------------------------------

def check_step(step) -> int | float:
    """``step`` if it is a channel count ≥ 1 or a fraction in (0, 1), else an HbgsError."""
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or (
            isinstance(step, numbers.Integral) and step < 1) or (
            not isinstance(step, numbers.Integral) and not 0 < step < 1):
        raise HbgsError(f"step must be a number of channels (an integer ≥ 1) or a fraction of the "
                        f"current width in (0, 1), got {step!r}")
    return int(step) if isinstance(step, numbers.Integral) else float(step)


def surgery_of(cfg) -> str:
    """The run's ``surgery`` (default ``adapters``), or an HbgsError naming both options."""
    surgery = cfg.get("surgery", "adapters")
    if surgery not in SURGERIES:
        raise HbgsError(f"surgery={surgery!r}: use surgery=adapters (the paper's 1×1 adapters) or "
                        "surgery=remove (channels removed for real, a faster network)")
    return surgery


def check_loop_arguments(criterion, signal, method, score, step, min_channels, calib_x, calib_y,
                         chunk_size) -> int | float:
    """HbgsError for the first bad argument of a pruning loop (either surgery); the checked
    step."""
    check_choice("criterion", criterion, LOOP_CRITERIA)
    check_choice("signal", signal, SIGNALS)
    check_choice("method", method, METHODS)
    check_choice("score", score, SCORES)
    step = check_step(step)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise HbgsError(f"min_channels must be an integer ≥ 1, got {min_channels!r}")
    if not isinstance(calib_x, torch.Tensor) or calib_x.dim() < 2 or len(calib_x) == 0:
        raise HbgsError("calib_x must be a non-empty batch of calibration inputs")
    if criterion == "hbgts" and signal == "loss" and (
            calib_y is None or len(calib_y) != len(calib_x)):
        raise HbgsError("signal='loss' needs calib_y, one label per calibration input")
    chunk_slices(len(calib_x), chunk_size)  # validates chunk_size
    return step


def channels_to_remove(width: int, step: int | float, groups: int = 1) -> int:
    """Channels one step removes from a side of ``width`` channels: ``step`` itself, or the
    fraction ``step`` of ``width`` rounded half up (at least 1); rounded up to a multiple of
    ``groups`` so that every group loses the same number."""
    count = step if isinstance(step, int) else max(1, int(step * width + 0.5))
    return -(-count // groups) * groups


def smallest_width(width: int, step: int | float, groups: int, min_channels: int) -> int:
    """The width a side reaches when stepped down for as long as it stays ≥ ``min_channels``."""
    while width - channels_to_remove(width, step, groups) >= min_channels:
        width -= channels_to_remove(width, step, groups)
    return width


def smallest_reachable_cost(model: nn.Module, reference: ReferenceCosts, step: int | float,
                            min_channels: int) -> NetworkCost:
    """The cost of ``model`` with every wrapped layer stepped down to its smallest width on both
    sides (pruned sides with their adapters; unchanged sides folded): the most a run can reach."""
    skeleton = copy.deepcopy(model)
    for name, layer in list(skeleton.named_modules()):
        if not isinstance(layer, AdaptedConv) or not name:
            continue
        spec = layer.spec()
        conv = spec["conv"]
        conv["in_channels"] = smallest_width(conv["in_channels"], step, conv["groups"],
                                             min_channels)
        conv["out_channels"] = smallest_width(conv["out_channels"], step, conv["groups"],
                                              min_channels)
        spec["in_adapter"] = None if conv["in_channels"] == layer.in_channels else {
            "in_channels": layer.in_channels, "out_channels": conv["in_channels"], "bias": False}
        spec["out_adapter"] = None if conv["out_channels"] == layer.out_channels else {
            "in_channels": conv["out_channels"], "out_channels": layer.out_channels, "bias": True}
        # on the model's device and dtype: count_macs feeds the skeleton an input like its weights
        replace_module(skeleton, name, AdaptedConv.from_spec(spec, like=layer.conv.weight))
    return NetworkCost.of(count_params(skeleton), count_macs(skeleton, reference.input_size),
                          reference)


# -- proposals --------------------------------------------------------------------------------

class ProposalCache:
    """Lower-level proposals per (layer, side). With ``enabled`` a proposal is kept until the
    owner calls ``forget`` for its layer (``HierarchicalPruner`` does when the conv changed);
    without, every ``get`` computes afresh."""

    def __init__(self, method: str, seed: int, stats: WorkStats, enabled: bool = True):
        self.method, self.seed, self.stats, self.enabled = method, seed, stats, enabled
        self._entries: dict[tuple[str, str], tuple[int, Selection]] = {}

    def get(self, name: str, layer: AdaptedConv, side: str, n_remove: int) -> Selection:
        """The selection removing ``n_remove`` channels of ``layer`` on ``side``."""
        entry = self._entries.get((name, side))
        if entry is not None and entry[0] == n_remove:
            self.stats.proposals_reused += 1
            return entry[1]
        selection = propose(layer, side, n_remove, self.method, seed=self.seed)
        self.stats.proposals_computed += 1
        if self.enabled:
            self._entries[(name, side)] = (n_remove, selection)
        return selection

    def cached(self, name: str, side: str) -> Selection | None:
        """The kept selection for (``name``, ``side``), if any."""
        entry = self._entries.get((name, side))
        return None if entry is None else entry[1]

    def forget(self, names: Iterable[str]) -> None:
        """Drop the proposals of the layers ``names``."""
        for name in names:
            for side in SIDES:
                self._entries.pop((name, side), None)


# -- records ----------------------------------------------------------------------------------

@dataclass
class Candidate:
    """Removing ``n_remove`` of the ``width`` channels of ``layer`` on ``side``."""

    layer: str
    side: str
    width: int
    n_remove: int
    selection: Selection


@dataclass
class RoundRecord:
    """One round: the choice, its score, the network's cost after it, and the work it took.

    ``flops`` are MACs of conv and linear layers for one image of the run's ``input_size``;
    reductions are in % against the original network, ``*_vs_augmented`` against the
    adapter-augmented one (the reference code's figure). Costs are of the network as saved
    (identity adapters folded), measured right after the choice was applied (before callbacks).
    """

    round: int
    layer: str
    side: str
    width_before: int
    width_after: int
    score: float
    candidates: int
    params: int
    flops: int
    params_reduction: float
    flops_reduction: float
    params_reduction_vs_augmented: float
    flops_reduction_vs_augmented: float
    target_met: bool
    criterion: str
    signal: str | None
    propose_seconds: float
    score_seconds: float
    proposals_computed: int
    proposals_reused: int
    nodes_run: int
    full_forwards: int
    layer_forwards: int
    error: float | None = None  # the choice's error (its score when score="error")
    saved: float | None = None  # cost-aware scores: the fraction of the target metric (or latency) it saved
    scores: dict[str, float] = field(default_factory=dict)  # "layer:side" → score, this round

    @classmethod
    def of(cls, pruner, *, cost: NetworkCost, metric: str | None, target: float | None,
           work: WorkStats, **fields) -> "RoundRecord":
        """The record of ``pruner``'s latest round: its count, criterion and signal, the
        network's ``cost`` after the choice (``target_met`` against ``target`` in ``metric``) and
        the ``work`` it took; ``fields`` give the rest."""
        return cls(round=pruner.rounds, params=cost.params, flops=cost.flops,
                   params_reduction=cost.params_reduction, flops_reduction=cost.flops_reduction,
                   params_reduction_vs_augmented=cost.params_reduction_vs_augmented,
                   flops_reduction_vs_augmented=cost.flops_reduction_vs_augmented,
                   target_met=target is not None and cost.reduction(metric) >= target,
                   criterion=pruner.criterion, signal=pruner.signal,
                   proposals_computed=work.proposals_computed,
                   proposals_reused=work.proposals_reused, nodes_run=work.nodes_run,
                   full_forwards=work.full_forwards, layer_forwards=work.layer_forwards,
                   **fields)

    def as_dict(self) -> dict:
        return asdict(self)


# -- the loop ---------------------------------------------------------------------------------

class HierarchicalPruner:
    """The round-by-round loop of ``hierarchical_prune``, usable a round at a time.

    ``model`` is wrapped (``wrap_model``) and pruned in place; ``original`` is the unpruned
    network, never changed. Nothing runs on the networks until the first round, which starts by
    dropping the identity adapters of unpruned sides (``drop_identity_adapters``): the model
    then counts, and fine-tunes, exactly as it will be saved.
    """

    def __init__(self, model: nn.Module, original: nn.Module, calib_x: torch.Tensor,
                 calib_y: torch.Tensor | None, *, criterion: str = "hbgts",
                 signal: str = "features", method: str = "backward", step: int | float = 5,
                 min_channels: int = 1, input_size: Sequence[int] = (3, 32, 32), seed: int = 0,
                 use_cache: bool = True, chunk_size: int | None = None, score: str = "error"):
        self.step = check_loop_arguments(criterion, signal, method, score, step, min_channels,
                                         calib_x, calib_y, chunk_size)
        self.layers = wrapped_layers(model)
        self.model, self.original = model, original
        self.calib_x, self.calib_y = calib_x, calib_y
        self.criterion, self.method, self.min_channels = criterion, method, min_channels
        self.signal = signal if criterion == "hbgts" else None
        self.use_cache, self.chunk_size = use_cache, chunk_size
        self.score, self.metric = score, "params"  # the metric error_per_cost divides by
        self.reference = ReferenceCosts.measure(original, input_size)
        self.latencies = LayerLatencies(original, input_size) if score == "error_per_latency" else None
        self.stats = WorkStats()
        self.proposals = ProposalCache(method, seed, self.stats, enabled=use_cache)
        self.rounds = 0
        self._evaluator = None  # built by the first round
        self._snapshot = None  # with use_cache: what the network looked like at the last round

    # -- public -------------------------------------------------------------------------------

    def run(self, *, target_params: float | None = None, target_flops: float | None = None,
            callbacks: Iterable = (), max_rounds: int | None = None) -> list[RoundRecord]:
        """Prune round after round until the network meets the target (% reduction of params or
        FLOPs against the original network, exactly one), ``max_rounds`` rounds ran, or no
        candidate is left. After each round every callback gets ``(record, model)``: an object's
        ``on_round_end`` method, or the callable itself."""
        metric, target = self.check_target(target_params, target_flops)
        return run_rounds(self, metric, target, callbacks, max_rounds)

    def state(self) -> dict:
        """What a resumed run needs besides the model to continue this loop (caches are rebuilt
        from the model, with the same values; layer timings are kept): plain data for ``restore``."""
        return {"rounds": self.rounds} | latency_state(self.latencies)

    def restore(self, state: dict) -> None:
        """Continue from ``state()`` of a loop that ran on the model this one was given."""
        self.rounds = state["rounds"]
        restore_latencies(self.latencies, state)

    def check_target(self, target_params, target_flops) -> tuple[str, float]:
        """``(metric, target)`` after checking the target against the network; HbgsError if it
        is missing, not positive, already met or out of reach. Changes nothing."""
        metric, target = parse_target(target_params, target_flops)
        self._check_candidates_exist()
        check_not_met(saved_cost(self.model, self.reference), metric, target)
        best = smallest_reachable_cost(self.model, self.reference, self.step, self.min_channels)
        if best.reduction(metric) < target:
            raise HbgsError(f"target_{metric}={target:g}% is out of reach: with every wrapped layer "
                            f"at its smallest width on both sides (step={self.step}, "
                            f"min_channels={self.min_channels}, adapters of pruned layers "
                            f"counted) the network has {best.reduction(metric):.2f}% fewer "
                            f"{metric} than the original; ask for at most that, or use "
                            "surgery=remove, which also prunes 1×1 convs and Linear layers")
        return metric, target

    @full_precision()
    def scored_candidates(self) -> list[tuple[Candidate, float]]:
        """Every candidate of the current round with its error (the paper's score; lower is
        better); does not change what the network computes."""
        self._bring_up_to_date()
        return list(zip(*self._propose_and_score()[:2]))

    @full_precision()
    def run_round(self, metric: str | None = None,
                  target: float | None = None) -> RoundRecord | None:
        """One round: score every candidate, apply the best, return its record (None when no
        candidate is left). ``target_met`` compares against ``target`` when given."""
        self.metric = metric or self.metric
        before = self.stats.copy()
        start = time.perf_counter()
        self._bring_up_to_date()
        candidates, errors, propose_seconds = self._propose_and_score()
        if not candidates:
            return None
        scores, saved = errors, None
        if self.score in COST_AWARE:
            saved = [self._saving(c) for c in candidates]
            scores = per_cost(errors, self._current_errors(candidates), saved)
        score_seconds = time.perf_counter() - start - propose_seconds  # refresh included
        best = min(range(len(scores)), key=scores.__getitem__)
        choice = candidates[best]
        apply(self._layer(choice.layer), choice.side, choice.selection)
        self.rounds += 1
        cost = saved_cost(self.model, self.reference)
        work = self.stats.since(before)
        return RoundRecord.of(
            self, layer=choice.layer, side=choice.side, width_before=choice.width,
            width_after=choice.width - choice.n_remove, score=scores[best],
            candidates=len(candidates), cost=cost, metric=metric, target=target,
            propose_seconds=propose_seconds, score_seconds=score_seconds, work=work,
            error=errors[best], saved=None if saved is None else saved[best],
            scores={f"{c.layer}:{c.side}": s for c, s in zip(candidates, scores)})

    # -- internals ----------------------------------------------------------------------------

    def _candidate_sides(self):
        """(name, layer, side, width, n_remove) for every side that can lose one more step."""
        for name in self.layers:
            layer = self._layer(name)
            for side in SIDES:
                width = layer.conv.out_channels if side == "out" else layer.conv.in_channels
                n_remove = channels_to_remove(width, self.step, layer.conv.groups)
                if width - n_remove >= self.min_channels:
                    yield name, layer, side, width, n_remove

    def _check_candidates_exist(self) -> None:
        if next(self._candidate_sides(), None) is None:
            widest = max(max(m.conv.in_channels, m.conv.out_channels)
                         for m in map(self._layer, self.layers))
            raise HbgsError(f"step={self.step} leaves no candidate: removing it from any wrapped "
                            f"layer would leave fewer than min_channels={self.min_channels} "
                            f"channels (the widest layer has {widest}); use a smaller step, "
                            "e.g. a count or a fraction such as 0.1")

    def _propose_and_score(self) -> tuple[list[Candidate], list[float], float]:
        start = time.perf_counter()
        candidates = [Candidate(name, side, width, n, self.proposals.get(name, layer, side, n))
                      for name, layer, side, width, n in self._candidate_sides()]
        propose_seconds = time.perf_counter() - start
        with torch.no_grad():
            scores = [self._score(c.layer, pruned(self._layer(c.layer), c.side, c.selection))
                      for c in candidates]
        return candidates, scores, propose_seconds

    def _saving(self, candidate: Candidate) -> float:
        """What applying ``candidate`` saves of the target metric (or, with
        ``error_per_latency``, of the measured latency), as a fraction of the original network's
        (adapters of the pruned layer counted)."""
        layer = self._layer(candidate.layer)
        new = pruned(layer, candidate.side, candidate.selection)
        shape = self._input_shapes[candidate.layer]
        if self.latencies is not None:  # timed as saved: identity adapters folded away
            return (self.latencies.fraction(as_saved(layer), shape)
                    - self.latencies.fraction(as_saved(new), shape))
        if self.metric == "params":
            return (count_params(layer) - count_params(new)) / self.reference.params_original
        return (count_macs(layer, shape) - count_macs(new, shape)) / self.reference.flops_original

    def _current_errors(self, candidates: list[Candidate]) -> list[float]:
        """The error of the network as it is (HBGTS), or of each candidate's layer as it is
        (HBGS): what a candidate's error increase is measured from."""
        if self.criterion == "hbgts":
            current = self._end_error(self._evaluator.end_values())
            return [current] * len(candidates)
        with torch.no_grad():
            layer_errors = {name: self._score(name, self._layer(name))
                            for name in {c.layer for c in candidates}}
        return [layer_errors[c.layer] for c in candidates]

    def _score(self, name: str, module: AdaptedConv) -> float:
        if self.criterion == "hbgs":
            pairs = [(module(x), y) for (_, x), y in
                     zip(self._evaluator.layer_inputs(name), self._original_outputs[name])]
            self.stats.layer_forwards += 1
            return relative_error(pairs)
        return self._end_error(self._evaluator.end_values(name, module))

    def _end_error(self, values) -> float:
        """HBGTS's error of end values (per chunk): the calibration loss, or the relative error
        against the original network's signal."""
        if self.signal == "loss":
            return loss(values, self.calib_y)
        return relative_error([(v, ref) for (_, v), ref in zip(values, self._original_signal)])

    def _bring_up_to_date(self) -> None:
        """Build the evaluator on the first call; later, refresh what the network's changes
        (the applied choice, callbacks) made stale."""
        if self._evaluator is None:
            self._prepare()
            self._evaluator.refresh()
            return
        if not self.use_cache:
            self._evaluator.refresh()
            return
        changed = self._snapshot.changed()
        self.proposals.forget(n for n in self.layers if n in changed or f"{n}.conv" in changed)
        self._evaluator.refresh(changed)

    def _prepare(self) -> None:
        x = self.calib_x
        end = None
        if self.signal == "features":
            end = last_batchnorm(self.model, x[:1])
        if self.use_cache:  # may refuse the model: before anything changes
            self._evaluator = SuffixCache(self.model, x, self.layers, end=end,
                                          chunk_size=self.chunk_size, stats=self.stats)
        drop_identity_adapters(self.model)
        if self.use_cache:
            self._snapshot = ModuleSnapshot(self.model)
        else:
            self._evaluator = FullNetworkEvaluator(
                self.model, x, self.layers, end=end, need_inputs=self.criterion == "hbgs",
                chunk_size=self.chunk_size, stats=self.stats,
                nodes_per_forward=_compute_nodes(self.model))
        chunks = chunk_slices(len(x), self.chunk_size)
        with evaluating(self.model):  # each layer's input shape, for FLOPs saved (widths kept)
            _, inputs, _ = capture(self.model, x[:1], inputs_of=self.layers)
        self._input_shapes = {name: tuple(value.shape[1:]) for name, value in inputs.items()}
        with evaluating(self.original):
            if self.criterion == "hbgs":
                outputs = [capture(self.original, x[s], outputs_of=self.layers)[2] for s in chunks]
                self._original_outputs = {n: [o[n] for o in outputs] for n in self.layers}
            elif self.signal != "loss":
                self._original_signal = [end_signal(self.original, x[s], end) for s in chunks]

    def _layer(self, name: str) -> AdaptedConv:
        layer = self.model.get_submodule(name)
        if not isinstance(layer, AdaptedConv):
            raise HbgsError(f"layer {name!r} is no longer a wrapped conv (a callback folded or "
                            "replaced it?); callbacks may change weights, not the architecture")
        return layer


def per_cost(errors: Sequence[float], current: Sequence[float],
             saved: Sequence[float]) -> list[float]:
    """``(error − current) / saved`` per candidate: the error a step adds per unit of cost it
    saves (lower is better). A step that saves nothing is never preferred (``inf``), unless no
    step saves anything, when the plain errors decide."""
    if all(s <= 0 for s in saved):
        return list(errors)
    return [max(e - c, 0.0) / s if s > 0 else math.inf
            for e, c, s in zip(errors, current, saved)]


def latency_state(latencies: LayerLatencies | None) -> dict:
    """The part of a pruner's ``state()`` that holds its layer timings (none without them)."""
    return {} if latencies is None else {"latencies": latencies.state()}


def restore_latencies(latencies: LayerLatencies | None, state: dict) -> None:
    if latencies is not None and "latencies" in state:
        latencies.restore(state["latencies"])


def run_rounds(pruner, metric: str, target: float, callbacks: Iterable = (),
               max_rounds: int | None = None) -> list[RoundRecord]:
    """``pruner.run_round`` until the target is met, ``max_rounds`` ran or no candidate is left;
    every callback gets ``(record, pruner.model)`` after each round."""
    callbacks = list(callbacks)
    records = []
    while max_rounds is None or len(records) < max_rounds:
        record = pruner.run_round(metric, target)
        if record is None:
            warnings.warn(f"no candidate left after {len(records)} rounds and the target "
                          f"{metric} reduction {target:g}% is not met", stacklevel=3)
            break
        records.append(record)
        for callback in callbacks:
            getattr(callback, "on_round_end", callback)(record, pruner.model)
        if record.target_met:
            break
    return records


def hierarchical_prune(model: nn.Module, original: nn.Module, calib_x: torch.Tensor,
                       calib_y: torch.Tensor | None, *, criterion: str = "hbgts",
                       signal: str = "features", method: str = "backward",
                       step: int | float = 5, min_channels: int = 1,
                       target_params: float | None = None, target_flops: float | None = None,
                       input_size: Sequence[int] = (3, 32, 32), seed: int = 0,
                       use_cache: bool = True, chunk_size: int | None = None,
                       callbacks: Iterable = (), max_rounds: int | None = None,
                       surgery: str = "adapters", score: str = "error") -> list[RoundRecord]:
    """Prune the wrapped ``model`` in place, one (layer, side) step per round, until it has
    ``target_params`` or ``target_flops`` % fewer than ``original`` (exactly one target).

    ``criterion``: ``hbgs`` (layer output error) or ``hbgts`` (end-of-network ``signal``:
    ``features``, ``logits`` or ``loss``). ``method``: the lower-level selector. ``step``:
    channels per round, a count or a fraction of the current width. ``calib_x``/``calib_y``: a
    calibration batch held out from training (never the test split). ``callbacks`` get
    ``(record, model)`` after every round (fine-tune there). Returns one record per round; the
    last one meets the target unless ``max_rounds`` stopped the run first. Bad arguments raise
    ``HbgsError`` before anything changes.

    ``surgery``: ``adapters`` (the paper's: ``model`` wrapped, widths kept by 1×1 adapters) or
    ``remove`` (``model`` unwrapped; channel groups removed for real, ``removal.RemovalPruner``;
    ``use_cache`` does not apply). ``score``: ``error`` (the paper's) or ``error_per_cost`` (the
    error's increase per unit of the target metric saved, ``per_cost``).
    """
    pruner = build_pruner(model, original, calib_x, calib_y, criterion=criterion, signal=signal,
                          method=method, step=step, min_channels=min_channels,
                          input_size=input_size, seed=seed, use_cache=use_cache,
                          chunk_size=chunk_size, surgery=surgery, score=score)
    return pruner.run(target_params=target_params, target_flops=target_flops,
                      callbacks=callbacks, max_rounds=max_rounds)


def build_pruner(model: nn.Module, original: nn.Module, calib_x: torch.Tensor,
                 calib_y: torch.Tensor | None, *, surgery: str = "adapters", use_cache: bool = True,
                 **kwargs):
    """The loop object behind ``hierarchical_prune`` (same arguments but the target, callbacks
    and ``max_rounds``, which go to its ``run``): a ``HierarchicalPruner`` or, for
    ``surgery="remove"``, a ``removal.RemovalPruner``. Both have ``state()`` and ``restore()``
    for a run that continues where another stopped (``hbgs.run_state``)."""
    check_choice("surgery", surgery, SURGERIES)
    if surgery == "remove":
        from hbgs.pruning.removal import RemovalPruner

        return RemovalPruner(model, original, calib_x, calib_y, **kwargs)
    return HierarchicalPruner(model, original, calib_x, calib_y, use_cache=use_cache, **kwargs)


def _compute_nodes(model: nn.Module) -> int:
    """Compute nodes of ``model``'s traced graph; 0 when it cannot be traced."""
    try:
        return sum(node.op in COMPUTE_OPS for node in trace(model).nodes)
    except HbgsError:
        return 0
