"""CPU latency of pruned models against the dense one: ``python -m hbgs.bench.latency``.

Prunes the zoo ResNet-20 (``--model resnet56`` for ResNet-56) to about ``--target`` % fewer MACs
in several ways and times every variant in one process, interleaved (each repeat runs every
model once, ``hbgs.accounting.measure_latencies``), at batch 1 and 64 with ``--threads`` torch
threads; prints one markdown table. No accuracy: the question is what a MACs saving buys in
time. The variants (``VARIANTS``, in table order):

Every row is followed by the same model through ``hbgs.export`` (BatchNorm folded, adapters
merged where faster, channels-last if faster; ``…, exported``), so that pruning methods are
compared on equal terms and the ``dense, exported`` row shows how much of the speed-up any model
gets without pruning.

* ``dense``: the zoo model as it is.
* ``hbgs uniform FP-Backward``: ACRA uniform (one ratio for every wrapped conv, found by
  bisection for the MACs target), FP-Backward filters, with adapters (identity ones folded):
  what ``stage=prune`` saves as ``model.pt``; exported, its ``model_exported.pt``.
* ``hbgs uniform FP-Backward, surgery=remove``: the same search with channels removed for real
  (``surgery="remove"``).
* ``TP L1, uniform`` and ``TP group L2, global``: the peers ``method=tp_l1`` and
  ``method=tp_group_norm`` (``hbgs.pruning.peers``: Torch-Pruning 1.6 ``MetaPruner`` with
  ``MagnitudeImportance(p=1)`` at one ratio for every layer, and ``GroupMagnitudeImportance(p=2)``
  ranked across layers), the ratio searched for the same MACs target. Skipped when
  ``torch_pruning`` is not importable.

On the zoo's CIFAR ResNets, ``surgery=remove`` and the peers prune the same channels: each
block's inner ones. The residual streams stay whole: the option-A shortcuts zero-pad by a fixed
count that Torch-Pruning cannot resize.

A new variant is a function ``(dense model, Settings) -> pruned model`` added with
``@variant("name")``. Timings depend on the machine and its load: the load average is printed
with the table.
"""
from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hbgs.accounting import count_macs, count_params, measure_latencies
from hbgs.checkpoint import load_model
from hbgs.zoo import zoo_checkpoint
from hbgs.export import export
from hbgs.pruning import fold_identity_adapters, wrap_model
from hbgs.pruning.acra import uniform_allocation
from hbgs.pruning.peers import torch_pruning_allocation

INPUT_SIZE = (3, 32, 32)


@dataclass
class Settings:
    target_macs: float = 50.0  # % fewer MACs than the dense model
    threads: int = 2  # torch threads for every timing, export's decisions included
    export_batch: int = 64  # the batch export decides merges and layout at


Variant = Callable[[nn.Module, Settings], nn.Module]
VARIANTS: dict[str, Variant] = {}


def variant(name: str) -> Callable[[Variant], Variant]:
    """Register a table row: ``fn(dense, settings)`` returns the model to time (``dense`` must
    not be changed; work on a copy). Each row is built once per dense model and settings, so
    a row may build on another (``exported_row``)."""
    def register(fn: Variant) -> Variant:
        built: dict[tuple, nn.Module] = {}

        def build_once(dense: nn.Module, settings: Settings) -> nn.Module:
            key = (id(dense), repr(settings))
            if key not in built:
                built[key] = fn(dense, settings)
            return built[key]
        VARIANTS[name] = build_once
        return build_once
    return register


def exported_row(base: str) -> None:
    """Register ``"<base>, exported"``: the row ``base`` through ``hbgs.export``."""
    variant(f"{base}, exported")(lambda dense, settings: export(
        VARIANTS[base](dense, settings), batch_size=settings.export_batch, threads=settings.threads))


@variant("dense")
def dense_model(dense: nn.Module, settings: Settings) -> nn.Module:
    return dense


exported_row("dense")


