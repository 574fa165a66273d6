"""Calibration activations cached for scoring many one-layer changes (docs/algorithms.md §2).

HBGTS scores every candidate by the network's end signal with only that candidate's layer
changed. The part of the network that does not depend on the changed layer computes the same
values for every candidate, so ``SuffixCache`` traces the model once with ``torch.fx`` (each
``AdaptedConv`` kept as one node) and one forward of the calibration batch stores, for every
wrapped layer ``L``, the values that the nodes downstream of ``L`` read from outside that set:
``L``'s input and the skip tensors alive across it. A candidate then runs only the nodes
downstream of ``L`` that lead to the end signal. When modules change, only the nodes downstream
of them are recomputed. Stored tensors are shared, never copied; an in-place op (``out +=
identity``, ``ReLU(inplace=True)``) runs on a copy of its input so that it cannot overwrite them.

``activations.FullNetworkEvaluator`` answers the same questions by running the whole network
every time: the reference the cache is tested against, and the baseline a benchmark measures it
against. Both hand out values per chunk of the calibration batch (``chunk_size`` bounds the
transient memory of one run; the cache itself holds the whole batch).
"""
from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from hbgs.errors import HbgsError
from hbgs.pruning.activations import Chunks, WorkStats, chunk_slices, evaluating
from hbgs.pruning.adapters import AdaptedConv

COMPUTE_OPS = ("call_module", "call_function", "call_method")


