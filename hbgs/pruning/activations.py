"""Calibration activations by whole-network forwards: the helpers every scorer shares.

``capture`` runs a network with forward hooks on named submodules, ``end_signal`` and
``last_batchnorm`` name what HBGTS compares at the end of the network, and
``FullNetworkEvaluator`` answers the scoring loop's questions (a layer's input, the end signal
with one layer replaced) by running the whole network every time: the reference the suffix cache
(``suffix.SuffixCache``) is tested against. ``ModuleSnapshot`` tells which modules changed
between rounds; ``WorkStats`` counts the work in machine-independent units
(docs/algorithms.md §2).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hbgs.errors import HbgsError
from hbgs.pruning.adapters import replace_module

Chunks = list[tuple[slice, torch.Tensor]]


@dataclass
class WorkStats:
    """Work done while pruning, counted in units that do not depend on the machine."""

    proposals_computed: int = 0  # lower-level selections computed
    proposals_reused: int = 0  # lower-level selections taken from the cache
    nodes_run: int = 0  # graph nodes executed on the whole calibration batch
    full_forwards: int = 0  # whole-network forwards of the calibration batch
    layer_forwards: int = 0  # single-layer forwards of the calibration batch (HBGS)

    def copy(self) -> "WorkStats":
        return WorkStats(**vars(self))

    def since(self, earlier: "WorkStats") -> "WorkStats":
        """The work done after ``earlier`` (a ``copy`` taken then)."""
        return WorkStats(**{k: v - getattr(earlier, k) for k, v in vars(self).items()})


def chunk_slices(n: int, chunk_size: int | None) -> list[slice]:
    """``n`` items as consecutive slices of ``chunk_size`` (one slice when None)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise HbgsError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    size = n if chunk_size is None else chunk_size
    return [slice(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode and no autograd; every submodule's own mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def capture(model: nn.Module, x: torch.Tensor, *, inputs_of: Iterable[str] = (),
            outputs_of: Iterable[str] = ()) -> tuple[torch.Tensor, dict, dict]:
    """``model(x)`` with the inputs of the submodules named in ``inputs_of`` and the outputs of
    those in ``outputs_of``; each of them must run exactly once."""
    inputs_of, outputs_of = set(inputs_of), set(outputs_of)
    inputs, outputs, calls = {}, {}, Counter()

    def hook(name):
        def record(module, args, output):
            calls[name] += 1
            # Copies: an in-place op later in the forward (``out += identity``, ReLU(inplace))
            # may overwrite these very tensors.
            if name in inputs_of:
                inputs[name] = args[0].clone()
            if name in outputs_of:
                outputs[name] = output.clone()
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name))
               for name in inputs_of | outputs_of]
    try:
        result = model(x)
    finally:
        for handle in handles:
            handle.remove()
    _check_single_calls(inputs_of | outputs_of, calls)
    return result, inputs, outputs


def end_signal(model: nn.Module, x: torch.Tensor, end: str | None) -> torch.Tensor:
    """The output of the submodule ``end`` in ``model(x)``; the network's output when None."""
    logits, _, outputs = capture(model, x, outputs_of=[end] if end else [])
    return outputs[end] if end else logits


