"""Torch-Pruning as a peer method: its pruner at the same targets as hbgs's own methods.

``torch_pruning_allocation`` drives Torch-Pruning's ``MetaPruner`` (one ``step()``, no data:
magnitude importances) at the smallest pruning ratio whose network meets a params or FLOPs
target (% reduction against the original network), so that its models can be fine-tuned,
counted and tabulated exactly like the ACRA baselines' (it returns an ``Allocation``):

* ``importance="l1"``: ``MagnitudeImportance(p=1)``, one ratio for every channel group
  (``global_pruning=False``), the classic L1-norm baseline as Torch-Pruning implements it (the
  L1 norms of a group's coupled parameter slices, averaged);
* ``importance="group_norm"``: ``GroupMagnitudeImportance(p=2)`` ranked across all groups
  (``global_pruning=True``): the ratio is the fraction of all prunable channels removed, and
  each group loses those ranked below the global threshold.

Channels always leave the network for real (there is no adapter variant), nothing is
compensated, and the model stays a plain module tree of narrower ``Conv2d`` / ``BatchNorm2d`` /
``Linear`` layers (``hbgs.checkpoint.save_model`` records their shapes).

Layers Torch-Pruning cannot prune consistently are left out, found rather than named: every
conv or linear layer whose output channels belong to no group ``ChannelSurgery.groups()``
offers (the classifier; the CIFAR ResNets' residual streams, whose option-A shortcuts zero-pad
by a fixed count that Torch-Pruning cannot resize) is passed to ``MetaPruner`` as ignored.

The ratio search: reductions grow with the ratio for ``global_pruning=False`` (each group
keeps ``int(width · (1 − r))`` channels); with global ranking a group whose channels all fall
below the threshold would lose every channel, which Torch-Pruning refuses by skipping the
group, so very large ratios can prune *less*. The search therefore first scans the ratio
upwards in steps of ``scan_step`` to the first one meeting the target, then bisects between it
and the step below (to ``resolution``, or until the reduction lies within ``tolerance`` % points
above the target, the semantics of ACRA uniform). Reductions move in whole channels, so a
target may fall in a gap no ratio fills: the smallest ratio meeting the target is returned,
``within_tolerance`` is False and ``below`` shows the nearest reduction under the target.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hbgs.errors import HbgsError
from hbgs.pruning.acra import UniformAllocation
from hbgs.pruning.costs import ReferenceCosts, check_not_met, parse_target, saved_cost
from hbgs.pruning.surgery import ChannelSurgery, layer_widths, require_torch_pruning

IMPORTANCES = ("l1", "group_norm")
GLOBAL_BY_DEFAULT = {"l1": False, "group_norm": True}
ROOT_TYPES = (nn.Conv2d, nn.Linear)


def selector_name(importance: str) -> str:
    """What the summary and the tables call a peer's channel ranking: ``tp-l1``, ``tp-group-norm``."""
    return "tp-" + importance.replace("_", "-")


def importance_of(importance: str):
    """Torch-Pruning's importance object for ``importance`` ("l1" or "group_norm")."""
    if importance not in IMPORTANCES:
        raise HbgsError(f"importance={importance!r}: use one of {', '.join(IMPORTANCES)}")
    tp = require_torch_pruning("the Torch-Pruning peers")
    if importance == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    return tp.importance.GroupMagnitudeImportance(p=2)


@dataclass
class PeerAllocation(UniformAllocation):
    """``UniformAllocation`` of a Torch-Pruning peer. ``ratio``: the pruning ratio given to
    ``MetaPruner`` (per group, or of all prunable channels with ``global_pruning``); ``ratios``:
    the fraction of output channels each pruned layer actually lost; ``ignored``: the layers
    left out."""

    importance: str = "l1"
    global_pruning: bool = False
    ignored: tuple[str, ...] = field(default_factory=tuple)

    def details(self) -> dict:
        """The block ``summary.json`` reports under ``details``."""
        return {"ratio": self.ratio, "importance": self.importance,
                "global_pruning": self.global_pruning, "ignored_layers": list(self.ignored),
                "layer_ratios": self.ratios, "target": self.target,
                "tolerance_points": self.tolerance, "within_tolerance": self.within_tolerance,
                "below": self.below, "evaluations": self.evaluations}


