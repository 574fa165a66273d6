"""Export for inference: a pruned model rewritten to run as fast as its structure allows (CPU).

Pruning with adapters saves MACs but not time: every adapter is one more conv call and keeps
activations at the original width, so a pruned model can be slower than the dense one. The same
function can be computed with fewer, cheaper calls:

1. **Identity adapters dropped** (``fold_identity_adapters``): sides that were never pruned.
2. **BatchNorm folded** into the conv that feeds it. In eval mode a BatchNorm is a per-channel
   affine map, so ``BN(conv(x))`` is ``conv'(x)`` with each output filter scaled and a bias
   added: exact for any conv, grouped ones included. The pairs are found with ``torch.fx``
   (``AdaptedConv`` traced as one leaf): a BatchNorm whose input is a conv's (or an
   ``AdaptedConv``'s) output that nothing else reads, each called once. Into an ``AdaptedConv``
   it folds into the out-adapter (its last op), else into its conv. The BatchNorm module becomes
   ``nn.Identity``, so the model's own ``forward`` keeps working. A model fx cannot trace keeps
   its BatchNorms (with a warning).
3. **Adapters merged into their conv, where measured faster.** ``G ∘ conv`` is one conv with
   ``G W`` as weight (``G b + β`` as bias), ``conv ∘ P`` one with ``W P`` (``P`` is bias-free, so
   zero padding commutes with it); only for ``groups == 1``. Merging removes a call but widens
   the conv back towards its original width, so whether it pays depends on the shapes and the
   machine: each variant of each layer (as is, merge in, merge out, merge both) is timed on an
   input of the layer's real shape at ``batch_size`` (median of interleaved repeats) and the
   fastest is kept. A layer left with no adapters becomes its plain conv.
4. **channels_last**: the whole process above is run for both memory layouts (the layer timings
   with inputs in that layout), and the layout whose whole model is faster at ``batch_size`` is
   kept. A channels-last model's weights say so; ``save_model`` records it and ``load_model``
   restores it (``hbgs.checkpoint``).

The result is a new model in eval mode on the CPU, without gradients; the input model is not
changed. ``export(..., report=True)`` also returns an ``ExportReport`` of what was done, with
the measured times. Timings depend on the machine and its load: export on the machine (and
thread count) the model will serve on.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from hbgs.accounting import measure_latencies
from hbgs.errors import HbgsError
from hbgs.pruning.adapters import AdaptedConv, fold_identity_adapters
from hbgs.pruning.suffix import AdaptedConvTracer

VARIANTS = ("as_is", "merge_in", "merge_out", "merge_both")
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass
class LayerChoice:
    """The variant kept for one ``AdaptedConv`` and the median ms of each variant timed."""

    layer: str
    input_shape: list[int]
    choice: str
    times_ms: dict[str, float]


@dataclass
class ExportReport:
    """What ``export`` did. ``batchnorms_folded``: BatchNorm → the conv it went into (at folding
    time: when that conv is an out-adapter merged later, the merged conv holds it);
    ``batchnorms_kept``: BatchNorm → why not; ``adapters_dropped``: layers that lost identity
    adapters; ``merges``: per remaining ``AdaptedConv`` the variant kept, with the timings;
    ``layout_ms``: the whole model's median ms at ``batch_size`` in each memory layout;
    ``max_relative_difference``: of the exported model's output against the input model's on
    the example input (relative to the largest output)."""

    batch_size: int
    threads: int
    repeats: int
    adapters_dropped: list[str] = field(default_factory=list)
    batchnorms_folded: dict[str, str] = field(default_factory=dict)
    batchnorms_kept: dict[str, str] = field(default_factory=dict)
    merges: list[LayerChoice] = field(default_factory=list)
    channels_last: bool = False
    layout_ms: dict[str, float] = field(default_factory=dict)
    max_relative_difference: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain data (JSON, the model file's meta), with the one-line ``summary`` first."""
        return {"summary": self.summary(), **asdict(self)}

    def summary(self) -> str:
        """One line for a log."""
        chosen = Counter(m.choice for m in self.merges)
        return (f"{len(self.batchnorms_folded)} BatchNorms folded ({len(self.batchnorms_kept)} "
                f"kept), {len(self.adapters_dropped)} layers lost identity adapters, merges "
                f"{dict(chosen) or 'none'}, channels_last={self.channels_last}")


