"""Params, FLOPs and latency of models.

FLOPs here are multiply-accumulates (MACs) of conv and linear layers for one image, the convention
of the CIFAR pruning literature; PyTorch's FlopCounterMode counts 2 FLOPs per MAC, so we halve it.
BatchNorm, activations, pooling and additions are not counted.

Latency: ``measure_latencies`` times several models together, interleaved, in one process, so that
their ratios are not at the mercy of what else the machine did between separate measurements.
"""

import copy
import statistics
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from hbgs.errors import HbgsError

COUNTED_OPS = ("convolution", "addmm", "mm", "bmm")


def count_params(model: nn.Module) -> int:
    """All parameters (weights, biases, BatchNorm affine), not buffers."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size=(3, 32, 32)) -> int:
    """Multiply-accumulates of conv and linear layers for one image of `input_size`, counted
    where ``model`` is (its first weight's device and dtype); every submodule's mode is
    restored afterwards."""
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, dtype=param.dtype, device=param.device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for module, training in modes:
            module.training = training
    flops = sum(n for op, n in counter.get_flop_counts()["Global"].items() if op.__name__.split(".")[0] in COUNTED_OPS)
    return flops // 2


def measure_latencies(models: Mapping[str, nn.Module], batch_sizes: Sequence[int] = (1, 64),
                      input_size: Sequence[int] = (3, 32, 32), threads: int | None = None,
                      warmup: int = 3, repeats: int = 20, seed: int = 0,
                      input_memory_format: torch.memory_format = torch.contiguous_format,
                      device: str = "cpu") -> dict:
    """Median wall time of one forward pass of each model, in milliseconds, measured together
    (on the CPU, or with ``device="cuda"`` on the GPU: copies of the models, timed with the
    device synchronised around each pass; ``threads`` then only affects the host).

    Comparisons between models measured in separate runs pick up whatever else the machine did
    meanwhile; here every repeat runs each model once, in turn (the order rotating from repeat
    to repeat), so drifts in load or clock speed hit all models alike. Each model runs in eval
    mode under ``no_grad`` on a random input of ``(batch, *input_size)`` (contiguous NCHW, as a
    caller would pass it). A model already on the CPU is used where it is and every submodule's
    mode is restored afterwards; a model elsewhere is timed as a CPU copy, so no caller's model
    changes device. ``threads`` (None: torch's current setting) is set for the measurement only.
    ``input_memory_format``: the input's layout (``hbgs.export`` times single layers with the
    channels-last inputs they would see inside a channels-last model).

    Returns plain data (JSON as is)::

        {"device": "cpu", "threads": 1, "input_size": [3, 32, 32], "warmup": 3, "repeats": 20,
         "batch_sizes": [1, 64], "torch": "2.x", "median_ms": {"dense": {"1": 1.9, "64": 40.2}, ...}}

    (batch sizes are string keys so that the dict reads the same before and after JSON).
    """
    _check_latency_args(models, batch_sizes, warmup, repeats, threads)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    used_threads = torch.get_num_threads()
    on_cpu = {name: _device_view(model, device) for name, model in models.items()}
    modes = [(m, m.training) for model in on_cpu.values() for m in model.modules()]
    generator = torch.Generator().manual_seed(seed)
    median_ms: dict[str, dict[str, float]] = {name: {} for name in models}
    try:
        for model in on_cpu.values():
            model.eval()
        with torch.no_grad():
            for batch in batch_sizes:
                x = torch.randn(batch, *input_size, generator=generator,
                                dtype=_dtype_of(next(iter(on_cpu.values()))))
                x = x.contiguous(memory_format=input_memory_format).to(device)
                times = _interleaved_times(on_cpu, x, warmup, repeats, _synchronizer(device))
                for name, samples in times.items():
                    median_ms[name][str(batch)] = 1000 * statistics.median(samples)
    finally:
        for module, training in modes:
            module.training = training
        torch.set_num_threads(previous_threads)
    return {"device": device, "threads": used_threads, "input_size": list(input_size),
            "warmup": warmup, "repeats": repeats, "batch_sizes": [int(b) for b in batch_sizes],
            "torch": torch.__version__, "median_ms": median_ms}


def speedups(latency: dict, reference: str) -> dict[str, dict[str, float]]:
    """``latency[reference] / latency[model]`` per model and batch size (from
    ``measure_latencies``): above 1 means faster than the reference."""
    base = latency["median_ms"][reference]
    return {name: {batch: base[batch] / ms for batch, ms in per_batch.items()}
            for name, per_batch in latency["median_ms"].items() if name != reference}


def _interleaved_times(models: Mapping[str, nn.Module], x: torch.Tensor, warmup: int,
                       repeats: int, synchronize) -> dict[str, list[float]]:
    names = list(models)
    for _ in range(warmup):
        for name in names:
            models[name](x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize()
            start = time.perf_counter()
            models[name](x)
            synchronize()  # a GPU runs asynchronously: wait for the pass to finish
            times[name].append(time.perf_counter() - start)
    return times


def _synchronizer(device: str):
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _device_view(model: nn.Module, device: str) -> nn.Module:
    """``model`` itself when all its tensors are on ``device`` already, else a copy there."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == torch.device(device).type for t in tensors):
        return model
    return copy.deepcopy(model).to(device)


def _dtype_of(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


def _check_latency_args(models, batch_sizes, warmup, repeats, threads) -> None:
    if not models:
        raise HbgsError("measure_latencies needs at least one model: pass {name: model}")
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise HbgsError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}, e.g. (1, 64)")
    if repeats < 1 or warmup < 0:
        raise HbgsError(f"repeats={repeats} and warmup={warmup}: need repeats >= 1 and warmup >= 0")
    if threads is not None and threads < 1:
        raise HbgsError(f"threads={threads}: give a positive thread count, or None for torch's default")


def model_stats(model: nn.Module, input_size=(3, 32, 32)) -> dict:
    return {"params": count_params(model), "macs": count_macs(model, input_size)}
