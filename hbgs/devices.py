"""Where a run computes: one device for the whole run, taken from ``trainer=``.

Every stage puts its models, calibration batch, activation caches, scoring and evaluation on
``run_device(cfg.trainer)``; the Lightning fine-tunes train there too. Only the selectors' float64
maths stays on the CPU (``hbgs.pruning.selectors``) and latency is timed on copies.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from torch import nn


def run_device(trainer_cfg) -> torch.device:
    """The device of a run whose Lightning trainer is ``trainer_cfg``: CUDA for
    ``accelerator=gpu|cuda`` (the first index of a ``devices`` list; ``auto`` when a GPU is
    there, as Lightning picks), else the CPU (``mps`` fine-tunes there and comes back)."""
    accelerator = trainer_cfg.get("accelerator", "cpu") if trainer_cfg is not None else "cpu"
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        devices = trainer_cfg.get("devices")
        index = devices[0] if isinstance(devices, Sequence) and not isinstance(devices, str) else 0
        return torch.device("cuda", int(index))
    return torch.device("cpu")


@cache
def bf16_is_fast(device_type: str) -> bool:
    """bf16 autocast pays on a GPU and on CPUs with bf16 instructions (AVX512-BF16, AMX): there
    it halves a training step (ResNet-20 and VGG-16 on this project's 2-core EPYC); elsewhere
    the CPU emulates it, slower than float32."""
    if device_type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lightning_precision(trainer_cfg) -> str | int:
    """``trainer.precision`` as Lightning takes it: ``auto`` (``trainer=cpu``'s default) is
    ``bf16-mixed`` where ``bf16_is_fast`` and ``32-true`` elsewhere."""
    precision = trainer_cfg.get("precision", "32-true") if trainer_cfg is not None else "32-true"
    if precision != "auto":
        return precision
    return "bf16-mixed" if bf16_is_fast(run_device(trainer_cfg).type) else "32-true"


def fast_layout(value):
    """``value`` (a module, in place, or an image batch) in channels-last layout: convolutions
    run 1.2-1.4× faster so on the CPU (oneDNN; HBGTS scoring and fine-tune steps of ResNet-20,
    ``python -m hbgs.bench.rounds``) and on CUDA (cuDNN). Layers built later in contiguous layout
    keep it, as PyTorch follows the input's layout. Other tensors are returned as they are."""
    if isinstance(value, nn.Module):
        return value.to(memory_format=torch.channels_last)
    return value.contiguous(memory_format=torch.channels_last) if value.dim() == 4 else value


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU for an empty module."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextmanager
def full_precision():
    """TF32 off for matmuls and convolutions (restored afterwards): pruning scores on CUDA then
    agree with the CPU's to float32 rounding and pick the same candidates (TF32's 10-bit
    mantissa moves relative errors by ~1e-3, enough to swap near-tied candidates). No effect on
    the CPU. Usable as a decorator."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
