"""Train the zoo's checkpoints on one GPU within a wall-clock budget:

    python -m hbgs.zoo_train --models resnet20 resnet56 vgg16 --minutes 8 --out zoo

`stage=train` is the general path (Lightning, any model or dataset, `resume=`). This one exists
because the zoo's networks are small for a GPU: a ResNet-20 step is a few hundred tiny kernels,
so a data loader or a lone process leaves the GPU idle most of the time. Here:

* the training images live on the GPU as uint8 and are cropped and flipped there
  (`hbgs.data.DeviceBatches`), so no worker decodes or copies images;
* bf16 autocast and channels-last activations;
* one process per model, all sharing the GPU, so one model's kernels fill the others' gaps;
* a budget instead of an epoch count: every epoch each process re-plans how many epochs fit
  before the deadline (the median of its last three epochs' times, a safety margin, at most the recipe's
  `max_epochs`), and the schedule (linear warm-up, then cosine to zero, SGD with Nesterov
  momentum, label smoothing 0.1) is stretched to that count, so training ends on a finished
  schedule rather than being cut off;
* weights saved in float16 (`save_model(half=True)`); the accuracy recorded is the one of the
  float16-rounded network that loads, measured on the whole test split, beside the float32 one;
* `--init` starts from a trained file instead of random weights, for one more whole warm-up and
  cosine cycle (a warm restart): a budget too short for one long schedule is spent in chunks that
  each end on a finished schedule, so every chunk leaves a network worth keeping;
* `--swa` (with `--init`, for a network already trained): after the warm-up the rate stays at
  `--lr` and the weights at the end of every epoch are averaged (stochastic weight averaging,
  Izmailov et al. 2018, `torch.optim.swa_utils`); the saved network is the average, its BatchNorm
  statistics recomputed over the augmented training images. The average lies in a flatter region
  than any one iterate, which is what a warm restart of a converged network, ending where it
  began, does not reach. From a file that is such an average itself (its record says how many
  epochs), the run goes on with that average: its epochs count as many as they are, so an average
  too long for one session is built in chunks.

The data split is `stage=train`'s: the calibration images (dataset.calib_size=1000, seed 0) are
held out, so the pruning criteria never score on images the network was trained on. It runs on the
CPU too (slowly), which is how the tests exercise it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, update_bn

from hbgs import models
from hbgs.accounting import count_macs, count_params
from hbgs.atomic import atomic_file
from hbgs.checkpoint import load_meta, load_model, load_model_cfg, save_model
from hbgs.data import DeviceBatches, ImageDataModule
from hbgs.devices import bf16_is_fast

# Per model: batch size, peak learning rate, the most epochs a budget may buy, cutout square side (0: none).
RECIPES = {
    "resnet20": {"batch_size": 128, "lr": 0.1, "max_epochs": 200, "cutout": 0},
    "resnet32": {"batch_size": 128, "lr": 0.1, "max_epochs": 200, "cutout": 0},
    "resnet56": {"batch_size": 128, "lr": 0.1, "max_epochs": 200, "cutout": 0},
    "resnet110": {"batch_size": 128, "lr": 0.1, "max_epochs": 200, "cutout": 0},
    "vgg16": {"batch_size": 128, "lr": 0.05, "max_epochs": 200, "cutout": 0},
}
WEIGHT_DECAY, MOMENTUM, LABEL_SMOOTHING, WARMUP_EPOCHS = 5e-4, 0.9, 0.1, 2
SAFETY = 0.92      # share of the time left that the planned epochs may fill
PACE_EPOCHS = 3    # the plan's pace: the median of this many latest epochs' seconds
BN_PASS_SHARE = 0.5  # --swa: time kept back for recomputing BatchNorm statistics, in epochs (a forward-only pass)
FINISH_SECONDS = 20  # kept back for the last evaluations and the save


class Schedule:
    """Linear warm-up over the first epochs, then cosine to zero at `total` steps (or, `constant`,
    the peak rate held to the end); `total` may be re-planned while training runs (it is read at
    every step)."""

    def __init__(self, peak_lr: float, warmup_steps: int, total: int, constant: bool = False):
        self.peak_lr, self.warmup_steps, self.total, self.constant = peak_lr, warmup_steps, total, constant

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (0.1 + 0.9 * step / self.warmup_steps)
        if self.constant:
            return self.peak_lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total - self.warmup_steps))
        return self.peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


def plan_epochs(done: int, planned: int, max_epochs: int, recent_epoch_seconds: list[float], seconds_left: float) -> int:
    """How many epochs in all fit, at most `max_epochs`; `done` (stop now) when not one more does;
    past half of the plan never more than planned (raising it late would push the learning rate
    back up). The pace is the median of the recent epochs, so that one slow epoch (another process,
    an evaluation of the average) does not shorten the plan for good."""
    if math.isinf(seconds_left):
        return max_epochs
    pace = statistics.median(recent_epoch_seconds)
    fit = min(max_epochs, done + int(max(0.0, seconds_left) * SAFETY / max(pace, 1e-6)))
    return min(fit, planned) if done >= planned / 2 else fit


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: DeviceBatches, bf16: bool) -> float:
    model.eval()
    correct = total = 0
    with torch.autocast(batches.device.type, dtype=torch.bfloat16, enabled=bf16):
        for x, y in batches:
            correct += (model(x).argmax(1) == y).sum()
            total += len(y)
    return float(correct) / total


def save_state(path: Path, **state) -> None:
    with atomic_file(path) as f:  # a stop mid-write leaves the previous epoch's state intact
        torch.save(state, f)


def datamodule(args) -> ImageDataModule:
    dm = ImageDataModule(root=args.data_root, calib_size=1000, seed=args.seed, limit_train=args.limit_train,
                         limit_test=args.limit_test, cache_dir=args.cache_dir)
    dm.setup()
    return dm


def init_path(name: str, args) -> Path | None:
    """The file `--init` names for `name`: the file itself, or `<folder>/<name>-cifar10.pt`."""
    if args.init is None:
        return None
    path = Path(args.init)
    return path / f"{name}-cifar10.pt" if path.is_dir() else path


def epochs_in_all(meta: dict) -> int | None:
    """A zoo file's epochs, those of the files it was warm-started from included."""
    if meta.get("epochs") is None:
        return None
    return meta["epochs"] + ((meta.get("init") or {}).get("epochs") or 0)


