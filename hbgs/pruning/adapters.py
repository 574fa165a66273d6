"""1×1 adapters around K×K convolutions (docs/algorithms.md §1.2).

A prunable conv is wrapped as ``in_adapter (1×1) → conv (K×K) → out_adapter (1×1)``. The
adapters start as identities and restore the conv's original widths after pruning, so
BatchNorm, nonlinearities and residual additions around the conv are never touched. Removing
channels then means: keep a subset of the conv's filters (or input channels) and fold the
least-squares coefficients ``Λ`` of the removed ones into the adapter (``compensation.py``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from hbgs.errors import HbgsError


class AdaptedConv(nn.Module):
    """``in_adapter → conv → out_adapter``; either adapter may be ``None`` (absent).

    ``in_adapter`` is a bias-free 1×1 conv ``C_in_orig → m`` (a bias there would be wrong at the
    conv's zero padding); ``out_adapter`` is a 1×1 conv ``s → C_out_orig`` with a bias, which
    absorbs the constant left over when the conv's own bias is compensated.
    """

    def __init__(self, conv: nn.Conv2d, in_adapter: nn.Conv2d | None = None,
                 out_adapter: nn.Conv2d | None = None):
        super().__init__()
        self.in_adapter = in_adapter
        self.conv = conv
        self.out_adapter = out_adapter

    @classmethod
    def wrap(cls, conv: nn.Conv2d) -> "AdaptedConv":
        """Wrap ``conv`` (the same object, not a copy) between identity adapters."""
        return cls(conv, identity_adapter(conv.in_channels, bias=False, like=conv.weight),
                   identity_adapter(conv.out_channels, bias=True, like=conv.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_adapter is not None:
            x = self.in_adapter(x)
        x = self.conv(x)
        if self.out_adapter is not None:
            x = self.out_adapter(x)
        return x

    @property
    def in_channels(self) -> int:
        """Input width seen from outside (the original width)."""
        return self.in_adapter.in_channels if self.in_adapter is not None else self.conv.in_channels

    @property
    def out_channels(self) -> int:
        """Output width seen from outside (the original width)."""
        return (self.out_adapter.out_channels if self.out_adapter is not None
                else self.conv.out_channels)

    def spec(self) -> dict:
        """Shapes and hyper-parameters that rebuild this module (weights aside); plain types only."""
        c = self.conv
        return {
            "conv": {"in_channels": c.in_channels, "out_channels": c.out_channels,
                     "kernel_size": tuple(c.kernel_size), "stride": tuple(c.stride),
                     "padding": c.padding if isinstance(c.padding, str) else tuple(c.padding),
                     "dilation": tuple(c.dilation), "groups": c.groups,
                     "bias": c.bias is not None, "padding_mode": c.padding_mode},
            "in_adapter": (None if self.in_adapter is None else
                           {"in_channels": self.in_adapter.in_channels,
                            "out_channels": self.in_adapter.out_channels,
                            "bias": self.in_adapter.bias is not None}),
            "out_adapter": (None if self.out_adapter is None else
                            {"in_channels": self.out_adapter.in_channels,
                             "out_channels": self.out_adapter.out_channels,
                             "bias": self.out_adapter.bias is not None}),
        }

    @classmethod
    def from_spec(cls, spec: dict, like: torch.Tensor | None = None) -> "AdaptedConv":
        """An ``AdaptedConv`` of the shapes in ``spec`` (weights to be loaded afterwards), on
        the device and dtype of ``like`` (default: torch's defaults)."""
        place = {} if like is None else {"device": like.device, "dtype": like.dtype}

        def adapter(s):
            return None if s is None else nn.Conv2d(s["in_channels"], s["out_channels"], 1,
                                                    bias=s["bias"], **place)
        return cls(nn.Conv2d(**spec["conv"], **place), adapter(spec["in_adapter"]),
                   adapter(spec["out_adapter"]))


def identity_adapter(channels: int, *, bias: bool, like: torch.Tensor) -> nn.Conv2d:
    """A 1×1 conv computing the identity on ``channels`` channels (dtype/device of ``like``)."""
    adapter = nn.Conv2d(channels, channels, 1, bias=bias, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(channels, dtype=like.dtype, device=like.device)
                            .view(channels, channels, 1, 1))
        if bias:
            adapter.bias.zero_()
    return adapter


def is_prunable(conv: nn.Conv2d) -> bool:
    """A K×K conv (K > 1) with at least two channels per group on both sides. Depthwise convs
    (one channel per group) are not prunable: removing a channel would remove a whole group."""
    return (max(conv.kernel_size) > 1 and conv.in_channels // conv.groups > 1
            and conv.out_channels // conv.groups > 1)


def wrap_model(model: nn.Module) -> list[str]:
    """Wrap every prunable conv (``is_prunable``) between identity adapters, in place, except
    the network's first conv; return the names of all wrapped layers.

    "First" is the first ``nn.Conv2d`` in module registration order (``named_modules``), which
    is the stem conv of every model in the zoo and of torchvision's; no forward pass is needed.
    The wrapped model computes the same function. Idempotent: already wrapped layers are kept.
    """
    wrapped = {name for name, m in model.named_modules() if isinstance(m, AdaptedConv)}
    convs = [(name, m) for name, m in model.named_modules()
             if (isinstance(m, nn.Conv2d) and _parent(name) not in wrapped) or name in wrapped]
    for name, conv in convs[1:]:
        if name not in wrapped and name and is_prunable(conv):
            model.set_submodule(name, AdaptedConv.wrap(conv))
    return [name for name, m in model.named_modules() if isinstance(m, AdaptedConv)]


def wrapped_layers(model: nn.Module) -> list[str]:
    """Names of the wrapped convs of ``model``; HbgsError saying why when there are none."""
    names = [name for name, m in model.named_modules() if isinstance(m, AdaptedConv) and name]
    if names:
        return names
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if any(is_prunable(conv) for conv in convs[1:]):
        raise HbgsError(f"{type(model).__name__} has no wrapped layers: call "
                        "hbgs.pruning.wrap_model(model) first")
    raise HbgsError(f"{type(model).__name__} has no layer the adapters can prune: they wrap convs "
                    "with a spatial kernel and at least two channels per group, except the first, "
                    "and it has none; its 1×1 convs, depthwise convs and Linear layers are "
                    "prunable with surgery='remove' (channels removed for real)")


def with_identity_adapters(model: nn.Module) -> nn.Module:
    """A wrapped copy of ``model`` (no folding): the adapter-augmented network that the reference
    code measured reductions against (docs/algorithms.md §5). ``model`` itself is not changed."""
    augmented = copy.deepcopy(model)
    wrap_model(augmented)
    return augmented


def fold_identity_adapters(model: nn.Module) -> list[str]:
    """Remove the adapters of sides that were never pruned, in place; return the names of the
    layers that keep an adapter (the pruned ones).

    A side's adapter is "never pruned" when it is square (its conv still has the original width
    there). If it is still the identity it is dropped. If fine-tuning changed it, it is merged
    into the conv exactly (``W ← G W``, ``b ← G b + β`` or ``W ← W P``), except for grouped
    convs (a dense adapter would mix groups) and an out-adapter with a non-zero bias on a
    bias-free conv (the conv would gain parameters its class does not have); those stay.
    An ``AdaptedConv`` left without adapters is replaced by its plain conv. Pruned sides keep
    their adapters: folding them would undo the saving.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, AdaptedConv):
            continue
        with torch.no_grad():
            if _square(module.in_adapter) and _fold_in_adapter(module):
                module.in_adapter = None
            if _square(module.out_adapter) and _fold_out_adapter(module):
                module.out_adapter = None
        if module.in_adapter is None and module.out_adapter is None and name:
            model.set_submodule(name, module.conv)
    return [name for name, m in model.named_modules() if isinstance(m, AdaptedConv)]


def drop_identity_adapters(model: nn.Module) -> None:
    """Remove the identity adapters (sides never pruned) of every wrapped layer, in place; the
    layers stay wrapped and prunable (an absent adapter acts as the identity) and the network
    computes the same function. Fine-tuning then has no identity adapter to move: a moved one
    could not always be folded away (an out-adapter's bias on a bias-free conv), so the saved
    network would carry adapters that no round counted."""
    for layer in model.modules():
        if isinstance(layer, AdaptedConv):
            if _is_identity(layer.in_adapter):
                layer.in_adapter = None
            if _is_identity(layer.out_adapter):
                layer.out_adapter = None


def _is_identity(adapter: nn.Conv2d | None) -> bool:
    if adapter is None or adapter.in_channels != adapter.out_channels:
        return False
    weight = adapter.weight.detach().flatten(1)
    return torch.equal(weight, torch.eye(len(weight), dtype=weight.dtype, device=weight.device)) \
        and (adapter.bias is None or not adapter.bias.any())


@dataclass
class LayerWidths:
    """Channel widths of one wrapped conv: as the network sees it (original) and inside."""

    in_original: int
    in_current: int
    out_original: int
    out_current: int


def channel_widths(model: nn.Module) -> dict[str, LayerWidths]:
    """``{name: LayerWidths}`` for every ``AdaptedConv`` in ``model``, in registration order."""
    return {name: LayerWidths(m.in_channels, m.conv.in_channels, m.out_channels,
                              m.conv.out_channels)
            for name, m in model.named_modules() if isinstance(m, AdaptedConv)}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` in ``model`` and return the module it replaced (to try a
    pruned candidate and put the original back)."""
    old = model.get_submodule(name)
    model.set_submodule(name, module)
    return old


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _square(adapter: nn.Conv2d | None) -> bool:
    return adapter is not None and adapter.in_channels == adapter.out_channels


def _fold_in_adapter(module: AdaptedConv) -> bool:
    """Merge a square in-adapter ``P`` into the conv (``W ← W P``); False if it must stay."""
    P = module.in_adapter.weight.flatten(1)
    if torch.equal(P, torch.eye(P.shape[0], dtype=P.dtype, device=P.device)):
        return True
    if module.conv.groups != 1:
        return False
    module.conv.weight.copy_(torch.einsum("oihw,ic->ochw", module.conv.weight, P))
    return True


def _fold_out_adapter(module: AdaptedConv) -> bool:
    """Merge a square out-adapter ``G, β`` into the conv; False if it must stay."""
    adapter, conv = module.out_adapter, module.conv
    G = adapter.weight.flatten(1)
    has_offset = adapter.bias is not None and bool(adapter.bias.any())
    if torch.equal(G, torch.eye(G.shape[0], dtype=G.dtype, device=G.device)) and not has_offset:
        return True
    if conv.groups != 1 or (has_offset and conv.bias is None):
        return False
    conv.weight.copy_(torch.einsum("po,oihw->pihw", G, conv.weight))
    if conv.bias is not None:
        conv.bias.copy_(G @ conv.bias + (adapter.bias if adapter.bias is not None else 0))
    return True