class AdaptedConvTracer(fx.Tracer):
    """The default fx tracer, except that every ``AdaptedConv`` stays one ``call_module`` node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, AdaptedConv) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> fx.Graph:
    """``model.forward`` as an fx graph with each ``AdaptedConv`` as a single node."""
    try:
        return AdaptedConvTracer().trace(model)
    except Exception as err:
        raise HbgsError(f"torch.fx cannot trace {type(model).__name__}.forward "
                        f"({type(err).__name__}: {err}); the activation cache needs a traceable "
                        "model: pass use_cache=False to run the whole network per candidate"
                        ) from err


@dataclass
class _Plan:
    """Nodes to run in order, the values they read from outside, and when to free values."""

    nodes: list[fx.Node]
    inputs: set[fx.Node]
    release: dict[fx.Node, list[fx.Node]]
    compute_nodes: int


class SuffixCache:
    """Calibration activations of the current network, stored so that a candidate for one
    wrapped layer runs only the nodes downstream of that layer (see the module docstring).

    ``layers``: the wrapped layers candidates may replace, each called once in ``forward``.
    ``end``: name of the module whose output is the end signal (None: the network's output).
    Call ``refresh`` after the network changed, naming the changed modules when known.
    """

    def __init__(self, model: nn.Module, calib_x: torch.Tensor, layers: Sequence[str], *,
                 end: str | None = None, chunk_size: int | None = None,
                 stats: WorkStats | None = None):
        self.model, self.x = model, calib_x
        self.chunks = chunk_slices(len(calib_x), chunk_size)
        self.stats = stats if stats is not None else WorkStats()
        graph = trace(model)
        self._nodes = list(graph.nodes)
        self._position = {node: i for i, node in enumerate(self._nodes)}
        placeholders = [n for n in self._nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise HbgsError(f"{type(model).__name__}.forward takes {len(placeholders)} inputs; "
                            "the activation cache supports one (pass use_cache=False)")
        self._layer_node = {name: self._single_call(name) for name in layers}
        self._end = self._single_call(end) if end else self._output_value()
        self._check_mutations()
        targets = {self._end} | {node.args[0] for node in self._layer_node.values()}
        self._needed = self._ancestors(targets)
        self._plans = {name: self._plan(self._descendants([node]) & self._needed)
                       for name, node in self._layer_node.items()}
        self._stored = targets.union(*(plan.inputs for plan in self._plans.values()))
        self._full_plan = self._plan(self._needed)
        self._values: list[dict[fx.Node, torch.Tensor]] | None = None

    @property
    def compute_nodes(self) -> int:
        """Compute nodes in the whole graph (the work of one full forward)."""
        return sum(node.op in COMPUTE_OPS for node in self._nodes)

    def refresh(self, changed: Iterable[str] | None = None) -> None:
        """Bring the stored activations up to date. ``changed``: names of the modules whose
        parameters or buffers changed (or that were replaced) since the last refresh; None
        recomputes everything. Only the nodes downstream of changed modules are rerun."""
        if self._values is None or changed is None:
            self._recompute(self._full_plan)
            return
        changed_nodes = self._nodes_of_modules(set(changed))
        if not changed_nodes:
            return
        nodes = self._descendants(changed_nodes) & self._needed
        missing = self._plan(nodes).inputs - self._stored
        while missing:  # a change outside the wrapped layers: go back to stored values
            nodes |= missing
            missing = self._plan(nodes).inputs - self._stored
        self._recompute(self._plan(nodes))

    def layer_inputs(self, layer: str) -> Chunks:
        """``layer``'s input in the current network, per chunk (after ``refresh``)."""
        node = self._layer_node[layer].args[0]
        return [(s, values[node]) for s, values in zip(self.chunks, self._checked_values())]

    def end_values(self, layer: str | None = None, module: nn.Module | None = None) -> Chunks:
        """The end signal per chunk, with ``module`` (default: the current one) in place of
        ``layer`` when given; only the nodes downstream of ``layer`` run."""
        stored = self._checked_values()
        if layer is None:
            return [(s, values[self._end]) for s, values in zip(self.chunks, stored)]
        plan = self._plans[layer]
        target = self._layer_node[layer].target
        module = module if module is not None else self.model.get_submodule(target)
        with evaluating(self.model):
            results = []
            for s, values in zip(self.chunks, stored):
                kept = self._run(plan, s, values, (target, module), keep={self._end})
                results.append((s, kept.get(self._end, values[self._end])))
        self.stats.nodes_run += plan.compute_nodes
        return results

    def nbytes(self) -> int:
        """Bytes held by the stored activations (storages counted once; the calibration
        batch and the model's own tensors not counted)."""
        storages = {}
        for values in self._checked_values():
            for node, value in values.items():
                if node.op in COMPUTE_OPS and isinstance(value, torch.Tensor):
                    storage = value.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    # -- graph analysis ---------------------------------------------------------------------

    def _single_call(self, name: str) -> fx.Node:
        calls = [n for n in self._nodes if n.op == "call_module" and n.target == name]
        if len(calls) != 1:
            raise HbgsError(f"module {name!r} is called {len(calls)} times in the traced forward; "
                            "the activation cache needs each scored module called exactly once "
                            "(pass use_cache=False)")
        return calls[0]

    def _check_mutations(self) -> None:
        """Copying the input of an in-place op (see ``_execute``) is exact only when nothing
        reads that input after the op, as in ``out = relu_(out)`` or ``out += identity``."""
        for node in self._nodes:
            if node.op in COMPUTE_OPS and node.args and isinstance(node.args[0], fx.Node):
                module = self.model.get_submodule(node.target) if node.op == "call_module" \
                    else None
                later = [user for user in node.args[0].users
                         if self._position[user] > self._position[node]]
                if _in_place(node, module) and later:
                    raise HbgsError(f"{type(self.model).__name__}.forward changes "
                                    f"{node.args[0].name} in place ({node.name}) and reads it "
                                    f"afterwards ({later[0].name}); the activation cache cannot "
                                    "follow that: pass use_cache=False")

    def _output_value(self) -> fx.Node:
        output = next(n for n in self._nodes if n.op == "output")
        if not isinstance(output.args[0], fx.Node):
            raise HbgsError("the model's forward must return one tensor (the logits) for the "
                            "activation cache; pass use_cache=False")
        return output.args[0]

    def _ancestors(self, targets: set[fx.Node]) -> set[fx.Node]:
        marked = set(targets)
        for node in reversed(self._nodes):
            if node in marked:
                marked.update(node.all_input_nodes)
        return marked

    def _descendants(self, sources: Iterable[fx.Node]) -> set[fx.Node]:
        marked = set(sources)
        start = min(self._position[n] for n in marked)
        for node in self._nodes[start:]:
            if node not in marked and any(i in marked for i in node.all_input_nodes):
                marked.add(node)
        return marked

    def _plan(self, nodes: set[fx.Node]) -> _Plan:
        ordered = sorted(nodes, key=self._position.__getitem__)
        last_use = {}
        for node in ordered:
            for source in node.all_input_nodes:
                last_use[source] = node
        release = {}
        for source, node in last_use.items():
            release.setdefault(node, []).append(source)
        inputs = {i for node in ordered for i in node.all_input_nodes if i not in nodes}
        return _Plan(ordered, inputs, release, sum(n.op in COMPUTE_OPS for n in ordered))

    def _nodes_of_modules(self, names: set[str]) -> list[fx.Node]:
        """Graph nodes whose module (``call_module``) or attribute (``get_attr``) is one of the
        modules ``names``, lies under one, or contains one."""
        def affected(target: str) -> bool:
            parts = target.split(".")
            return any(".".join(parts[:i]) in names for i in range(len(parts) + 1)) or any(
                name.startswith(target + ".") for name in names)
        return [n for n in self._nodes if n in self._needed and n.op in ("call_module", "get_attr")
                and affected(n.target)]

    # -- execution ----------------------------------------------------------------------------

    def _checked_values(self) -> list[dict]:
        if self._values is None:
            raise RuntimeError("call refresh() first")
        return self._values

    def _recompute(self, plan: _Plan) -> None:
        if self._values is None:
            self._values = [{} for _ in self.chunks]
        with evaluating(self.model):
            for s, values in zip(self.chunks, self._values):
                values.update(self._run(plan, s, values, None, keep=self._stored))
        self.stats.nodes_run += plan.compute_nodes
        if len(plan.nodes) == len(self._full_plan.nodes):
            self.stats.full_forwards += 1

    def _run(self, plan: _Plan, chunk: slice, stored: dict, override, *, keep: set) -> dict:
        """Run ``plan`` on one chunk, reading values from the run itself, else from ``stored``;
        return the values of the nodes in ``keep``."""
        env, kept = {}, {}

        def value(node):
            return env[node] if node in env else stored[node]

        for node in plan.nodes:
            env[node] = self._execute(node, value, chunk, override)
            if node in keep:
                kept[node] = env[node]
            for source in plan.release.get(node, ()):
                env.pop(source, None)
        return kept

    def _execute(self, node: fx.Node, value, chunk: slice, override):
        if node.op == "placeholder":
            return self.x[chunk]
        if node.op == "get_attr":
            return _attribute(self.model, node.target)
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        module = None
        if node.op == "call_module":
            module = (override[1] if override is not None and node.target == override[0]
                      else self.model.get_submodule(node.target))
        if _in_place(node, module) and isinstance(args[0], torch.Tensor):
            # The tensor it would overwrite may be stored in the cache: work on a copy.
            args = (args[0].clone(), *args[1:])
        if module is not None:
            return module(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise RuntimeError(f"unexpected fx node {node.op} {node.target}")


_IN_PLACE_OPERATORS = {
    operator.iadd, operator.iand, operator.iconcat, operator.ifloordiv, operator.ilshift,
    operator.imatmul, operator.imod, operator.imul, operator.ior, operator.ipow, operator.irshift,
    operator.isub, operator.itruediv, operator.ixor, operator.setitem}


def _in_place(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether ``node`` may overwrite its first argument: modules built with ``inplace=True``
    (ReLU, Dropout, ...), ``x += y`` and friends, ``x[i] = v``, ``inplace=True`` keywords,
    and functions or methods named with a trailing underscore (``relu_``, ``add_``)."""
    if not node.args:
        return False
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _IN_PLACE_OPERATORS or (name.endswith("_") and
                                                      not name.endswith("__"))
    return node.op == "call_method" and node.target.endswith("_") and \
        not node.target.endswith("__")


def _attribute(model: nn.Module, target: str):
    value = model
    for part in target.split("."):
        value = getattr(value, part)
    return value
