"""How a pruned network's calibration outputs are scored (docs/algorithms.md §2, §3): the
relative error against reference outputs (HBGS, HBGTS), and the cross-entropy and accuracy
against the labels (HBGTS's ``loss`` signal, ACRA's sensitivity). All are accumulated in
float64 over the chunks of the calibration batch."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from hbgs.pruning.activations import Chunks


def relative_error(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``||A − B|| / ||B||`` over all pairs (chunks) together, accumulated in float64."""
    error = norm = 0.0
    for a, b in pairs:
        b = b.double()
        error += (a.double() - b).square().sum().item()
        norm += b.square().sum().item()
    return math.sqrt(error / norm) if norm > 0 else math.inf


def loss(values: Chunks, labels: torch.Tensor) -> float:
    """The mean cross-entropy of the logits ``values`` (per chunk) against ``labels``."""
    total = sum(F.cross_entropy(v.double(), labels[s], reduction="sum").item() for s, v in values)
    return total / len(labels)


def accuracy(values: Chunks, labels: torch.Tensor) -> float:
    """The % of ``labels`` that the logits ``values`` (per chunk) rank first."""
    correct = sum((v.argmax(1) == labels[s]).sum().item() for s, v in values)
    return 100.0 * correct / len(labels)
