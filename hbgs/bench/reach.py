"""How far torchvision networks prune: ``python -m hbgs.bench.reach [model ...]``.

With the paper's adapters only convs with a spatial kernel and two or more channels per group
are prunable, so networks built of 1×1 convs, depthwise convs and Linear layers barely shrink.
With ``surgery="remove"`` every channel group is prunable (the classifier's outputs aside). For
each model (10 classes, 64×64 inputs, random weights and random calibration images: the question
is reach, not accuracy) this prints the wrapped layers the adapters would get, the channel groups
``surgery=remove`` finds, and ACRA uniform FP-Backward with ``surgery="remove"`` at ``--target`` %
fewer params: the ratio found and the reductions reached.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision

from hbgs.errors import HbgsError
from hbgs.pruning import wrap_model, wrapped_layers
from hbgs.pruning.acra import uniform_allocation
from hbgs.pruning.surgery import ChannelSurgery

MODELS = ("mobilenet_v2", "efficientnet_b0", "regnet_x_400mf", "resnext50_32x4d", "vgg11_bn")
INPUT_SIZE = (3, 64, 64)


def adapter_layers(model: torch.nn.Module) -> int:
    """Layers the paper's adapters can prune (0 when none)."""
    wrapped = copy.deepcopy(model)
    wrap_model(wrapped)
    try:
        return len(wrapped_layers(wrapped))
    except HbgsError:
        return 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS), help="torchvision model names")
    parser.add_argument("--target", type=float, default=50.0, help="%% fewer params")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    calib_x = torch.randn(32, *INPUT_SIZE)
    print(f"10 classes, {INPUT_SIZE[1]}×{INPUT_SIZE[2]} inputs; uniform FP-Backward, surgery=remove, "
          f"target {args.target:g} % fewer params")
    print("| model | adapter layers | channel groups | ratio | params ↓ % | MACs ↓ % | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        model = getattr(torchvision.models, name)(num_classes=10).eval().requires_grad_(False)
        start = time.perf_counter()
        groups = len(ChannelSurgery(model, calib_x[:1]).groups())
        result = uniform_allocation(copy.deepcopy(model), model, target_params=args.target,
                                    tolerance=2, method="backward", surgery="remove",
                                    calib_x=calib_x, input_size=INPUT_SIZE)
        print(f"| {name} | {adapter_layers(model)} | {groups} | {result.ratio:.3f} "
              f"| {result.cost.params_reduction:.1f} | {result.cost.flops_reduction:.1f} "
              f"| {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
