"""Time one training step (forward, backward, SGD update) of zoo models on this machine's CPU.

    python -m hbgs.bench.train_step [--models resnet20 resnet56 vgg16] [--batch-size 128] [--steps 5]

Prints the median seconds per step and what an epoch of 49,000 images would take, with the thread
count used. A benchmark script, not a test: timings depend on the machine and its load.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hbgs import models


def time_steps(model: torch.nn.Module, batch_size: int, steps: int, warmup: int = 2) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    model.train()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "vgg16"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=49_000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, CPU")
    print(f"{'model':<12}{'s/step':>10}{'min/epoch':>12}")
    for name in args.models:
        torch.manual_seed(0)
        seconds = time_steps(getattr(models, name)(), args.batch_size, args.steps)
        epoch_minutes = seconds * -(-args.train_images // args.batch_size) / 60
        print(f"{name:<12}{seconds:>10.3f}{epoch_minutes:>12.1f}")


if __name__ == "__main__":
    main()