@variant("hbgs uniform FP-Backward")
def hbgs_uniform(dense: nn.Module, settings: Settings) -> nn.Module:
    """With adapters, identity ones folded: what ``stage=prune`` saves as ``model.pt``."""
    wrapped = copy.deepcopy(dense)
    wrap_model(wrapped)
    allocation = uniform_allocation(wrapped, dense, target_flops=settings.target_macs,
                                    method="backward", input_size=INPUT_SIZE)
    fold_identity_adapters(allocation.model)
    return allocation.model.eval()


exported_row("hbgs uniform FP-Backward")


@variant("hbgs uniform FP-Backward, surgery=remove")
def hbgs_uniform_remove(dense: nn.Module, settings: Settings) -> nn.Module:
    """The same ACRA uniform search with ``surgery="remove"``: each channel group loses the
    ratio for real, compensated by least squares on calibration images (random ones here: the
    row is about time, not accuracy)."""
    calib_x = torch.randn(64, *INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    allocation = uniform_allocation(copy.deepcopy(dense), dense, target_flops=settings.target_macs,
                                    method="backward", input_size=INPUT_SIZE, surgery="remove",
                                    calib_x=calib_x)
    return allocation.model.eval()


exported_row("hbgs uniform FP-Backward, surgery=remove")


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        return None
    return torch_pruning


def peer_variant(importance: str) -> Variant:
    """The peer ``method=tp_l1`` / ``tp_group_norm`` at the MACs target (the layers
    Torch-Pruning cannot prune consistently are left out)."""
    def pruned(dense: nn.Module, settings: Settings) -> nn.Module:
        return torch_pruning_allocation(copy.deepcopy(dense), dense, importance=importance,
                                        target_flops=settings.target_macs,
                                        input_size=INPUT_SIZE).model.eval()
    return pruned


if _torch_pruning() is not None:
    for row, importance in (("TP L1, uniform", "l1"), ("TP group L2, global", "group_norm")):
        variant(row)(peer_variant(importance))
        exported_row(row)


def conv_modules(model: nn.Module) -> int:
    """``nn.Conv2d`` modules, adapters included: the conv calls of one forward."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def table(models: dict[str, nn.Module], latency: dict) -> str:
    dense = models["dense"]
    params, macs = count_params(dense), count_macs(dense, INPUT_SIZE)
    ms = latency["median_ms"]
    rows = ["| model variant | params ↓ % | MACs ↓ % | conv modules | latency b64 ms | speed-up | latency b1 ms |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, model in models.items():
        rows.append(f"| {name} | {100 * (1 - count_params(model) / params):.1f} "
                    f"| {100 * (1 - count_macs(model, INPUT_SIZE) / macs):.1f} | {conv_modules(model)} "
                    f"| {ms[name]['64']:.1f} | {ms['dense']['64'] / ms[name]['64']:.2f}× "
                    f"| {ms[name]['1']:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", choices=("resnet20", "resnet56"))
    parser.add_argument("--target", type=float, default=50.0, help="%% fewer MACs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads while timing")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timing repeats")
    args = parser.parse_args(argv)
    settings = Settings(target_macs=args.target, threads=args.threads)
    torch.manual_seed(0)
    dense = load_model(zoo_checkpoint(args.model, "cifar10")).eval()
    models = {name: build(dense, settings) for name, build in VARIANTS.items()}
    load = os.getloadavg()[0]
    latency = measure_latencies(models, (1, 64), INPUT_SIZE, threads=args.threads,
                                repeats=args.repeats)
    print(f"zoo/{args.model}-cifar10.pt, target {args.target:g} % fewer MACs; CPU, torch "
          f"{torch.__version__}, {latency['threads']} threads, batch 1 and 64 (random 3×32×32 "
          f"input), median of {args.repeats} interleaved repeats; load average {load:.2f} at the start")
    print(table(models, latency))
    skipped = "" if _torch_pruning() else " (Torch-Pruning rows skipped: torch_pruning not importable)"
    print(f"speed-up: dense b64 latency / the row's{skipped}")


if __name__ == "__main__":
    main()
