"""Where an HBGTS round's time goes, and what the fast path saves: ``python -m hbgs.bench.rounds``.

A round at the paper's settings is the upper level scoring every candidate, then a short
fine-tune. For each model (the zoo checkpoint, or random weights where the zoo has none) this
runs the same HBGTS-B rounds on one calibration batch three ways, side by side in one process:

* ``full``: the whole network run once per candidate (the reference code's way, ``use_cache=False``);
* ``suffix``: calibration activations cached, only the network after the candidate's layer run;
* ``fast``: the suffix cache with model and activations in channels-last layout (what
  ``hbgs.run`` does: ``hbgs.devices.fast_layout``);

then times one step of the short fine-tune (teacher forward, student forward and backward, SGD)
on the pruned network in float32 and as ``hbgs.run`` trains it (channels-last, bf16 autocast
where the device is fast at it: ``trainer.precision=auto``). It prints seconds per round (the
first round, which builds the caches, apart), the proposal/scoring split, the work done over all
rounds (lower-level proposals computed, fx graph nodes run on the whole batch: the caches keep a
proposal while its layer is unchanged and run only a candidate's suffix), whether all paths made
the same choices, and a paper-settings round: scoring plus ``--finetune-steps`` steps. The
calibration batch is Gaussian noise of CIFAR shape: the work does not depend on the images.
With ``--devices cpu cuda`` the fast path and the step are timed on CUDA too.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hbgs import models
from hbgs.checkpoint import load_model
from hbgs.devices import bf16_is_fast, fast_layout
from hbgs.module import distillation_loss
from hbgs.pruning import wrap_model
from hbgs.errors import HbgsError
from hbgs.pruning.hierarchical import HierarchicalPruner
from hbgs.zoo import zoo_checkpoint

PATHS = ("full", "suffix", "fast")


def load_original(name: str) -> tuple[torch.nn.Module, str]:
    try:
        return load_model(zoo_checkpoint(name, "cifar10")).eval(), f"zoo/{name}-cifar10.pt"
    except HbgsError:  # not in the zoo: the work is the same with random weights
        return getattr(models, name)().eval(), "random weights"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rounds(original, calib_x, calib_y, path: str, device: torch.device, args):
    """``args.rounds`` rounds on a wrapped copy of ``original``: (pruned model, records, seconds per round)."""
    model, teacher = copy.deepcopy(original).to(device), copy.deepcopy(original).to(device)
    x, y = calib_x.to(device), calib_y.to(device)
    if path == "fast":
        fast_layout(model), fast_layout(teacher)
        x = fast_layout(x)
    wrap_model(model)
    pruner = HierarchicalPruner(model, teacher, x, y, criterion="hbgts", signal="features",
                                method="backward", step=args.step, use_cache=path != "full")
    records, seconds = [], []
    for _ in range(args.rounds):
        synchronize(device)
        start = time.perf_counter()
        records.append(pruner.run_round())
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return model, teacher, records, seconds


def step_seconds(model, teacher, device: torch.device, fast: bool, args) -> float:
    """Median seconds of one distillation step of batch ``args.batch_size`` (after a warm-up)."""
    model, teacher = copy.deepcopy(model), copy.deepcopy(teacher)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    if fast:
        fast_layout(model), fast_layout(teacher)
        x = fast_layout(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    bf16 = fast and bf16_is_fast(device.type)
    model.train()
    times = []
    for i in range(args.steps + 1):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                teacher_logits = teacher(x)
            logits = model(x)
            loss = F.cross_entropy(logits, y) + distillation_loss(logits, teacher_logits, 2.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def report_model(name: str, args) -> None:
    original, source = load_original(name)
    torch.manual_seed(0)
    calib_x, calib_y = torch.randn(args.calib, 3, 32, 32), torch.randint(0, 10, (args.calib,))
    print(f"\n{name} ({source}): {args.rounds} HBGTS-B rounds, step {args.step}, "
          f"calibration batch {args.calib}")
    print(f"{'path':<12}{'first round s':>15}{'later rounds s':>16}{'propose s':>11}{'score s':>9}"
          f"{'x vs full':>11}{'proposals':>11}{'nodes run':>11}")
    runs = {}
    for device in args.devices:
        for path in PATHS if device.type == "cpu" else ("fast",):
            if path in args.skip:
                continue
            runs[(device.type, path)] = run_rounds(original, calib_x, calib_y, path, device, args)
    full = runs.get(("cpu", "full"))
    for (device_type, path), (_, _, records, seconds) in runs.items():
        later = statistics.mean(seconds[1:]) if len(seconds) > 1 else float("nan")
        ratio = f"{statistics.mean(full[3][1:]) / later:.2f}" if full and len(seconds) > 1 else "-"
        label = path if device_type == "cpu" else f"{path} {device_type}"
        print(f"{label:<12}{seconds[0]:>15.2f}{later:>16.2f}"
              f"{statistics.mean(r.propose_seconds for r in records):>11.2f}"
              f"{statistics.mean(r.score_seconds for r in records):>9.2f}{ratio:>11}"
              f"{sum(r.proposals_computed for r in records):>11}{sum(r.nodes_run for r in records):>11}")
    choices = {key: [(r.layer, r.side) for r in run[2]] for key, run in runs.items()}
    reference = next(iter(runs.values()))[2]
    worst = max(abs(a.scores[k] - b.scores[k]) / max(abs(b.scores[k]), 1e-12)
                for run in runs.values() for a, b in zip(run[2], reference) for k in b.scores
                if k in a.scores)
    print(f"same choices on every path: {len(set(map(tuple, choices.values()))) == 1}; largest "
          f"relative score difference: {worst:.1e}; choices: "
          + ", ".join(f"{layer}:{side}" for layer, side in next(iter(choices.values()))))

    print(f"{'fine-tune step':<36}{'s/step':>8}{'x':>7}{'paper round s':>15}")
    for device in args.devices:
        key = (device.type, "fast")
        if key not in runs:
            continue
        model, teacher, _, seconds = runs[key]
        score = statistics.mean(seconds[1:]) if len(seconds) > 1 else seconds[0]
        plain = step_seconds(model, teacher, device, False, args)
        fast = step_seconds(model, teacher, device, True, args)
        precision = "bf16 autocast" if bf16_is_fast(device.type) else "float32"
        for label, value in ((f"{device.type} float32", plain), (f"{device.type} channels-last, {precision}", fast)):
            print(f"{label:<36}{value:>8.3f}{plain / value:>7.2f}{score + args.finetune_steps * value:>15.1f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "vgg16"])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per path (the first builds the caches)")
    parser.add_argument("--calib", type=int, default=512, help="calibration images (criterion.calib_batch)")
    parser.add_argument("--step", type=float, default=5, help="criterion.step")
    parser.add_argument("--finetune-steps", type=int, default=20, help="finetune.steps, for the paper round")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed fine-tune steps (median)")
    parser.add_argument("--skip", nargs="*", default=(), choices=PATHS, help="paths not to run (full is slow)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    args.step = int(args.step) if args.step >= 1 else args.step
    args.devices = [torch.device(d) for d in args.devices]
    if args.threads:
        torch.set_num_threads(args.threads)
    print("python -m hbgs.bench.rounds " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.2f} at start"
          + "".join(f", {torch.cuda.get_device_name(d)}" for d in args.devices if d.type == "cuda"))
    for name in args.models:
        report_model(name, args)


if __name__ == "__main__":
    main()