def check_init(name: str, args) -> str | None:
    """Why `--init` cannot start `name` (missing file, another architecture, pruned), or None."""
    path = init_path(name, args)
    if path is None:
        return None
    if not path.is_file():
        return f"--init {args.init}: no {path}; pass a checkpoint of {name} or a folder holding {name}-cifar10.pt"
    target = (load_model_cfg(path) or {}).get("_target_")
    if target != f"hbgs.models.{name}":
        return f"--init {path} holds {target or 'a pickled module'}, not hbgs.models.{name}; pass a {name} checkpoint"
    try:
        getattr(models, name)(num_classes=10).load_state_dict(load_model(path).state_dict())
    except RuntimeError:
        return f"--init {path} is a pruned or resized {name}; pass an unpruned CIFAR-10 {name} checkpoint"
    return None


def train_one(name: str, args) -> dict:
    """Train `name` until the deadline; save `<out>/<name>-cifar10.pt`; return its record."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    overrides = {"batch_size": args.batch_size, "lr": args.lr, "max_epochs": args.max_epochs, "cutout": args.cutout}
    recipe = {**RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}, "swa": args.swa}
    bf16 = bf16_is_fast(device.type) if args.bf16 is None else args.bf16
    layout = torch.channels_last if bf16 else torch.contiguous_format
    dm = datamodule(args)
    train = DeviceBatches(dm.splits["train"], dm.mean, dm.std, recipe["batch_size"], augment=True, device=device,
                          seed=args.seed, drop_last=True, cutout=recipe["cutout"], memory_format=layout)
    test = DeviceBatches(dm.splits["test"], dm.mean, dm.std, 1000, augment=False, device=device, memory_format=layout)
    model = getattr(models, name)(num_classes=dm.num_classes)
    init, init_meta = init_path(name, args), {}
    if init is not None:  # check_init has seen that it loads whole
        model.load_state_dict(load_model(init).state_dict())
        init_meta = load_meta(init) or {}
        init = {"path": str(init), "epochs": epochs_in_all(init_meta), "test_acc": init_meta.get("test_acc")}
        print(f"[{name}] warm start from {init['path']} ({init['epochs']} epochs, test acc {init['test_acc']})",
              flush=True)
    model = model.to(device, memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    planned = recipe["max_epochs"]
    schedule = Schedule(recipe["lr"], WARMUP_EPOCHS * len(train), planned * len(train), constant=recipe["swa"])
    averaged = AveragedModel(model) if recipe["swa"] else None  # the running mean of the epochs' weights
    continued = (init_meta.get("averaged_epochs") or 0) if averaged is not None else 0
    if continued:  # --init is an average itself: go on with it, its epochs weighing as many as they are
        averaged.n_averaged.fill_(continued)
    history, step, epoch, trained_seconds = [], 0, 0, 0.0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    state_path = Path(args.out) / f".{name}-{dm.name}.state.pt"
    if args.resume and state_path.exists():  # continue an interrupted call where its last epoch ended
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if {**recipe, **state["recipe"]} != recipe:  # the batches and schedule above were built from this call's
            raise SystemExit(f"--resume: {state_path} was trained with {state['recipe']}, this call asks for "
                             f"{recipe}: resume with the first call's flags")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # moves its buffers to the parameters' device
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        train.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, step, epoch, planned = state["history"], state["step"], state["epoch"], state["planned"]
        trained_seconds = state["trained_seconds"]
        schedule.total = planned * len(train)
        print(f"[{name}] resumed after epoch {epoch} of {planned} planned", flush=True)
    start = time.time() - trained_seconds
    while epoch < planned:
        model.train()
        epoch_start, loss_sum = time.time(), torch.zeros((), device=device)
        for x, y in train:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y, label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            step += 1
        epoch += 1
        seconds = time.time() - epoch_start
        recent = [row["seconds"] for row in history[-(PACE_EPOCHS - 1):]] + [seconds]
        kept_back = FINISH_SECONDS + (BN_PASS_SHARE * statistics.median(recent) if averaged is not None else 0.0)
        planned = plan_epochs(epoch, planned, recipe["max_epochs"], recent, args.deadline - kept_back - time.time())
        schedule.total = planned * len(train)
        row = {"epoch": epoch, "planned": planned, "loss": float(loss_sum) / len(train),
               "lr": schedule.lr(step), "seconds": round(seconds, 2)}
        if averaged is not None and (epoch > WARMUP_EPOCHS or epoch == planned):  # past the warm-up's moving rate
            averaged.update_parameters(model)
            row["averaged"] = int(averaged.n_averaged)
        if epoch % args.eval_every == 0 or epoch == planned:
            row["test_acc"] = accuracy(model, test, bf16)  # this epoch's weights, not the average
        history.append(row)
        print(f"[{name}] " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
        save_state(state_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                   generator=train.generator.get_state(), torch_rng=torch.get_rng_state(), history=history,
                   step=step, epoch=epoch, planned=planned, trained_seconds=time.time() - start, recipe=recipe,
                   averaged=averaged.state_dict() if averaged is not None else None)
    last_iterate_acc, decay = None, "cosine to zero"
    if averaged is not None:
        last_iterate_acc = history[-1]["test_acc"]  # read at the last epoch
        model = averaged.module
        update_bn(train, model)  # the running statistics were the last iterate's, not the average's
        decay = (f"a constant rate, the end-of-epoch weights of {int(averaged.n_averaged) - continued} epochs averaged"
                 + (f" with the {continued}-epoch average it started from" if continued else "")
                 + " and BatchNorm statistics recomputed (SWA)")
    train_seconds = time.time() - start

    model = model.float().to(memory_format=torch.contiguous_format).eval()
    acc_float32 = accuracy(model, test, bf16=False)
    rounded = copy.deepcopy(model).half().float()  # exactly what loads from the float16 file
    acc_saved = accuracy(rounded, test, bf16=False)
    record = {
        "model": name, "dataset": dm.name, "test_acc": acc_saved, "test_acc_float32": acc_float32,
        "test_images": len(dm.splits["test"]), "train_images": len(dm.splits["train"]),
        "input_size": list(dm.input_size), "epochs": epoch, "seed": args.seed, "recipe": recipe,
        "init": init,  # the file this run continued from (its own epochs come first), or None
        "averaged_epochs": int(averaged.n_averaged) if averaged is not None else None,
        "test_acc_last_iterate": last_iterate_acc,  # --swa: the last epoch's own weights, beside the average's
        "schedule": f"SGD nesterov momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}, label smoothing "
                    f"{LABEL_SMOOTHING}, {WARMUP_EPOCHS}-epoch linear warm-up then {decay}, "
                    "random crop (pad 4) and flip" + (f", cutout {recipe['cutout']}" if recipe["cutout"] else "")
                    + " on the device" + (", bf16 autocast" if bf16 else ""),
        "train_seconds": round(train_seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "weights": "float16",
        "command": os.environ.get("HBGS_ZOO_COMMAND", "python -m hbgs.zoo_train --models " + name),
        "params": count_params(model.cpu()), "macs": count_macs(model, dm.input_size),
    }
    save_model(model, Path(args.out) / f"{name}-{dm.name}.pt", half=True,
               model_cfg={"_target_": f"hbgs.models.{name}", "num_classes": dm.num_classes},
               meta={**{k: v for k, v in record.items() if k != "recipe"}, "trainer": "hbgs.zoo_train"})
    state_path.unlink(missing_ok=True)
    return {**record, "history": history}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m hbgs.zoo_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "vgg16"], choices=sorted(RECIPES))
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget, data loading included")
    p.add_argument("--out", default="zoo", help="folder for <model>-cifar10.pt and zoo_train.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="CIFAR-10 ImageFolder (default: as dataset=cifar10 finds it)")
    p.add_argument("--cache-dir", default="~/.cache/hbgs")
    p.add_argument("--eval-every", type=int, default=10, help="epochs between test-split readings in the log")
    p.add_argument("--batch-size", type=int, default=None, help="override the recipe's")
    p.add_argument("--lr", type=float, default=None, help="override the recipe's peak learning rate")
    p.add_argument("--max-epochs", type=int, default=None, help="override the recipe's cap")
    p.add_argument("--cutout", type=int, default=None, metavar="PIXELS",
                   help="erase a square of this side from each training image (0: off; 16 for CIFAR ResNets)")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N training images (tests)")
    p.add_argument("--limit-test", type=int, default=None, help="test on N test images (tests)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast and channels-last (default: on a GPU, or a CPU with bf16 instructions)")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from this trained checkpoint (or a folder of <model>-cifar10.pt) for one more "
                        "warm-up and cosine cycle, instead of from random weights")
    p.add_argument("--swa", action="store_true",
                   help="after the warm-up hold --lr and save the average of the epochs' weights (stochastic weight "
                        "averaging; use with --init and a small --lr, e.g. 0.01)")
    p.add_argument("--resume", action="store_true",
                   help="continue each model from the state its last interrupted call left in --out")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one model, started by the driver
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag in ("minutes", "eval_every", "batch_size", "lr", "max_epochs", "limit_train", "limit_test", "threads"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            p.error(f"--{flag.replace('_', '-')}={value} must be positive, e.g. --{flag.replace('_', '-')} 8")
    if args.cutout is not None and args.cutout < 0:
        p.error(f"--cutout={args.cutout} must be 0 (off) or a square's side in pixels, e.g. --cutout 16")
    if args.swa and args.init is None:
        p.error("--swa averages the epochs of a trained network: pass --init <checkpoint> "
                "(and a small --lr, e.g. 0.01)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA GPU; pass --device cpu")
    for name in args.models if args.worker is None else [args.worker]:
        if problem := check_init(name, args):
            p.error(problem)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:  # one model, in its own process
        args.deadline = args.deadline or math.inf
        record = train_one(args.worker, args)
        (Path(args.out) / f".{args.worker}.json").write_text(json.dumps(record))
        return 0
    start = time.time()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    datamodule(args)  # decode once into the tensor cache, so the workers only read it
    worker_args = [*argv, "--deadline", str(start + 60 * args.minutes), "--worker"]
    command = "python -m hbgs.zoo_train " + " ".join(argv)
    env = {**os.environ, "HBGS_ZOO_COMMAND": command}
    workers = {name: subprocess.Popen([sys.executable, "-m", "hbgs.zoo_train", *worker_args, name], env=env)
               for name in args.models}
    failed = [name for name, worker in workers.items() if worker.wait() != 0]
    records = []
    for name in args.models:
        partial = Path(args.out) / f".{name}.json"
        if partial.exists():
            records.append(json.loads(partial.read_text()))
            partial.unlink()
    report = {"command": command, "wall_seconds": round(time.time() - start, 1), "models": records}
    (Path(args.out) / "zoo_train.json").write_text(json.dumps(report, indent=1) + "\n")
    for r in records:
        print(f"{r['model']:>9}: {100 * r['test_acc']:.2f} % on {r['test_images']} test images "
              f"(float32 {100 * r['test_acc_float32']:.2f} %), {r['epochs']} epochs, {r['train_seconds']:.0f} s")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
