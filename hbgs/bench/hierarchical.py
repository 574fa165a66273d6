"""What the HBGTS caches save: ``python -m hbgs.bench.hierarchical``.

Runs the same HBGTS rounds on ResNet-20 (random weights, or ``--checkpoint`` a model file from
``stage=train``) twice on one calibration batch: with ``use_cache`` (proposals kept while a layer
is unchanged, calibration activations refreshed downstream of changes only, each candidate
scored by running only the network after its layer) and without (everything recomputed, the
whole network run per candidate, as the reference code does). Prints the work counted and the
wall time side by side, and checks that both runs made the same choices with the same scores.
The calibration batch is Gaussian noise of CIFAR shape: the work does not depend on the images.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from hbgs.models import resnet20
from hbgs.pruning import wrap_model
from hbgs.pruning.hierarchical import HierarchicalPruner

COUNTS = ("proposals_computed", "proposals_reused", "nodes_run", "full_forwards")


def run(original, calib_x, calib_y, args, use_cache: bool) -> tuple[list, float]:
    """``args.rounds`` rounds on a wrapped copy of ``original``; the records and wall seconds."""
    model = copy.deepcopy(original)
    wrap_model(model)
    pruner = HierarchicalPruner(model, original, calib_x, calib_y, criterion="hbgts",
                                signal=args.signal, method=args.method, step=args.step,
                                use_cache=use_cache, chunk_size=args.chunk_size)
    start = time.perf_counter()
    records = [pruner.run_round() for _ in range(args.rounds)]
    return records, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="an unpruned model file (default: random ResNet-20)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calib", type=int, default=128, help="calibration images")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--signal", default="features", choices=("features", "logits", "loss"))
    parser.add_argument("--method", default="backward")
    parser.add_argument("--step", type=float, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    args.step = int(args.step) if args.step >= 1 else args.step
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        from hbgs.checkpoint import load_model

        original, source = load_model(args.checkpoint), args.checkpoint
    else:
        original, source = resnet20().eval(), "ResNet-20, random weights"
    calib_x = torch.randn(args.calib, 3, 32, 32)
    calib_y = torch.randint(0, 10, (args.calib,))

    print(f"{source}; HBGTS signal={args.signal}, method={args.method}, step={args.step}, "
          f"{args.rounds} rounds, calibration batch {args.calib} (chunk {args.chunk_size}); "
          f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} at start")
    runs = {cache: run(original, calib_x, calib_y, args, cache) for cache in (True, False)}
    (cached, cached_s), (full, full_s) = runs[True], runs[False]
    rows = [(name, sum(getattr(r, name) for r in cached), sum(getattr(r, name) for r in full))
            for name in COUNTS]
    rows += [("propose seconds", sum(r.propose_seconds for r in cached),
              sum(r.propose_seconds for r in full)),
             ("score seconds", sum(r.score_seconds for r in cached),
              sum(r.score_seconds for r in full)),
             ("wall seconds", cached_s, full_s)]
    print(f"{'':20} {'use_cache=True':>15} {'use_cache=False':>16} {'False/True':>11}")
    for name, with_cache, without in rows:
        ratio = f"{without / with_cache:.2f}" if with_cache else "-"
        print(f"{name:20} {with_cache:>15.6g} {without:>16.6g} {ratio:>11}")
    same = [(a.layer, a.side) for a in cached] == [(b.layer, b.side) for b in full]
    worst = max(abs(a.scores[k] - b.scores[k]) / max(abs(b.scores[k]), 1e-12)
                for a, b in zip(cached, full) for k in a.scores)
    print(f"same choices: {same}; largest relative score difference: {worst:.1e}")
    print("choices: " + ", ".join(f"{r.layer}:{r.side} {r.width_before}->{r.width_after}"
                                  for r in cached))
    print("nodes_run counts fx graph nodes executed on the whole batch (a full forward = "
          f"{full[0].nodes_run // max(full[0].full_forwards, 1)} nodes); full_forwards counts "
          "whole-network passes")


if __name__ == "__main__":
    main()
