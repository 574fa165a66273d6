"""How many steps a short fine-tune needs: ``python -m hbgs.bench.recovery``.

The paper fine-tunes after every round; on a CPU that fine-tune is half of a round's time, so its
length (``finetune.steps``) is chosen by what it recovers. This cuts the zoo checkpoint by
FP-Backward, the same ``--fraction`` of every prunable conv (more damage than one HBGTS round,
which takes 5 channels from one layer), then runs a fresh short fine-tune of each length in
``--steps`` from that same cut network, exactly as a prune run does (``hbgs.finetune.finetune``:
distilled from the unpruned network, ``conf/finetune/default.yaml``'s learning rate and
optimizer, ``trainer=cpu``'s precision), and prints the accuracy on the calibration split (the
split decisions may use) and on part of the test split, with the seconds each fine-tune took.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from hydra import compose, initialize_config_dir

from hbgs.checkpoint import load_model
from hbgs.data import ImageDataModule
from hbgs.devices import fast_layout, lightning_precision
from hbgs.finetune import finetune
from hbgs.module import evaluate_accuracy
from hbgs.pruning import wrap_model
from hbgs.pruning.ratios import prune_uniform_fraction
from hbgs.zoo import ZOO_DIR, zoo_checkpoint

CONF_DIR = ZOO_DIR.parent / "conf"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of every prunable conv's channels cut")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 5, 10, 20, 40, 80])
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--limit-train", type=int, default=10000, help="training images the fine-tunes draw from")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=["logger=none", f"model={args.model}"])
    torch.manual_seed(0)
    data = ImageDataModule(limit_train=args.limit_train, limit_test=args.test_images)
    data.setup()
    original = fast_layout(load_model(zoo_checkpoint(args.model, "cifar10")).eval().requires_grad_(False))
    cut = copy.deepcopy(original).requires_grad_(True)
    wrap_model(cut)
    prune_uniform_fraction(cut, args.fraction, "backward")
    calib, test = data.val_dataloader(), data.test_dataloader()
    print(f"{args.model}: FP-Backward cut {args.fraction:.0%} of every prunable conv's channels; fine-tunes as "
          f"a prune run's (lr {cfg.finetune.lr:g}, batch {data.batch_size}, precision "
          f"{lightning_precision(cfg.trainer)}, {torch.get_num_threads()} threads); accuracy on the "
          f"{len(data.splits['calibration'])} calibration and {len(data.splits['test'])} test images")
    print(f"dense: calibration {evaluate_accuracy(original, calib):.2%}, test {evaluate_accuracy(original, test):.2%}")
    print(f"{'steps':>6}{'calibration':>13}{'test':>9}{'seconds':>9}")
    for steps in args.steps:
        model = copy.deepcopy(cut)
        start = time.perf_counter()
        finetune(model, data, original, cfg.finetune, steps=steps, lr=cfg.finetune.lr, trainer_cfg=cfg.trainer)
        seconds = time.perf_counter() - start
        print(f"{steps:>6}{evaluate_accuracy(model, calib):>13.2%}{evaluate_accuracy(model, test):>9.2%}"
              f"{seconds:>9.1f}")


if __name__ == "__main__":
    main()