def last_batchnorm(model: nn.Module, sample: torch.Tensor) -> str:
    """Name of the ``BatchNorm2d`` that runs last in ``model``'s forward (the authors' "last
    feature map"), found by running ``sample`` through it."""
    order = []
    handles = [m.register_forward_pre_hook(lambda module, args, name=name: order.append(name))
               for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with evaluating(model):
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise HbgsError(f"signal='features' is the output of the network's last BatchNorm2d, "
                        f"but {type(model).__name__} has none; use signal='logits' or 'loss'")
    return order[-1]


class FullNetworkEvaluator:
    """Layer inputs and end signals of the current network, computed by whole forwards.

    ``end``: name of the module whose output is the end signal (None: the network's output).
    ``need_inputs``: whether ``refresh`` captures the inputs of ``layers`` (for HBGS).
    ``nodes_per_forward``: what one forward adds to ``stats.nodes_run`` (0 when not known).
    """

    def __init__(self, model: nn.Module, calib_x: torch.Tensor, layers: Sequence[str], *,
                 end: str | None = None, need_inputs: bool = False,
                 chunk_size: int | None = None, stats: WorkStats | None = None,
                 nodes_per_forward: int = 0):
        self.model, self.x, self.layers, self.end = model, calib_x, list(layers), end
        self.need_inputs, self.nodes_per_forward = need_inputs, nodes_per_forward
        self.chunks = chunk_slices(len(calib_x), chunk_size)
        self.stats = stats if stats is not None else WorkStats()
        self._inputs: list[dict] | None = None

    def refresh(self) -> None:
        """Recompute the layer inputs (always: this evaluator keeps nothing between rounds)."""
        if not self.need_inputs:
            return
        with evaluating(self.model):
            self._inputs = [capture(self.model, self.x[s], inputs_of=self.layers)[1]
                            for s in self.chunks]
        self._count_forward()

    def layer_inputs(self, layer: str) -> Chunks:
        """``layer``'s input in the current network, per chunk (after ``refresh``)."""
        if self._inputs is None:
            raise RuntimeError("call refresh() first")
        return [(s, inputs[layer]) for s, inputs in zip(self.chunks, self._inputs)]

    def end_values(self, layer: str | None = None, module: nn.Module | None = None) -> Chunks:
        """The end signal per chunk, with ``module`` in place of ``layer`` when given."""
        old = replace_module(self.model, layer, module) if module is not None else None
        try:
            with evaluating(self.model):
                values = [(s, end_signal(self.model, self.x[s], self.end)) for s in self.chunks]
        finally:
            if module is not None:
                replace_module(self.model, layer, old)
        self._count_forward()
        return values

    def _count_forward(self) -> None:
        self.stats.full_forwards += 1
        self.stats.nodes_run += self.nodes_per_forward


class ModuleSnapshot:
    """Copies of a model's parameters and buffers, to tell which modules changed since the last
    look (weights updated in place, buffers such as BatchNorm statistics, modules replaced).

    Content is compared, not tensor version counters: fused optimizers and BatchNorm's running
    statistics update tensors in place without bumping their version.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._state = {name: self._record(m) for name, m in model.named_modules()}

    def changed(self) -> set[str]:
        """Names of the modules changed since the previous call (or construction); modules that
        appeared or disappeared count as changed. Updates the snapshot."""
        current = dict(self.model.named_modules())
        changed = set(self._state.keys() ^ current.keys())
        for name, module in current.items():
            old = self._state.get(name)
            if old is None or not _same(old, module):
                changed.add(name)
                self._state[name] = self._record(module)
        for name in self._state.keys() - current.keys():
            del self._state[name]
        return changed

    @staticmethod
    def _record(module: nn.Module):
        tensors = list(module.named_parameters(recurse=False)) + \
            list(module.named_buffers(recurse=False))
        return module, [(key, t, t.detach().clone()) for key, t in tensors]


def _same(record, module: nn.Module) -> bool:
    old_module, old_tensors = record
    if old_module is not module:
        return False
    tensors = list(module.named_parameters(recurse=False)) + \
        list(module.named_buffers(recurse=False))
    # A tensor moved to another device (Module.to keeps the Parameter object) has changed;
    # torch.equal across devices would raise.
    return len(tensors) == len(old_tensors) and all(
        key == old_key and t is old_t and t.device == copy.device and torch.equal(t, copy)
        for (key, t), (old_key, old_t, copy) in zip(tensors, old_tensors))


def _check_single_calls(names: set[str], calls: Counter) -> None:
    wrong = {name: calls[name] for name in names if calls[name] != 1}
    if wrong:
        raise HbgsError(f"modules run {wrong} times in one forward; scoring needs each scored "
                        "module run exactly once per forward")