def export(model: nn.Module, *, example_input: torch.Tensor | None = None,
           input_size: Sequence[int] = (3, 32, 32), batch_size: int = 64,
           threads: int | None = None, repeats: int = 7, report: bool = False):
    """A new inference model computing what ``model`` computes (eval mode), faster on this CPU.

    ``example_input``: one input batch (any batch size) to trace the layers' input shapes with;
    default a random one of ``input_size``. ``batch_size``: the batch the timings that decide
    merges and layout are taken at (the serving batch). ``threads``: torch threads for the
    timings (None: the current setting). ``repeats``: interleaved timing repeats per decision.
    Returns the model, or ``(model, ExportReport)`` with ``report=True``.
    """
    _check(model, example_input, batch_size, repeats, threads)
    exported = copy.deepcopy(model).to("cpu").eval().requires_grad_(False)
    dtype = next(exported.parameters()).dtype
    if example_input is None:
        example_input = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    example = example_input.detach().to("cpu", dtype)
    with torch.no_grad():
        expected = exported(example)
    info = ExportReport(batch_size=batch_size, threads=threads or torch.get_num_threads(),
                        repeats=repeats)
    info.adapters_dropped = drop_identity_adapters(exported)
    info.batchnorms_folded, info.batchnorms_kept, warning = fold_batchnorms(exported)
    info.warnings += [warning] if warning else []

    candidates, merges = {}, {}
    for layout, memory_format in LAYOUTS.items():
        candidate = copy.deepcopy(exported).to(memory_format=memory_format)
        merges[layout] = choose_merges(candidate, example, batch_size=batch_size, threads=threads,
                                       repeats=repeats, memory_format=memory_format)
        candidates[layout] = candidate
    timed = measure_latencies(candidates, (batch_size,), tuple(example.shape[1:]), threads,
                              warmup=2, repeats=repeats)
    info.layout_ms = {layout: per_batch[str(batch_size)]
                      for layout, per_batch in timed["median_ms"].items()}
    best = min(info.layout_ms, key=info.layout_ms.get)
    exported, info.merges, info.channels_last = candidates[best], merges[best], best == "channels_last"

    with torch.no_grad():
        got = exported(example)
    info.max_relative_difference = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    return (exported, info) if report else exported


# -- 1. identity adapters -----------------------------------------------------------------------

def drop_identity_adapters(model: nn.Module) -> list[str]:
    """``fold_identity_adapters`` in place; the names of the layers that lost an adapter."""
    before = _adapter_counts(model)
    fold_identity_adapters(model)
    after = _adapter_counts(model)
    return [name for name, count in before.items() if after.get(name, 0) < count]


def _adapter_counts(model: nn.Module) -> dict[str, int]:
    return {name: (m.in_adapter is not None) + (m.out_adapter is not None)
            for name, m in model.named_modules() if isinstance(m, AdaptedConv)}


# -- 2. BatchNorm folding -----------------------------------------------------------------------

def fold_batchnorms(model: nn.Module) -> tuple[dict[str, str], dict[str, str], str | None]:
    """Fold every foldable ``BatchNorm2d`` of ``model`` (eval mode) into the conv feeding it, in
    place, and put ``nn.Identity`` in its place. Returns (folded: BatchNorm → conv it went
    into, kept: BatchNorm → reason, warning or None when fx cannot trace the model)."""
    try:
        graph = AdaptedConvTracer().trace(model)
    except Exception as err:
        message = (f"BatchNorms not folded: torch.fx cannot trace {type(model).__name__}.forward "
                   f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
        warnings.warn(message, stacklevel=3)
        return {}, {}, message
    modules = dict(model.named_modules())
    calls = Counter(id(modules[n.target]) for n in graph.nodes if n.op == "call_module")
    folded, kept = {}, {}
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) is not nn.BatchNorm2d:
            continue
        target, reason = _fold_target(node, modules, calls)
        if reason:
            kept[node.target] = reason
            continue
        _fold_into(modules[target], modules[node.target])
        model.set_submodule(node.target, nn.Identity())
        folded[node.target] = target
    return folded, kept, None


