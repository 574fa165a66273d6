"""stage=robustness: how accuracy holds up when the same fraction of filters is removed from
every layer with no fine-tuning (the test of the Batch Bridgeout paper, docs/algorithms.md §4).

Each curve is (checkpoint, method): ``l2-removal`` removes the smallest-L2-norm output filters
of every prunable conv and nothing else (``l1-removal`` and ``random-removal`` likewise); a
selector name (``backward``, ``omp``, ``l2``, ...) removes the same number of filters chosen
by that selector and compensates through the out-adapters (§1.2). Several checkpoints overlay
on one chart, e.g. a Bridgeout-trained network and a plainly trained one.

Prunable convs are those hbgs wraps: every conv with a spatial kernel except the network's
first. With ``surgery=remove`` every channel group (``pruning.surgery``) loses the fraction for
real, and the compensation is fitted on calibration images (``robustness.calib_batch``).
Accuracy is on the test split (no decision is made from it).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hbgs.checkpoint import load_meta, load_model, load_model_cfg
from hbgs.devices import run_device
from hbgs.errors import HbgsError
from hbgs.loggers import build_logger
from hbgs.module import evaluate_accuracy
from hbgs.pruning import ReferenceCosts, fold_identity_adapters, saved_cost, wrap_model
from hbgs.pruning.adapters import wrapped_layers
from hbgs.pruning.hierarchical import surgery_of
from hbgs.pruning.ratios import prune_layers
from hbgs.pruning.removal import remove_by_ratios
from hbgs.pruning.surgery import ChannelSurgery
from hbgs.pruning.selectors import METHODS
from hbgs.reporting import plot_robustness, write_csv

log = logging.getLogger("hbgs")

REMOVAL = "-removal"
REMOVAL_METHODS = ("l1", "l2", "random")  # ways to pick filters that need no fitting


def parse_method(name: str) -> tuple[str, bool]:
    """(selector, compensate) for a curve's method name, or an HbgsError naming the valid ones."""
    base, compensate = (name[: -len(REMOVAL)], False) if name.endswith(REMOVAL) else (name, True)
    if base not in METHODS or (not compensate and base not in REMOVAL_METHODS):
        valid = [f"{m}{REMOVAL}" for m in REMOVAL_METHODS] + list(METHODS)
        raise HbgsError(f"unknown robustness method {name!r}: use one of {', '.join(valid)} "
                        f"('{REMOVAL}' = plain removal, a selector name = removal with compensation)")
    return base, compensate


