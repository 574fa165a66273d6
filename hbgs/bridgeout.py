"""Batch Bridgeout (docs/algorithms.md §4): multiplicative weight noise that trains networks to be
prunable.

While training, a targeted conv computes with

    W̃ = W + M ⊙ |W|^{q/2} ⊙ ξ,   ξ = r/(1−p) − 1,   r ~ Bernoulli(1−p) elementwise,

one draw of ξ per forward call, i.e. per mini-batch: every example of a batch sees the same
noisy weight, so the conv stays one call. ``M`` is 1 on the ``target_fraction`` of each filter's
kernel slices ``W[j, c]`` with the smallest L2 norm (recomputed from the current weights at
every draw). In evaluation mode the conv uses plain ``W``.

It is a ``torch.nn.utils.parametrize`` parametrization of ``conv.weight``: gradients flow
through ``|W|^{q/2}`` as the derivation of the L_q penalty assumes, the optimizer keeps updating
the one underlying ``W``, and removing it leaves the plain trained weights. Plain PyTorch:
``add_bridgeout(model)`` / ``remove_bridgeout(model)``; with Lightning, ``BridgeoutCallback``
does both around a fit (so checkpoints written during the fit resume into the same state).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import parametrize

from hbgs.errors import HbgsError

DEFAULTS = {"p": 0.3, "q": 1.5, "target_fraction": 0.75}


class BatchBridgeout(nn.Module):
    """The parametrization ``W ↦ W̃`` of one conv weight (identity in eval mode)."""

    def __init__(self, p: float = 0.3, q: float = 1.5, target_fraction: float = 0.75):
        super().__init__()
        check_settings(p, q, target_fraction)
        self.p, self.q, self.target_fraction = float(p), float(q), float(target_fraction)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.target_fraction == 0:
            return weight
        keep = torch.bernoulli(torch.full_like(weight, 1 - self.p))
        noise = keep / (1 - self.p) - 1
        # |W|^{q/2} has an infinite slope at 0 for q < 2; the floor keeps its gradient finite
        scale = weight.abs().clamp_min(1e-12).pow(self.q / 2)
        return weight + target_mask(weight.detach(), self.target_fraction) * scale * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, q={self.q}, target_fraction={self.target_fraction}"


def target_mask(weight: torch.Tensor, target_fraction: float) -> torch.Tensor:
    """1 on the ``round(target_fraction · C_in)`` kernel slices ``W[j, c]`` of each filter ``j``
    with the smallest L2 norm (ties broken by channel index), 0 elsewhere; shaped like
    ``weight`` (C_out, C_in/groups, kH, kW)."""
    norms = weight.flatten(2).norm(dim=2)  # (C_out, C_in/groups): one norm per kernel slice
    count = int(target_fraction * norms.shape[1] + 0.5)
    mask = torch.zeros_like(norms)
    if count:
        lowest = torch.sort(norms, dim=1, stable=True).indices[:, :count]
        mask.scatter_(1, lowest, 1.0)
    return mask[:, :, None, None].expand_as(weight)


def check_settings(p: float, q: float, target_fraction: float) -> None:
    if not 0 <= p < 1:
        raise HbgsError(f"bridgeout p (drop probability) must lie in [0, 1), got {p!r}")
    if not q > 0:
        raise HbgsError(f"bridgeout q (the exponent of the L_q penalty) must be positive, got {q!r}")
    if not 0 <= target_fraction <= 1:
        raise HbgsError(f"bridgeout target_fraction must lie in [0, 1], got {target_fraction!r}")


def is_target(module: nn.Module) -> bool:
    """Convs with a spatial kernel (the paper: every 3×3 conv); 1×1 convs and adapters are left plain."""
    return isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1


def add_bridgeout(model: nn.Module, p: float = 0.3, q: float = 1.5, target_fraction: float = 0.75) -> list[str]:
    """Give every targeted conv of ``model`` Bridgeout noise (in place); return their names."""
    names = []
    for name, module in model.named_modules():
        if is_target(module) and not has_bridgeout(module):
            parametrize.register_parametrization(module, "weight", BatchBridgeout(p, q, target_fraction))
            names.append(name)
    if not names:
        raise HbgsError("bridgeout found no conv with a spatial kernel (> 1×1) in this model to regularise")
    return names


def remove_bridgeout(model: nn.Module) -> list[str]:
    """Undo ``add_bridgeout``: every conv gets back its plain, trained ``weight`` parameter."""
    names = []
    for name, module in model.named_modules():
        if has_bridgeout(module):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            names.append(name)
    return names


def has_bridgeout(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, BatchBridgeout) for p in module.parametrizations.weight)


class BridgeoutCallback(Callback):
    """Bridgeout on the LightningModule's ``model`` for the length of a fit.

    Added in ``setup`` (before Lightning restores a checkpoint to resume from, so the restored
    state matches) and removed in ``teardown``; testing and saving after the fit see plain
    weights."""

    def __init__(self, p: float = 0.3, q: float = 1.5, target_fraction: float = 0.75):
        check_settings(p, q, target_fraction)
        self.settings = {"p": p, "q": q, "target_fraction": target_fraction}
        self.targets: list[str] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.targets = add_bridgeout(pl_module.model, **self.settings)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            remove_bridgeout(pl_module.model)


def regularizer_callbacks(cfg: Mapping | None) -> list[Callback]:
    """The Lightning callbacks for a ``regularizer`` config (``name: none | bridgeout``)."""
    name = (cfg or {}).get("name", "none")
    if name == "none":
        return []
    if name == "bridgeout":
        return [BridgeoutCallback(**{k: cfg.get(k, v) for k, v in DEFAULTS.items()})]
    raise HbgsError(f"unknown regularizer {name!r}: use regularizer=none or regularizer=bridgeout")