def _fold_target(bn_node: fx.Node, modules: dict, calls: Counter) -> tuple[str | None, str | None]:
    """(name of the conv to fold ``bn_node``'s BatchNorm into, None) or (None, why not)."""
    bn = modules[bn_node.target]
    source = bn_node.args[0] if len(bn_node.args) == 1 and not bn_node.kwargs else None
    if not isinstance(source, fx.Node) or source.op != "call_module" or \
            type(modules[source.target]) not in (nn.Conv2d, AdaptedConv):
        return None, "its input is not the output of a conv"
    if len(source.users) != 1:
        return None, f"the output of {source.target} is also read elsewhere"
    if calls[id(bn)] != 1 or calls[id(modules[source.target])] != 1:
        return None, f"it or {source.target} is called more than once"
    if bn.running_mean is None or bn.running_var is None:
        return None, "no running statistics (it normalises with batch statistics)"
    producer = modules[source.target]
    if isinstance(producer, AdaptedConv):
        target = f"{source.target}.out_adapter" if producer.out_adapter is not None else f"{source.target}.conv"
    else:
        target = source.target
    conv = modules[target]
    if type(conv) is not nn.Conv2d or conv.out_channels != bn.num_features:
        return None, f"{target} is not a plain Conv2d with {bn.num_features} output channels"
    return target, None


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``conv ← bn ∘ conv`` (eval-mode BatchNorm), computed in float64; adds a bias if missing."""
    inv_std = (bn.running_var.double() + bn.eps).rsqrt()
    scale = inv_std * bn.weight.double() if bn.affine else inv_std
    shift = (bn.bias.double() if bn.affine else 0) - bn.running_mean.double() * scale
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    conv.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
    new_bias = (bias * scale + shift).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=False)
    else:
        conv.bias.copy_(new_bias)


# -- 3. adapter merges --------------------------------------------------------------------------

def merge_variants(layer: AdaptedConv) -> dict[str, nn.Module]:
    """Every applicable variant of ``layer`` computing the same function: ``as_is`` always;
    ``merge_in`` / ``merge_out`` / ``merge_both`` where that adapter exists and the conv has
    ``groups == 1`` (and the in-adapter no bias). A variant without adapters is a plain conv."""
    can_in = layer.in_adapter is not None and layer.in_adapter.bias is None and layer.conv.groups == 1
    can_out = layer.out_adapter is not None and layer.conv.groups == 1
    variants: dict[str, nn.Module] = {"as_is": layer}
    if can_in:
        variants["merge_in"] = _plain_if_bare(AdaptedConv(_merged_in(layer.conv, layer.in_adapter),
                                                          None, layer.out_adapter))
    if can_out:
        variants["merge_out"] = _plain_if_bare(AdaptedConv(_merged_out(layer.conv, layer.out_adapter),
                                                           layer.in_adapter, None))
    if can_in and can_out:
        variants["merge_both"] = _merged_out(_merged_in(layer.conv, layer.in_adapter), layer.out_adapter)
    return variants


def choose_merges(model: nn.Module, example: torch.Tensor, *, batch_size: int,
                  threads: int | None, repeats: int,
                  memory_format: torch.memory_format = torch.contiguous_format) -> list[LayerChoice]:
    """For each ``AdaptedConv`` of ``model``, time its variants (``merge_variants``) on an input
    of its real shape at ``batch_size`` and put the fastest in its place, in place."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AdaptedConv) and name}
    shapes = _input_shapes(model, example, layers)
    choices = []
    for name, layer in layers.items():
        variants = {k: v.to(memory_format=memory_format) for k, v in merge_variants(layer).items()}
        if len(variants) == 1 or name not in shapes:
            choices.append(LayerChoice(name, list(shapes.get(name, [])), "as_is", {}))
            continue
        shape = (batch_size, *shapes[name][1:])
        timed = measure_latencies(variants, (batch_size,), shape[1:], threads, warmup=2,
                                  repeats=repeats, input_memory_format=memory_format)
        times = {variant: per_batch[str(batch_size)] for variant, per_batch in timed["median_ms"].items()}
        best = min(times, key=times.get)
        model.set_submodule(name, variants[best])
        choices.append(LayerChoice(name, list(shape), best, times))
    return choices


def _input_shapes(model: nn.Module, example: torch.Tensor, layers: dict) -> dict[str, tuple]:
    """The input shape of each named layer at its first call in ``model(example)``."""
    shapes = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: the input stays as is
        return hook

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, bias, conv.padding_mode,
                     dtype=conv.weight.dtype).requires_grad_(False)


@torch.no_grad()
def _merged_in(conv: nn.Conv2d, adapter: nn.Conv2d) -> nn.Conv2d:
    """``conv ∘ adapter`` as one conv: ``W'[o, c] = Σ_m W[o, m] P[m, c]``."""
    P = adapter.weight.double().flatten(1)  # m × C_in
    merged = _conv_like(conv, adapter.in_channels, conv.out_channels, conv.bias is not None)
    merged.weight.copy_(torch.einsum("omhw,mc->ochw", conv.weight.double(), P))
    if conv.bias is not None:
        merged.bias.copy_(conv.bias)
    return merged


@torch.no_grad()
def _merged_out(conv: nn.Conv2d, adapter: nn.Conv2d) -> nn.Conv2d:
    """``adapter ∘ conv`` as one conv: ``W' = G W``, ``b' = G b + β``."""
    G = adapter.weight.double().flatten(1)  # C_out × s
    has_bias = conv.bias is not None or adapter.bias is not None
    merged = _conv_like(conv, conv.in_channels, adapter.out_channels, has_bias)
    merged.weight.copy_(torch.einsum("po,oihw->pihw", G, conv.weight.double()))
    if has_bias:
        bias = G @ conv.bias.double() if conv.bias is not None else torch.zeros(G.shape[0], dtype=G.dtype)
        merged.bias.copy_(bias + (adapter.bias.double() if adapter.bias is not None else 0))
    return merged


def _plain_if_bare(layer: AdaptedConv) -> nn.Module:
    return layer.conv if layer.in_adapter is None and layer.out_adapter is None else layer


def _check(model, example_input, batch_size, repeats, threads) -> None:
    if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
        raise HbgsError(f"export needs an nn.Module with parameters, got {type(model).__name__}")
    if example_input is not None and (not isinstance(example_input, torch.Tensor) or example_input.dim() < 2):
        raise HbgsError("example_input must be one input batch (a tensor with a batch dimension), "
                        "e.g. torch.randn(1, 3, 32, 32); or pass input_size=(3, 32, 32) instead")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HbgsError(f"batch_size={batch_size!r}: give the positive batch size the model will serve at, e.g. 64")
    if repeats < 1:
        raise HbgsError(f"repeats={repeats}: give at least 1 timing repeat")
    if threads is not None and threads < 1:
        raise HbgsError(f"threads={threads}: give a positive thread count, or None for torch's default")