def filters_pruned(model: nn.Module, fraction: float, method: str, *, seed: int = 0,
                   surgery: str = "adapters", calib_x: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``model`` with ``fraction`` of the output filters of every prunable conv removed
    by ``method`` (see ``parse_method``), saved form (identity adapters folded). With
    ``surgery="remove"`` every channel group loses ``fraction`` of its channels for real,
    compensated at its consumers on ``calib_x``."""
    selector, compensate = parse_method(method)
    pruned = copy.deepcopy(model)
    if surgery == "remove":
        groups = ChannelSurgery(pruned, calib_x[:1]).groups()
        remove_by_ratios(pruned, {g.root: fraction for g in groups}, groups, selector, calib_x,
                         seed=seed, compensate=compensate)
        return pruned.eval()
    wrap_model(pruned)
    prune_layers(pruned, dict.fromkeys(wrapped_layers(pruned), fraction), selector, seed=seed,
                 sides=("out",), compensate=compensate)
    fold_identity_adapters(pruned)
    return pruned.eval()


def robustness_curves(models: Mapping[str, nn.Module], fractions: Sequence[float], methods: Sequence[str],
                      evaluate: Callable[[nn.Module], float], *, input_size=(3, 32, 32), seed: int = 0,
                      on_row: Callable[[dict], None] | None = None, surgery: str = "adapters",
                      calib_x: torch.Tensor | None = None) -> list[dict]:
    """One row per (checkpoint label, method, fraction): accuracy by ``evaluate`` and the saved
    model's params/FLOPs reduction against the original. Fraction 0 is the dense model.
    ``surgery``/``calib_x``: as in ``filters_pruned``."""
    for method in methods:
        parse_method(method)  # fail before any work
    if any(not 0 <= f < 1 for f in fractions):
        raise HbgsError(f"robustness fractions must lie in [0, 1), got {list(fractions)}")
    rows = []
    for label, model in models.items():
        model.eval()
        reference = ReferenceCosts.measure(model, input_size)
        dense_acc = evaluate(model)
        for method in methods:
            for fraction in fractions:
                pruned = filters_pruned(model, fraction, method, seed=seed, surgery=surgery,
                                        calib_x=calib_x) if fraction > 0 else model
                cost = saved_cost(pruned, reference)
                row = {"checkpoint": label, "method": method, "fraction": float(fraction),
                       "test_acc": dense_acc if fraction == 0 else evaluate(pruned),
                       "params_reduction": cost.params_reduction, "flops_reduction": cost.flops_reduction}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def checkpoints_of(cfg: DictConfig) -> dict[str, str]:
    """label → model file: ``robustness.checkpoints``, or ``ckpt`` alone labelled by its folder
    (hbgs.validation made sure there is one or the other)."""
    given = OmegaConf.to_container(cfg.robustness.checkpoints, resolve=True) if cfg.robustness.checkpoints else {}
    if not given and cfg.ckpt is not None:
        given = {Path(cfg.ckpt).stem: cfg.ckpt}
    return {str(label): str(path) for label, path in given.items()}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    surgery = surgery_of(cfg)
    device = run_device(cfg.trainer)  # models, calibration images and evaluation; the selectors on the CPU
    checkpoints = checkpoints_of(cfg)
    models = {label: load_model(path, map_location=device)  # all load before any work
              for label, path in checkpoints.items()}
    for label, path in checkpoints.items():
        classes = (load_model_cfg(path) or {}).get("num_classes", cfg.dataset.num_classes)
        if classes != cfg.dataset.num_classes:
            raise HbgsError(f"checkpoint {label}={path} has {classes} classes but dataset={cfg.dataset.name} has "
                            f"{cfg.dataset.num_classes}: pass the dataset it was trained on.")
    datamodule = instantiate(cfg.dataset)
    datamodule.setup()
    test_loader = datamodule.test_dataloader()
    logger = build_logger(cfg.logger, run_dir, "robustness", OmegaConf.to_container(cfg, resolve=True))
    methods, fractions = list(cfg.robustness.methods), list(cfg.robustness.fractions)

    def log_row(row: dict) -> None:  # one line per point, so a long sweep shows its progress
        log.info(f"{row['checkpoint']} {row['method']} {100 * row['fraction']:.0f}% removed: "
                 f"test acc {100 * row['test_acc']:.2f}%")
        if logger:
            logger.log_metrics({f"robustness/{row['checkpoint']}/{row['method']}/test_acc": row["test_acc"]},
                               step=round(100 * row["fraction"]))

    calib_x = datamodule.calibration_batch(cfg.robustness.calib_batch)[0].to(device) if surgery == "remove" else None
    rows = robustness_curves(models, fractions, methods, lambda m: evaluate_accuracy(m, test_loader),
                             input_size=datamodule.input_size, seed=cfg.seed, on_row=log_row,
                             surgery=surgery, calib_x=calib_x)
    write_csv(run_dir / "robustness.csv", rows)
    plot_robustness(run_dir / "robustness.png", rows,
                    f"filters removed from every prunable conv, no fine-tuning ({datamodule.name} test)")
    if logger:
        from lightning.pytorch.loggers import WandbLogger

        if isinstance(logger, WandbLogger):
            columns = list(rows[0])
            logger.log_table("robustness/points", columns=columns, data=[[r[c] for c in columns] for r in rows])
            logger.log_image("robustness/chart", [str(run_dir / "robustness.png")])
        logger.save()
    return {
        "stage": "robustness",
        "dataset": datamodule.name,
        "test_images": len(datamodule.splits["test"]),
        "checkpoints": {label: {"path": str(Path(path).resolve()), "meta": load_meta(path) or {}}
                        for label, path in checkpoints.items()},
        "methods": methods,
        "fractions": fractions,
        "surgery": surgery,
        "device": str(device),
        "what": ("the fraction of output filters removed from every prunable conv (all spatial convs but the "
                 "first)" if surgery == "adapters" else "the fraction of every channel group's channels removed "
                 "structurally") + ", no fine-tuning; '-removal' = plain removal, else the selector with compensation",
        "test_acc": {f"{r['checkpoint']}/{r['method']}/{r['fraction']:g}": r["test_acc"] for r in rows},
        "outputs": {"csv": str(run_dir / "robustness.csv"), "plot": str(run_dir / "robustness.png")},
    }