def ignored_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the conv and linear layers of ``model`` whose output channels Torch-Pruning
    must not prune: those outside every channel group ``ChannelSurgery.groups()`` offers (its
    classifier, and layers whose removal it found to break the network)."""
    return _survey(model, example_input)[0]


def _survey(model: nn.Module, example_input: torch.Tensor) -> tuple[list[str], list[int]]:
    """(``ignored_layers``, the channels per block of each offered group: its width over the
    grouped convs' groups)."""
    surgery = ChannelSurgery(model, example_input)
    offered = {g.root: g.width // g.groups for g in surgery.groups()}
    names = {m: n for n, m in model.named_modules()}
    graph = surgery.graph
    excluded = [model.get_submodule(n) for n in surgery.ignored]
    prunable: set[str] = set()
    for group in graph.get_all_groups(ignored_layers=excluded, root_module_types=list(ROOT_TYPES)):
        if names.get(group[0].dep.target.module) in offered:
            prunable.update(names[item.dep.target.module] for item in group
                            if item.dep.target.module in names
                            and graph.is_out_channel_pruning_fn(item.dep.handler))
    ignored = [n for n, m in model.named_modules() if isinstance(m, ROOT_TYPES) and n not in prunable]
    return ignored, list(offered.values())


def prune_at_ratio(model: nn.Module, ratio: float, *, importance: str = "l1",
                   global_pruning: bool | None = None, ignored: Sequence[str] = (),
                   example_input: torch.Tensor | None = None,
                   input_size: Sequence[int] = (3, 32, 32)) -> nn.Module:
    """A copy of ``model`` pruned by one ``MetaPruner`` step at ``ratio`` (``model`` is not
    changed), the layers named in ``ignored`` left out; in ``model``'s training mode, with its
    parameters' ``requires_grad``."""
    tp = require_torch_pruning("the Torch-Pruning peers")
    scores = importance_of(importance)  # checks the name
    if global_pruning is None:
        global_pruning = GLOBAL_BY_DEFAULT[importance]
    if example_input is None:
        example_input = _example(input_size)
    pruned = copy.deepcopy(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    pruned.eval().requires_grad_(True)  # traced through autograd; BatchNorm statistics untouched
    with torch.enable_grad():
        tp.pruner.MetaPruner(pruned, example_input, importance=scores,
                             global_pruning=global_pruning, pruning_ratio=ratio,
                             ignored_layers=[pruned.get_submodule(n) for n in ignored],
                             root_module_types=list(ROOT_TYPES)).step()
    for name, parameter in pruned.named_parameters():
        parameter.requires_grad_(name not in frozen)
    return pruned.train(model.training)


def torch_pruning_allocation(model: nn.Module, original: nn.Module, *, importance: str = "l1",
                             global_pruning: bool | None = None,
                             target_params: float | None = None,
                             target_flops: float | None = None, tolerance: float = 0.5,
                             input_size: Sequence[int] = (3, 32, 32),
                             example_input: torch.Tensor | None = None,
                             scan_step: float = 0.1, resolution: float = 1e-4) -> PeerAllocation:
    """Torch-Pruning's ``MetaPruner`` with ``importance`` ("l1": ``MagnitudeImportance(p=1)``,
    one ratio per group; "group_norm": ``GroupMagnitudeImportance(p=2)``, ranked globally;
    ``global_pruning`` overrides the ranking) at the smallest ratio whose network meets the
    target (a % reduction of params or FLOPs against ``original``), searched as the module
    docstring says. ``model`` (plain, unwrapped; e.g. a copy of ``original``) is not changed:
    the result holds the pruned copy. ``example_input``: one input batch to trace with (default:
    a random one of ``input_size``)."""
    require_torch_pruning("the Torch-Pruning peers")
    if importance not in IMPORTANCES:
        raise HbgsError(f"importance={importance!r}: use one of {', '.join(IMPORTANCES)}")
    if global_pruning is None:
        global_pruning = GLOBAL_BY_DEFAULT[importance]
    if not tolerance >= 0:
        raise HbgsError(f"tolerance must be ≥ 0 % points, got {tolerance!r}")
    if not 0 < scan_step <= 1:
        raise HbgsError(f"scan_step must lie in (0, 1], got {scan_step!r}")
    metric, target = parse_target(target_params, target_flops)
    example_input = _example(input_size) if example_input is None else example_input
    reference = ReferenceCosts.measure(original, input_size)
    current = saved_cost(model, reference)
    check_not_met(current, metric, target)
    ignored, widths = _survey(model, example_input)
    if not widths:
        raise HbgsError(f"Torch-Pruning can prune no channel group of {type(model).__name__}")
    # The largest ratio leaving every group a channel (int(w · (1 − r)) ≥ 1 for the narrowest).
    highest = 1.0 - 1.0001 / min(widths)
    if highest <= 0:
        raise HbgsError(f"every prunable layer of {type(model).__name__} has a single channel")

    best: list = []  # [(ratio, model, cost)] of the smallest ratio meeting the target so far
    below, evaluations = current.reduction(metric), 0

    def meets(ratio: float) -> bool:
        nonlocal below, evaluations
        candidate = prune_at_ratio(model, ratio, importance=importance,
                                   global_pruning=global_pruning, ignored=ignored,
                                   example_input=example_input)
        cost = saved_cost(candidate, reference)
        evaluations += 1
        if cost.reduction(metric) < target:
            below = max(below, cost.reduction(metric))
            return False
        best[:] = [(ratio, candidate, cost)]
        return True

    def within() -> bool:
        return bool(best) and best[0][2].reduction(metric) - target <= tolerance

    low, high = 0.0, None
    for step in range(1, int(1 / scan_step) + 2):
        ratio = min(step * scan_step, highest)
        if meets(ratio):
            high = ratio
            break
        low = ratio
        if ratio == highest:
            break
    if high is None:
        raise HbgsError(f"target_{metric}={target:g}% is out of reach for Torch-Pruning "
                        f"({importance}, global_pruning={global_pruning}): the most it prunes "
                        f"here gives {below:.2f}%")
    while high - low > resolution and not within():
        middle = (low + high) / 2
        if meets(middle):
            high = middle
        else:
            low = middle
    ratio, pruned, cost = best[0]
    _check_runs(pruned, model, example_input)
    ratios = {name: 1.0 - w["out_current"] / w["out_original"]
              for name, w in layer_widths(pruned, original).items()
              if w["out_current"] != w["out_original"]}
    return PeerAllocation(model=pruned, ratios=ratios, cost=cost, metric=metric, target=target,
                          tolerance=tolerance, reduction=cost.reduction(metric),
                          within_tolerance=within(), below=below, evaluations=evaluations,
                          ratio=ratio, importance=importance, global_pruning=global_pruning,
                          ignored=tuple(ignored))


def _example(input_size: Sequence[int]) -> torch.Tensor:
    return torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))


def _check_runs(pruned: nn.Module, model: nn.Module, example_input: torch.Tensor) -> None:
    """HbgsError unless ``pruned`` runs and gives outputs of ``model``'s shape."""
    modes = pruned.training, model.training
    try:
        with torch.no_grad():
            expected = model.eval()(example_input).shape
            got = pruned.eval()(example_input).shape
    except Exception as err:
        raise HbgsError(f"Torch-Pruning left {type(model).__name__} unable to run "
                        f"({type(err).__name__}: {err})") from err
    finally:
        pruned.train(modes[0])
        model.train(modes[1])
    if got != expected:
        raise HbgsError(f"Torch-Pruning changed the output shape of {type(model).__name__} "
                        f"from {tuple(expected)} to {tuple(got)}")
