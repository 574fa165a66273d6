"""Time the lower-level selectors on real layer shapes: ``python -m hbgs.bench.selectors``.

Random Gaussian filters of the shapes of VGG-16 and ResNet-56 layers (n filters of dimension
d = C_in·3·3); each selector removes half of the filters. ``backward`` and ``omp`` are timed as
the median of ``--repeats`` runs. ``backward_naive`` (re-inverts AᵀA at every step, as the
reference code) runs once in full for n ≤ ``--naive-max-n``; above that its time is estimated
from single steps timed at s = n, 3n/4 and n/2 + 1 kept filters and integrated over the n/2
steps with Simpson's rule (its per-step cost is a smooth polynomial in s). Rows marked ``*``
are estimates.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from hbgs.pruning.selectors import (_naive_step, _one_intra_op_thread, _ridged_cholesky,
                                    backward_naive,
                                    select_filters)

SHAPES = [("VGG-16", n, d) for n, d in [(64, 27), (64, 576), (128, 576), (128, 1152), (256, 1152),
                                          (256, 2304), (512, 2304), (512, 4608)]]
SHAPES += [("ResNet-56", n, d) for n, d in [(16, 144), (32, 288), (64, 576)]]


def seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@_one_intra_op_thread  # as backward_naive itself runs
def estimated_naive_seconds(F: torch.Tensor, n_keep: int, repeats: int) -> float:
    """``backward_naive``'s time from three timed steps, integrated with Simpson's rule."""
    F = F.to(torch.float64)
    n = F.shape[0]
    ridge = _ridged_cholesky(F @ F.T, F.shape[1])[0]
    step = {s: seconds(lambda s=s: _naive_step(F, list(range(s)), ridge), repeats)
            for s in (n, (n + n_keep) // 2, n_keep + 1)}
    first, middle, last = step.values()
    return (n - n_keep) * (first + 4 * middle + last) / 6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-max-n", type=int, default=256,
                        help="run backward_naive in full up to this many filters, estimate above")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    select_filters(torch.randn(8, 8), 4)  # warm up the linear-algebra libraries

    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()} (the "
          f"selectors run on 1 intra-op thread by design), {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start; float32 input, float64 inside; remove n/2")
    header = (f"{'layers':10} {'n x d':>10} {'backward s':>11} {'omp s':>9} {'naive s':>10} "
              f"{'naive/backward':>15} {'omp/backward':>13} {'same set':>9}")
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(0)
    for family, n, d in SHAPES:
        F = torch.randn(n, d, generator=generator)
        n_keep = n // 2
        backward = seconds(lambda: select_filters(F, n_keep, "backward"), args.repeats)
        omp = seconds(lambda: select_filters(F, n_keep, "omp"), args.repeats)
        if n <= args.naive_max_n:
            start = time.perf_counter()
            naive_selection = backward_naive(F, n_keep)
            naive, mark = time.perf_counter() - start, " "
            same = str(torch.equal(naive_selection.keep, select_filters(F, n_keep).keep))
        else:
            naive, mark, same = estimated_naive_seconds(F, n_keep, args.repeats), "*", "-"
        print(f"{family:10} {f'{n}x{d}':>10} {backward:11.4f} {omp:9.4f} {naive:9.3f}{mark} "
              f"{naive / backward:14.1f}{mark} {omp / backward:13.1f} {same:>9}")
    print(f"* estimated (n > --naive-max-n={args.naive_max_n}): per-step time measured at "
          f"s = n, 3n/4, n/2+1 kept filters, Simpson-integrated over the n/2 steps")
    print(f"load average {os.getloadavg()[0]:.2f} at end (other processes share these CPUs)")


if __name__ == "__main__":
    main()
