"""Params, FLOPs and latency of a model.

FLOPs here are multiply-accumulates (MACs) of conv and linear layers for one image, the convention
of the CIFAR pruning literature; PyTorch's FlopCounterMode counts 2 FLOPs per MAC, so we halve it.
BatchNorm, activations, pooling and additions are not counted.
"""

import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

COUNTED_OPS = ("convolution", "addmm", "mm", "bmm")


def count_params(model: nn.Module) -> int:
    """All parameters (weights, biases, BatchNorm affine), not buffers."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size=(3, 32, 32)) -> int:
    """Multiply-accumulates of conv and linear layers for one image of `input_size`."""
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    flops = sum(n for op, n in counter.get_flop_counts()["Global"].items() if op.__name__.split(".")[0] in COUNTED_OPS)
    return flops // 2


@torch.no_grad()
def measure_latency(model: nn.Module, batch_size: int = 1, input_size=(3, 32, 32), threads: int | None = None,
                    warmup: int = 5, repeats: int = 20) -> dict:
    """Median CPU wall time of one forward pass, in milliseconds, with the settings stated."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    model_cpu = model.to("cpu")
    x = torch.randn(batch_size, *input_size)
    try:
        for _ in range(warmup):
            model_cpu(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model_cpu(x)
            times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
        torch.set_num_threads(previous_threads)
    times.sort()
    return {"latency_ms": 1000 * times[len(times) // 2], "batch_size": batch_size,
            "threads": threads or previous_threads, "device": "cpu"}


def model_stats(model: nn.Module, input_size=(3, 32, 32)) -> dict:
    return {"params": count_params(model), "macs": count_macs(model, input_size)}
