"""stage=prune: prune a trained model with the configured criterion and selector, fine-tune it,
and leave history.csv, summary.json, model.pt and PNG plots in the run directory.

Decisions use only the calibration split (held out from training); the test split is measured
for the report, dense and pruned, before and after the final fine-tune.

A run is seeded (``seed``) and keeps a resumable state after every round (``hbgs.run_state``):
SIGINT, SIGTERM or ``stop_after_rounds`` stop it at a round boundary, and ``resume=<run dir>``
continues it to the same result as a run never stopped. A fine-tune that diverges stops the run
with the last good round's model kept as model.pt.
"""

from __future__ import annotations

import copy
import logging
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from hbgs.accounting import count_macs, count_params, measure_latencies, speedups
from hbgs.bridgeout import regularizer_callbacks
from hbgs.checkpoint import load_model, load_model_cfg, save_model
from hbgs.devices import fast_layout, run_device
from hbgs.errors import HbgsError
from hbgs.export import ExportReport, export
from hbgs.finetune import FinetuneDiverged, check_not_collapsed, finetune, recalibrate_batchnorm
from hbgs.loggers import build_logger
from hbgs.module import evaluate_accuracy
from hbgs.pruning import channel_widths, fold_identity_adapters, wrap_model
from hbgs.pruning.acra import sensitivity_allocation, uniform_allocation
from hbgs.pruning.costs import NetworkCost, ReferenceCosts, saved_cost
from hbgs.pruning.criteria import CRITERIA, LOOP_CRITERIA, PEER_CRITERIA
from hbgs.pruning.hierarchical import build_pruner, run_rounds, surgery_of
from hbgs.pruning.peers import selector_name, torch_pruning_allocation
from hbgs.pruning.ratios import prune_uniform_fraction
from hbgs.pruning.removal import remove_by_ratios
from hbgs.pruning.surgery import ChannelSurgery, layer_widths, require_torch_pruning
from hbgs.reporting import LoggerRoundCallback, plot_accuracy_vs_flops, plot_widths, write_csv
from hbgs.run_state import Resumed, RunState, StopRequests, library_versions, resume_command

log = logging.getLogger("hbgs")


def load_trained(cfg: DictConfig, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The model to prune, on ``device`` in channels-last layout (faster scoring and fine-tunes),
    and the config that builds its original architecture."""
    if cfg.ckpt is None:
        raise HbgsError("stage=prune needs a trained model: pass ckpt=<path to model.pt> "
                        "(train one with `python -m hbgs.run stage=train model=<name>`).")
    model_cfg = load_model_cfg(cfg.ckpt)
    if model_cfg is not None:
        if model_cfg.get("_target_") != cfg.model.get("_target_"):
            raise HbgsError(f"ckpt={cfg.ckpt} holds {model_cfg.get('_target_')} but the run's model is "
                            f"{cfg.model.get('_target_')}: pass the matching model=... with this checkpoint.")
        if model_cfg.get("num_classes", cfg.dataset.num_classes) != cfg.dataset.num_classes:
            raise HbgsError(f"ckpt={cfg.ckpt} has {model_cfg['num_classes']} classes but dataset={cfg.dataset.name} "
                            f"has {cfg.dataset.num_classes}: pass the dataset it was trained on.")
    return fast_layout(load_model(cfg.ckpt, map_location=device)), model_cfg


class RoundReporter:
    """Loop callback: calibration accuracy after each round (after its fine-tune), wall time,
    a history row, the experiment loggers and the progress bar."""

    def __init__(self, calib_loader, loggers, target: float, metric: str, history_path: Path):
        self.calib_loader, self.metric, self.target, self.history_path = calib_loader, metric, target, history_path
        self.history: list[dict] = []
        self.log = LoggerRoundCallback(loggers)
        self.start = time.perf_counter()
        self.bar = None  # made at the first round: one-shot criteria have no rounds to show

    def on_round_end(self, record, model) -> None:
        row = {k: v for k, v in record.as_dict().items() if k != "scores"}
        row["calib_acc"] = evaluate_accuracy(model, self.calib_loader)
        row["wall_seconds"] = time.perf_counter() - self.start
        self.history.append(row)
        write_csv(self.history_path, self.history)  # rewritten every round: an interrupted run keeps its history
        self.log.on_round_end(row)
        if self.bar is None:
            self.bar = tqdm(total=round(self.target, 2), unit="%", desc=f"pruning to -{self.target:g}% {self.metric}")
        # set, not added (no float drift); from 0: the first adapters of a round can add parameters
        self.bar.n = round(min(max(row[f"{self.metric}_reduction"], 0.0), self.bar.total), 2)
        # the bar itself shows the reduction so far against the target, elapsed time and the ETA
        self.bar.set_postfix(round=row["round"], layer=f"{row['layer']}:{row['side']}",
                             calib_acc=f"{row['calib_acc']:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ShortFinetune:
    """Loop callback: every `every` rounds, `steps` optimizer steps distilled from the original.
    FinetuneDiverged when one diverges: a NaN/inf loss, or calibration accuracy that fell to
    about chance from well above it (``finetune.check_not_collapsed``)."""

    def __init__(self, cfg: DictConfig, datamodule, teacher, trainer_cfg, run_dir: Path, callbacks=()):
        self.cfg, self.datamodule, self.teacher, self.trainer_cfg, self.run_dir = cfg, datamodule, teacher, trainer_cfg, run_dir
        self.callbacks = list(callbacks)  # the training-time regulariser, if any
        self.seconds = 0.0

    def on_round_end(self, record, model) -> None:
        if self.cfg.every > 0 and self.cfg.steps > 0 and record.round % self.cfg.every == 0:
            start = time.perf_counter()
            before = evaluate_accuracy(model, self.datamodule.val_dataloader())
            finetune(model, self.datamodule, self.teacher, self.cfg, steps=self.cfg.steps, lr=self.cfg.lr,
                     trainer_cfg=self.trainer_cfg, default_root_dir=self.run_dir, callbacks=self.callbacks)
            after = evaluate_accuracy(model, self.datamodule.val_dataloader())
            check_not_collapsed(before, after, self.datamodule.num_classes, f"at lr={self.cfg.lr:g}")
            self.seconds += time.perf_counter() - start


def target_of(criterion: DictConfig) -> tuple[float | None, float | None]:
    """(params, flops) targets of the run, checked before anything is loaded: exactly one is set."""
    target = criterion.get("target") or {}
    params, flops = target.get("params"), target.get("flops")
    if (params is None) == (flops is None):
        raise HbgsError(f"criterion.target.params={params} and criterion.target.flops={flops}: give exactly "
                        "one target (a % reduction against the original network) and set the other to null, "
                        "e.g. criterion.target.params=null criterion.target.flops=50")
    return params, flops


def prune(cfg: DictConfig, run_dir: Path) -> dict:
    """stage=prune (see the module docstring). The run directory is ``resume`` itself when given
    (``hbgs.run`` passes it)."""
    stop = StopRequests(cfg.get("stop_after_rounds"), resume_command(run_dir))
    try:
        return _prune(cfg, run_dir, stop)
    finally:
        stop.disarm()


@contextmanager
def stopping_cleanly(state: RunState, run_dir: Path, stop: StopRequests, final: bool = False):
    """The two ways a fine-tune ends a run early, each with one message and the run left usable:
    SIGTERM (Lightning ends a fine-tune at once: the unfinished round or final fine-tune is
    redone on resume) and divergence (the last good round's model kept as model.pt)."""
    try:
        yield
    except SIGTERMException:
        raise stop.stopped("SIGTERM received during a fine-tune", state.round, 128 + signal.SIGTERM) from None
    except FinetuneDiverged as err:
        where = "the final fine-tune" if final else f"round {(state.round or 0) + 1}'s fine-tune"
        option, default = ("finetune.final_lr", "0.01") if final else ("finetune.lr", "0.001")
        raise FinetuneDiverged(f"The run stopped: {where} diverged ({err}). {state.keep_last_good(run_dir)}; "
                               f"use a smaller {option}, e.g. {option}={default} (the default)") from None


# -- what the steps of a run share -------------------------------------------------------------

@dataclass
class PruneRun:
    """One prune run's choices, models, data and bookkeeping, shared by its steps (``start_run``
    builds it; the criterion's runner prunes ``model``, or replaces it)."""

    cfg: DictConfig
    run_dir: Path
    stop: StopRequests
    criterion: str  # criterion.name
    selector: str  # the lower level's channel selector (the peers: Torch-Pruning's importance)
    surgery: str  # "adapters" or "remove"
    target_params: float | None
    target_flops: float | None
    config: dict  # the resolved config, kept with the resumable state
    resumed: Resumed | None  # the stopped run this one continues
    device: torch.device
    original: nn.Module  # the reference and teacher: never trained
    model_cfg: dict | None
    datamodule: Any
    input_size: tuple[int, int, int]
    test_loader: DataLoader
    calib_loader: DataLoader
    reference: ReferenceCosts
    model: nn.Module
    logger: Any
    reporter: RoundReporter
    short_finetune: ShortFinetune
    state: RunState
    seconds_before: float = 0.0  # pruning time of the invocations before this one
    recal_x: torch.Tensor | None = None  # bn_recalibrate's images: BatchNorm statistics re-estimated on them
    pruner: Any = None  # HBGS/HBGTS: the rounds' loop (build_round_pruner)
    goal: tuple[str, float] | None = None  # HBGS/HBGTS: (metric, target) as the pruner checked it
    start: float = 0.0  # when this invocation started pruning (time.perf_counter)

    @property
    def pruned_before(self) -> bool:
        """A resumed run whose pruning was done: on to the final fine-tune."""
        return self.resumed is not None and self.resumed.loop_done

    @property
    def rounds_left(self) -> bool:
        return self.criterion in LOOP_CRITERIA and not self.pruned_before

    def calibration_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.datamodule.calibration_batch(n)
        return fast_layout(x.to(self.device)), y.to(self.device)

    def pruning_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.start

    def recalibrate(self, record, net) -> None:
        """Round callback (bn_recalibrate): the BatchNorm statistics re-estimated after the round."""
        recalibrate_batchnorm(net, self.recal_x)

    def save_round(self, record, net) -> None:
        """The last round callback: all of the round (fine-tune, report) is done."""
        self.state.save(net, model_cfg=self.model_cfg, round=record.round, loop_done=record.target_met,
                        history=self.reporter.history, pruner=self.pruner.state(),
                        seconds={"pruning": self.pruning_seconds(), "short_finetunes": self.short_finetune.seconds})
        self.stop.check(record.round, record.target_met)


@dataclass
class Measured:
    """What a run measured, for its summary and outputs, filled in as the run goes."""

    dense_test: float
    dense_calib: float
    details: dict = field(default_factory=dict)  # the criterion's own numbers
    prune_seconds: float = 0.0
    widths: dict = field(default_factory=dict)
    pruned_test: float = 0.0  # before the final fine-tune
    final_steps: int = 0
    final_seconds: float = 0.0
    finetuned_test: float = 0.0
    cost: NetworkCost | None = None  # after the final fine-tune
    exported: nn.Module | None = None
    export_report: ExportReport | None = None
    exported_test: float = 0.0
    latency: dict = field(default_factory=dict)


# -- the run, step by step ---------------------------------------------------------------------

def _prune(cfg: DictConfig, run_dir: Path, stop: StopRequests) -> dict:
    """The steps of ``prune`` in order (the stop requests are its own)."""
    run = start_run(cfg, run_dir, stop)
    if run.rounds_left:  # built first: a target out of reach is said before minutes of dense evaluation
        build_round_pruner(run)
    measured = Measured(dense_test=evaluate_accuracy(run.original, run.test_loader),
                        dense_calib=evaluate_accuracy(run.original, run.calib_loader))
    run.start = time.perf_counter()
    measured.details = prune_model(run)
    measured.prune_seconds = run.pruning_seconds()
    run.reporter.close()
    measured.widths = widths_of(run)
    fold_identity_adapters(run.model)
    if not run.reporter.history:  # one-shot criteria: a single row
        run.reporter.history.append(one_shot_row(run, measured.prune_seconds))
    measured.pruned_test = evaluate_accuracy(run.model, run.test_loader)
    measured.final_steps, measured.final_seconds = final_finetune(run)
    fold_identity_adapters(run.model)  # fine-tuning may have moved adapters that can be merged exactly
    measured.finetuned_test = (evaluate_accuracy(run.model, run.test_loader) if measured.final_steps
                               else measured.pruned_test)
    measured.cost = saved_cost(run.model, run.reference)
    measured.exported, measured.export_report = export_for_inference(run.model, run.datamodule, cfg.latency)
    measured.exported_test = evaluate_accuracy(measured.exported, run.test_loader)
    measured.latency = latency_block(run.original, run.model, measured.exported, run.input_size, cfg.latency)
    summary = build_summary(run, measured)
    write_outputs(run, measured, summary)
    run.state.remove()  # finished: model.pt and the rest replace the resumable state
    return summary


def start_run(cfg: DictConfig, run_dir: Path, stop: StopRequests) -> PruneRun:
    """Everything before the dense model is evaluated: the run seeded, the model to prune (or the
    stopped run's), the report and the resumable state."""
    criterion, target_params, target_flops, surgery = checked_choices(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    resumed = Resumed.load(cfg.resume, config) if cfg.get("resume") is not None else None
    # One seed for everything drawn from the global generators (the fine-tunes' batch order and
    # augmentation): the same command and seed give the same run.
    L.seed_everything(cfg.seed, workers=True)
    device = run_device(cfg.trainer)  # everything below runs there; the selectors' maths on the CPU
    original, model_cfg = load_trained(cfg, device)
    datamodule = instantiate(cfg.dataset)
    datamodule.setup()
    input_size = datamodule.input_size
    test_loader, calib_loader = datamodule.test_dataloader(), datamodule.val_dataloader()
    reference = ReferenceCosts.measure(original, input_size)
    model = model_to_prune(cfg, original, surgery, resumed, device)
    original.eval().requires_grad_(False)  # the reference and teacher: never trained
    selector = selector_name(cfg.criterion.importance) if criterion in PEER_CRITERIA else cfg.selector.method
    logger = build_logger(cfg.logger, run_dir, f"prune-{criterion}-{selector}",
                          OmegaConf.to_container(cfg, resolve=True))
    reporter = RoundReporter(calib_loader, [logger], target_params or target_flops or 0.0,
                             "params" if target_params is not None else "flops", run_dir / "history.csv")
    short_finetune = ShortFinetune(cfg.finetune, datamodule, original, cfg.trainer, run_dir,
                                   regularizer_callbacks(cfg.regularizer))
    run = PruneRun(cfg=cfg, run_dir=run_dir, stop=stop, criterion=criterion, selector=selector, surgery=surgery,
                   target_params=target_params, target_flops=target_flops, config=config, resumed=resumed,
                   device=device, original=original, model_cfg=model_cfg, datamodule=datamodule,
                   input_size=input_size, test_loader=test_loader, calib_loader=calib_loader, reference=reference,
                   model=model, logger=logger, reporter=reporter, short_finetune=short_finetune,
                   state=RunState(run_dir, config, resumed))
    if resumed is not None:  # the history and times of the invocations before this one
        reporter.history = list(resumed.history)
        short_finetune.seconds, run.seconds_before = resumed.seconds["short_finetunes"], resumed.seconds["pruning"]
    if cfg.finetune.get("bn_recalibrate", 0):
        run.recal_x = run.calibration_batch(cfg.finetune.bn_recalibrate)[0]
    return run


def checked_choices(cfg: DictConfig) -> tuple[str, float | None, float | None, str]:
    """(criterion, target params, target FLOPs, surgery), checked before anything is loaded."""
    criterion = cfg.criterion.name
    if criterion not in CRITERIA:
        raise HbgsError(f"Unknown criterion {criterion!r}: use criterion=one of {', '.join(CRITERIA)}.")
    target_params, target_flops = target_of(cfg.criterion) if criterion != "uniform_fraction" else (None, None)
    surgery = surgery_of(cfg)
    if criterion in PEER_CRITERIA:  # Torch-Pruning's own pruner (hbgs.pruning.peers), checked before anything loads;
        require_torch_pruning(f"criterion={criterion}")  # it always removes channels: surgery= does not apply
        surgery = "remove"
    return criterion, target_params, target_flops, surgery


def model_to_prune(cfg: DictConfig, original: nn.Module, surgery: str, resumed: Resumed | None,
                   device: torch.device) -> nn.Module:
    """A trainable copy of the original (wrapped for surgery=adapters), or the model as the last
    finished round of the resumed run left it (wrapped, or with channels removed)."""
    if resumed is None:
        model = copy.deepcopy(original).requires_grad_(True)
        if surgery == "adapters":
            wrap_model(model)
        return model
    model = fast_layout(resumed.load_model().to(device))
    resumed.warn_if_versions_differ()
    log.info("Resuming %s after %s", cfg.resume, f"round {resumed.round}" if resumed.round else "pruning")
    return model


def build_round_pruner(run: PruneRun) -> None:
    """HBGS/HBGTS: the rounds' loop on the calibration batch, its target checked against the network
    (``build_pruner``'s ``method`` is the selector)."""
    options = run.cfg.criterion
    calib_x, calib_y = run.calibration_batch(options.calib_batch)
    run.pruner = build_pruner(
        run.model, run.original, calib_x, calib_y, criterion=run.criterion, signal=options.get("signal", "features"),
        method=run.selector, step=options.step, min_channels=options.min_channels, input_size=run.input_size,
        seed=run.cfg.seed, surgery=run.surgery, score=options.get("score", "error"))
    run.goal = run.pruner.check_target(run.target_params, run.target_flops)  # builds modules: draws random numbers


def prune_model(run: PruneRun) -> dict:
    """The criterion's runner (or, resumed, where the pruning had ended); the summary's details."""
    if run.pruned_before:
        details = rounds_details(run) if run.criterion in LOOP_CRITERIA else dict(run.resumed.details or {})
        run.resumed.restore_rng()
    else:
        details = RUNNERS[run.criterion](run)
        if run.criterion not in LOOP_CRITERIA and run.resumed is None:
            save_one_shot(run, details)
    details["bn_recalibrate_images"] = len(run.recal_x) if run.recal_x is not None else 0
    return details


def save_one_shot(run: PruneRun, details: dict) -> None:
    """One-shot criteria: recalibrated once, after pruning, then resumable from there."""
    if run.recal_x is not None:
        recalibrate_batchnorm(run.model, run.recal_x)
    run.state.save(run.model, model_cfg=run.model_cfg, round=0, loop_done=True, history=[], pruner=None,
                   details=details, seconds={"pruning": run.pruning_seconds(), "short_finetunes": 0.0})


# -- the criteria's runners: each prunes run.model (or replaces it) and returns the summary's details

def prune_in_rounds(run: PruneRun) -> dict:
    """HBGS/HBGTS: rounds to the target, each followed by the BatchNorm recalibration, the short
    fine-tune, the report and the resumable state; a stop request ends it at a round boundary."""
    if run.resumed is not None:  # where the next round starts: the loop's counters and the RNG states
        run.pruner.restore(run.resumed.pruner)
        run.resumed.restore_rng()
        history = run.reporter.history
        run.reporter.start = time.perf_counter() - (history[-1]["wall_seconds"] if history else 0)
    recalibration = [run.recalibrate] if run.recal_x is not None else []
    run.stop.arm()  # SIGINT/SIGTERM now stop the run at the next round boundary
    try:
        with stopping_cleanly(run.state, run.run_dir, run.stop):
            run_rounds(run.pruner, *run.goal,
                       callbacks=[*recalibration, run.short_finetune, run.reporter, run.save_round])
    finally:
        run.reporter.close()  # the progress bar ends before any message
    run.state.mark_loop_done()  # also when the loop ran out of candidates before the target
    return rounds_details(run)


def rounds_details(run: PruneRun) -> dict:
    """The summary's ``details`` of an HBGS/HBGTS run, from its history (all rounds, resumed or not)."""
    options, history = run.cfg.criterion, run.reporter.history
    calib_batch = min(options.calib_batch, len(run.datamodule.splits["calibration"]))
    return {"rounds": len(history), "signal": options.get("signal") if run.criterion == "hbgts" else None,
            "score": options.get("score", "error"), "step": options.step, "calib_batch": calib_batch,
            "propose_seconds": sum(r["propose_seconds"] for r in history),
            "score_seconds": sum(r["score_seconds"] for r in history),
            # error_per_latency: every timed layer shape (ms), the batch, the dense network's sum
            "latency_table": run.pruner.latencies.summary() if getattr(run.pruner, "latencies", None) else None}


def prune_acra_uniform(run: PruneRun) -> dict:
    """ACRA uniform: the smallest ratio, the same for every layer, meeting the target."""
    calib_x = (run.calibration_batch(run.cfg.criterion.get("calib_batch", 256))[0] if run.surgery == "remove"
               else None)  # the adapters' compensation needs no data
    allocation = uniform_allocation(run.model, run.original, calib_x=calib_x, **acra_options(run))
    return adopt_allocation(run, allocation, {"ratio": allocation.ratio})


def prune_acra_sensitivity(run: PruneRun) -> dict:
    """ACRA sensitivity: per-layer ratios from each layer's measured sensitivity, at the
    threshold meeting the target."""
    calib_x, calib_y = run.calibration_batch(run.cfg.criterion.calib_batch)
    allocation = sensitivity_allocation(run.model, run.original, calib_x, calib_y,
                                        ratios=list(run.cfg.criterion.ratios), **acra_options(run))
    table = allocation.table
    return adopt_allocation(run, allocation, {
        "threshold_points": allocation.threshold, "ratios": allocation.ratios,
        "sensitivity": {"measure": table.measure, "base": table.base, "ratios": list(table.ratios),
                        "drops": table.drops}})


def acra_options(run: PruneRun) -> dict:
    """The keyword arguments both ACRA allocations take (``method``: their name for the selector)."""
    options = run.cfg.criterion
    return dict(target_params=run.target_params, target_flops=run.target_flops, method=run.selector,
                tolerance=options.tolerance, min_channels=options.get("min_channels", 1),
                input_size=run.input_size, seed=run.cfg.seed, surgery=run.surgery)


def adopt_allocation(run: PruneRun, allocation, details: dict) -> dict:
    """The allocation's pruned model becomes the run's; ``details`` plus how near the target it came."""
    run.model = allocation.model
    return details | {"target": allocation.target, "tolerance_points": allocation.tolerance,
                      "within_tolerance": allocation.within_tolerance, "evaluations": allocation.evaluations}


def prune_fraction_of_every_layer(run: PruneRun) -> dict:
    """uniform_fraction: the same fraction of every layer's channels (no target), removed
    (surgery=remove, compensated on calibration images) or cut behind adapters."""
    options = run.cfg.criterion
    min_channels = options.get("min_channels", 1)
    if run.surgery == "remove":
        calib_x, _ = run.calibration_batch(options.get("calib_batch", 256))
        groups = ChannelSurgery(run.model, calib_x[:1]).groups()
        remove_by_ratios(run.model, {g.root: options.fraction for g in groups}, groups, run.selector, calib_x,
                         min_channels=min_channels, seed=run.cfg.seed)
    else:
        prune_uniform_fraction(run.model, options.fraction, run.selector, min_channels=min_channels,
                               seed=run.cfg.seed)
    return {"fraction": options.fraction}


def prune_with_torch_pruning(run: PruneRun) -> dict:
    """The peers (PEER_CRITERIA): one Torch-Pruning MetaPruner step at the smallest ratio
    meeting the target."""
    options = run.cfg.criterion
    allocation = torch_pruning_allocation(
        run.model, run.original, importance=options.importance, global_pruning=options.get("global_pruning"),
        target_params=run.target_params, target_flops=run.target_flops, tolerance=options.tolerance,
        input_size=run.input_size, example_input=run.calibration_batch(1)[0])
    run.model = allocation.model
    return allocation.details()


RUNNERS = {**dict.fromkeys(LOOP_CRITERIA, prune_in_rounds), "uniform": prune_acra_uniform,
           "sensitivity": prune_acra_sensitivity, "uniform_fraction": prune_fraction_of_every_layer,
           **dict.fromkeys(PEER_CRITERIA, prune_with_torch_pruning)}  # criterion name → its runner


# -- after the pruning ---------------------------------------------------------------------------

def widths_of(run: PruneRun) -> dict:
    """The summary's per-layer widths: the adapters' own record, or the layers against the original."""
    if run.surgery == "adapters":
        return {name: vars(w) for name, w in channel_widths(run.model).items()}
    return layer_widths(run.model, run.original)


def one_shot_row(run: PruneRun, prune_seconds: float) -> dict:
    """The history's single row of a one-shot criterion."""
    cost = saved_cost(run.model, run.reference)
    return {"round": 1, "layer": "all", "side": "both", "params": cost.params, "flops": cost.flops,
            "params_reduction": cost.params_reduction, "flops_reduction": cost.flops_reduction,
            "calib_acc": evaluate_accuracy(run.model, run.calib_loader), "wall_seconds": prune_seconds}


def final_finetune(run: PruneRun) -> tuple[int, float]:
    """The final fine-tune, distilled from the original: (its optimizer steps, its seconds)."""
    cfg = run.cfg
    start = time.perf_counter()
    run.stop.arm()  # a stop asked for during the final fine-tune ends it; resume= redoes it
    with stopping_cleanly(run.state, run.run_dir, run.stop, final=True):
        steps = finetune(run.model, run.datamodule, run.original, cfg.finetune, epochs=cfg.finetune.final_epochs,
                         lr=cfg.finetune.final_lr, trainer_cfg=cfg.trainer, logger=run.logger,
                         default_root_dir=run.run_dir,
                         callbacks=[*regularizer_callbacks(cfg.regularizer), run.stop.lightning_callback()])
        if run.stop.signal is not None:
            raise run.stop.stopped(f"{run.stop.signal.name} received during the final fine-tune", run.state.round,
                                   128 + int(run.stop.signal))
        if steps:
            check_not_collapsed(run.reporter.history[-1]["calib_acc"], evaluate_accuracy(run.model, run.calib_loader),
                                run.datamodule.num_classes, f"at lr={cfg.finetune.final_lr:g}")
    run.stop.disarm()  # what is left takes seconds: signals have their usual effect again
    return steps, time.perf_counter() - start


def build_summary(run: PruneRun, measured: Measured) -> dict:
    """summary.json of the run."""
    cfg, reference, cost, exported = run.cfg, run.reference, measured.cost, measured.exported
    return {
        "stage": "prune",
        "method": cfg.get("method"),  # the paper's name when chosen with method=...
        "criterion": run.criterion,
        "selector": run.selector,
        "surgery": run.surgery,
        "device": str(run.device),  # where the run pruned, scored and fine-tuned (trainer=)
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "dataset": cfg.dataset.name,
        "test_images": len(run.datamodule.splits["test"]),
        "target": {"params": run.target_params, "flops": run.target_flops},
        "accuracy": {"dense_test": measured.dense_test, "dense_calib": measured.dense_calib,
                     "pruned_test_before_finetune": measured.pruned_test,
                     "pruned_test_after_finetune": measured.finetuned_test,
                     "final_finetune_steps": measured.final_steps, "exported_test": measured.exported_test},
        "cost": {"convention": "params: all parameters; flops: MACs of conv+linear for one "
                               f"{'x'.join(map(str, run.input_size))} image",
                 "original": {"params": reference.params_original, "flops": reference.flops_original},
                 "adapter_augmented": {"params": reference.params_augmented, "flops": reference.flops_augmented},
                 "pruned": {"params": cost.params, "flops": cost.flops},
                 "exported": {"params": count_params(exported), "flops": count_macs(exported, run.input_size)},
                 "reduction_vs_original_pct": {"params": cost.params_reduction, "flops": cost.flops_reduction},
                 "reduction_vs_adapter_augmented_pct": {"params": cost.params_reduction_vs_augmented,
                                                        "flops": cost.flops_reduction_vs_augmented}},
        "widths": measured.widths,
        "seconds": {"pruning": measured.prune_seconds, "short_finetunes": run.short_finetune.seconds,
                    "final_finetune": measured.final_seconds},
        "latency_cpu": measured.latency,
        "export": measured.export_report.as_dict(),
        "details": measured.details,
        "regularizer": OmegaConf.to_container(cfg.regularizer, resolve=True),  # during fine-tuning
        "seed": cfg.seed,
        "resumed_after_rounds": run.state.resumes,  # where earlier invocations of this run stopped
        "versions": library_versions(),
        "config": run.config,  # the full resolved config
        "outputs": {name: str(path) for name, path in output_paths(run.run_dir).items()},
    }


def output_paths(run_dir: Path) -> dict[str, Path]:
    """The files a finished run leaves besides summary.json (hbgs.run writes that one)."""
    return {"accuracy_vs_flops": run_dir / "accuracy_vs_flops.png", "widths": run_dir / "widths.png",
            "model": run_dir / "model.pt", "model_exported": run_dir / "model_exported.pt",
            "history": run_dir / "history.csv"}


def write_outputs(run: PruneRun, measured: Measured, summary: dict) -> None:
    """The pruned and exported models, the history and the plots (``output_paths``)."""
    paths = output_paths(run.run_dir)
    meta = {"pruned_from": summary["checkpoint"], "criterion": run.criterion, "selector": run.selector,
            "test_acc": measured.finetuned_test, "dataset": run.cfg.dataset.name, "input_size": list(run.input_size)}
    save_model(run.model, paths["model"], model_cfg=run.model_cfg, meta=meta | {"exported": False})
    save_model(measured.exported, paths["model_exported"], model_cfg=run.model_cfg,
               meta=meta | {"test_acc": measured.exported_test, "exported": True,
                            "export": measured.export_report.as_dict()})
    write_csv(paths["history"], run.reporter.history)
    title = f"{run.cfg.model._target_.rsplit('.', 1)[-1]}: {run.criterion} + {run.selector}"
    plots = {name: paths[name] for name in ("accuracy_vs_flops", "widths")}
    plot_accuracy_vs_flops(plots["accuracy_vs_flops"], run.reporter.history, measured.dense_calib, title)
    plot_widths(plots["widths"], measured.widths, title)
    run.reporter.log.on_prune_end(run.reporter.history, plots)


def export_for_inference(model: torch.nn.Module, datamodule, latency_cfg: DictConfig):
    """``hbgs.export`` of the final model, its choices timed at the largest reported batch size
    with the reported threads; checked on a few real calibration images."""
    example, _ = datamodule.calibration_batch(8)
    repeats = min(latency_cfg.repeats, latency_cfg.get("export_repeats", 7))
    return export(model, example_input=example, batch_size=max(latency_cfg.batch_sizes),
                  threads=latency_cfg.threads, repeats=repeats, report=True)


def latency_block(original, pruned, exported, input_size, latency_cfg: DictConfig) -> dict:
    """CPU latency of the dense, pruned and exported models, measured together (interleaved
    repeats, one process, the threads stated), with the speed-ups against the dense model."""
    models = {"dense": original, "pruned": pruned, "exported": exported}
    latency = measure_latencies(models, batch_sizes=list(latency_cfg.batch_sizes), input_size=tuple(input_size),
                                threads=latency_cfg.threads, repeats=latency_cfg.repeats)
    latency |= {"speedup_vs_dense": speedups(latency, "dense")}
    if torch.cuda.is_available():  # the same models on the GPU (the exported one keeps its CPU-chosen form)
        cuda = measure_latencies(models, batch_sizes=list(latency_cfg.batch_sizes), input_size=tuple(input_size),
                                 repeats=latency_cfg.repeats, device="cuda")
        latency["cuda"] = cuda | {"speedup_vs_dense": speedups(cuda, "dense")}
    return latency
