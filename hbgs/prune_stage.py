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
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from hbgs.accounting import count_macs, count_params, measure_latencies, speedups
from hbgs.bridgeout import regularizer_callbacks
from hbgs.checkpoint import load_model, load_model_cfg, save_model
from hbgs.devices import run_device
from hbgs.errors import HbgsError
from hbgs.export import export
from hbgs.finetune import FinetuneDiverged, check_not_collapsed, finetune, recalibrate_batchnorm
from hbgs.loggers import build_logger
from hbgs.module import evaluate_accuracy
from hbgs.pruning import channel_widths, fold_identity_adapters, wrap_model
from hbgs.pruning.acra import sensitivity_allocation, uniform_allocation
from hbgs.pruning.costs import ReferenceCosts, saved_cost
from hbgs.pruning.criteria import CRITERIA, PEER_CRITERIA
from hbgs.pruning.hierarchical import build_pruner, run_rounds, surgery_of
from hbgs.pruning.peers import selector_name, torch_pruning_allocation
from hbgs.pruning.ratios import prune_uniform_fraction
from hbgs.pruning.removal import remove_by_ratios
from hbgs.pruning.surgery import ChannelSurgery, layer_widths, require_torch_pruning
from hbgs.reporting import LoggerRoundCallback, plot_accuracy_vs_flops, plot_widths, write_csv
from hbgs.run_state import Resumed, RunState, StopRequests, library_versions, resume_command

log = logging.getLogger("hbgs")


def load_trained(cfg: DictConfig, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The model to prune, on ``device``, and the config that builds its original architecture."""
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
    return load_model(cfg.ckpt, map_location=device), model_cfg


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
        self.bar.n = round(min(row[f"{self.metric}_reduction"], self.bar.total), 2)  # set, not added: no float drift
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


def rounds_details(cfg: DictConfig, crit: str, history: list[dict], calib_batch: int) -> dict:
    """The summary's ``details`` of an HBGS/HBGTS run, from its history (all rounds, resumed or not)."""
    return {"rounds": len(history), "signal": cfg.criterion.get("signal") if crit == "hbgts" else None,
            "score": cfg.criterion.get("score", "error"), "step": cfg.criterion.step, "calib_batch": calib_batch,
            "propose_seconds": sum(r["propose_seconds"] for r in history),
            "score_seconds": sum(r["score_seconds"] for r in history)}


def _prune(cfg: DictConfig, run_dir: Path, stop: StopRequests) -> dict:
    crit = cfg.criterion.name
    if crit not in CRITERIA:
        raise HbgsError(f"Unknown criterion {crit!r}: use criterion=one of {', '.join(CRITERIA)}.")
    target_params, target_flops = target_of(cfg.criterion) if crit != "uniform_fraction" else (None, None)
    surgery = surgery_of(cfg)
    if crit in PEER_CRITERIA:  # Torch-Pruning's own pruner (hbgs.pruning.peers), checked before anything loads;
        require_torch_pruning(f"criterion={crit}")  # it always removes channels: surgery= does not apply
        surgery = "remove"
    config = OmegaConf.to_container(cfg, resolve=True)
    resumed = Resumed.load(cfg.resume, config) if cfg.get("resume") is not None else None
    # One seed for everything drawn from the global generators (the fine-tunes' batch order and
    # augmentation): the same command and seed give the same run.
    L.seed_everything(cfg.seed, workers=True)
    device = run_device(cfg.trainer)  # everything below runs there; the selectors' maths on the CPU
    original, model_cfg = load_trained(cfg, device)
    datamodule = instantiate(cfg.dataset)
    datamodule.setup()

    def calibration_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = datamodule.calibration_batch(n)
        return x.to(device), y.to(device)

    input_size = datamodule.input_size
    test_loader, calib_loader = datamodule.test_dataloader(), datamodule.val_dataloader()
    reference = ReferenceCosts.measure(original, input_size)
    if resumed is None:
        model = copy.deepcopy(original).requires_grad_(True)
        if surgery == "adapters":
            wrap_model(model)
    else:  # the model as the last finished round left it (wrapped, or with channels removed)
        model = resumed.load_model().to(device)
        resumed.warn_if_versions_differ()
        log.info("Resuming %s after %s", cfg.resume, f"round {resumed.round}" if resumed.round else "pruning")
    original.eval().requires_grad_(False)  # the reference and teacher: never trained
    method = selector_name(cfg.criterion.importance) if crit in PEER_CRITERIA else cfg.selector.method
    seed = cfg.seed
    metric = "params" if target_params is not None else "flops"
    logger = build_logger(cfg.logger, run_dir, f"prune-{crit}-{method}", OmegaConf.to_container(cfg, resolve=True))
    reporter = RoundReporter(calib_loader, [logger], target_params or target_flops or 0.0, metric,
                             run_dir / "history.csv")
    short_finetune = ShortFinetune(cfg.finetune, datamodule, original, cfg.trainer, run_dir,
                                   regularizer_callbacks(cfg.regularizer))
    state = RunState(run_dir, config, resumed)
    seconds_before = 0.0  # pruning time of the invocations before this one
    if resumed is not None:
        reporter.history = list(resumed.history)
        short_finetune.seconds, seconds_before = resumed.seconds["short_finetunes"], resumed.seconds["pruning"]
    details: dict = {}
    recalibration = []  # BatchNorm statistics re-estimated after every round
    if cfg.finetune.get("bn_recalibrate", 0):
        recal_x = calibration_batch(cfg.finetune.bn_recalibrate)[0]
        recalibration = [lambda record, net: recalibrate_batchnorm(net, recal_x)]
    loop = crit in ("hbgs", "hbgts") and not (resumed is not None and resumed.loop_done)
    if loop:  # built first: a target out of reach is said before minutes of dense evaluation
        calib_x, calib_y = calibration_batch(cfg.criterion.calib_batch)
        pruner = build_pruner(
            model, original, calib_x, calib_y, criterion=crit, signal=cfg.criterion.get("signal", "features"),
            method=method, step=cfg.criterion.step, min_channels=cfg.criterion.min_channels, input_size=input_size,
            seed=seed, surgery=surgery, score=cfg.criterion.get("score", "error"))
        metric, target = pruner.check_target(target_params, target_flops)  # builds modules: draws random numbers

    dense_test = evaluate_accuracy(original, test_loader)
    dense_calib = evaluate_accuracy(original, calib_loader)
    start = time.perf_counter()

    def pruning_seconds() -> float:
        return seconds_before + time.perf_counter() - start

    if resumed is not None and resumed.loop_done:  # the pruning was done: on to the final fine-tune
        details = dict(resumed.details or {})
        resumed.restore_rng()
    elif loop:
        if resumed is not None:  # where the next round starts: the loop's counters and the RNG states
            pruner.restore(resumed.pruner)
            resumed.restore_rng()
            reporter.start = time.perf_counter() - (reporter.history[-1]["wall_seconds"] if reporter.history else 0)

        def save_round(record, net) -> None:  # the last callback: all of the round (fine-tune, report) is done
            state.save(net, model_cfg=model_cfg, round=record.round, loop_done=record.target_met,
                       history=reporter.history, pruner=pruner.state(),
                       seconds={"pruning": pruning_seconds(), "short_finetunes": short_finetune.seconds})
            stop.check(record.round, record.target_met)

        stop.arm()  # SIGINT/SIGTERM now stop the run at the next round boundary
        try:
            with stopping_cleanly(state, run_dir, stop):
                run_rounds(pruner, metric, target, callbacks=[*recalibration, short_finetune, reporter, save_round])
        finally:
            reporter.close()  # the progress bar ends before any message
        state.mark_loop_done()  # also when the loop ran out of candidates before the target
    elif crit == "uniform_fraction" and surgery == "remove":
        calib_x, _ = calibration_batch(cfg.criterion.get("calib_batch", 256))
        groups = ChannelSurgery(model, calib_x[:1]).groups()
        remove_by_ratios(model, {g.root: cfg.criterion.fraction for g in groups}, groups, method, calib_x,
                         min_channels=cfg.criterion.get("min_channels", 1), seed=seed)
        details = {"fraction": cfg.criterion.fraction}
    elif crit == "uniform_fraction":
        prune_uniform_fraction(model, cfg.criterion.fraction, method, min_channels=cfg.criterion.get("min_channels", 1),
                               seed=seed)
        details = {"fraction": cfg.criterion.fraction}
    elif crit in PEER_CRITERIA:  # one MetaPruner step at the smallest ratio meeting the target
        allocation = torch_pruning_allocation(
            model, original, importance=cfg.criterion.importance, global_pruning=cfg.criterion.get("global_pruning"),
            target_params=target_params, target_flops=target_flops, tolerance=cfg.criterion.tolerance,
            input_size=input_size, example_input=calibration_batch(1)[0])
        model, details = allocation.model, allocation.details()
    else:
        common = dict(target_params=target_params, target_flops=target_flops, method=method,
                      tolerance=cfg.criterion.tolerance, min_channels=cfg.criterion.get("min_channels", 1),
                      input_size=input_size, seed=seed, surgery=surgery)
        if crit == "uniform":
            calib_x = calibration_batch(cfg.criterion.get("calib_batch", 256))[0] if surgery == "remove" \
                else None  # the adapters' compensation needs no data
            allocation = uniform_allocation(model, original, calib_x=calib_x, **common)
            details = {"ratio": allocation.ratio}
        else:
            calib_x, calib_y = calibration_batch(cfg.criterion.calib_batch)
            allocation = sensitivity_allocation(model, original, calib_x, calib_y, ratios=list(cfg.criterion.ratios),
                                                **common)
            details = {"threshold_points": allocation.threshold, "ratios": allocation.ratios,
                       "sensitivity": {"measure": allocation.table.measure, "base": allocation.table.base,
                                       "ratios": list(allocation.table.ratios), "drops": allocation.table.drops}}
        model = allocation.model
        details.update(target=allocation.target, tolerance_points=allocation.tolerance,
                       within_tolerance=allocation.within_tolerance, evaluations=allocation.evaluations)
    if crit in ("hbgs", "hbgts"):  # all the rounds, of this invocation and those before
        details = rounds_details(cfg, crit, reporter.history,
                                 min(cfg.criterion.calib_batch, len(datamodule.splits["calibration"])))
    elif resumed is None:  # one-shot criteria: recalibrated once, after pruning, then resumable from there
        if recalibration:
            recalibrate_batchnorm(model, recal_x)
        state.save(model, model_cfg=model_cfg, round=0, loop_done=True, history=[], pruner=None, details=details,
                   seconds={"pruning": pruning_seconds(), "short_finetunes": 0.0})
    details["bn_recalibrate_images"] = len(recal_x) if recalibration else 0
    prune_seconds = pruning_seconds()
    reporter.close()
    widths = ({name: vars(w) for name, w in channel_widths(model).items()} if surgery == "adapters"
              else layer_widths(model, original))
    fold_identity_adapters(model)
    cost = saved_cost(model, reference)
    if not reporter.history:  # one-shot criteria: a single row
        reporter.history.append({"round": 1, "layer": "all", "side": "both", "params": cost.params, "flops": cost.flops,
                                 "params_reduction": cost.params_reduction, "flops_reduction": cost.flops_reduction,
                                 "calib_acc": evaluate_accuracy(model, calib_loader), "wall_seconds": prune_seconds})

    pruned_test = evaluate_accuracy(model, test_loader)
    start = time.perf_counter()
    stop.arm()  # a stop asked for during the final fine-tune ends it; resume= redoes it
    with stopping_cleanly(state, run_dir, stop, final=True):
        final_steps = finetune(model, datamodule, original, cfg.finetune, epochs=cfg.finetune.final_epochs,
                               lr=cfg.finetune.final_lr, trainer_cfg=cfg.trainer, logger=logger,
                               default_root_dir=run_dir,
                               callbacks=[*regularizer_callbacks(cfg.regularizer), stop.lightning_callback()])
        if stop.signal is not None:
            raise stop.stopped(f"{stop.signal.name} received during the final fine-tune", state.round,
                               128 + int(stop.signal))
        if final_steps:
            check_not_collapsed(reporter.history[-1]["calib_acc"], evaluate_accuracy(model, calib_loader),
                                datamodule.num_classes, f"at lr={cfg.finetune.final_lr:g}")
    stop.disarm()  # what is left takes seconds: signals have their usual effect again
    final_seconds = time.perf_counter() - start
    fold_identity_adapters(model)  # fine-tuning may have moved adapters that can be merged exactly
    finetuned_test = evaluate_accuracy(model, test_loader) if final_steps else pruned_test
    cost = saved_cost(model, reference)

    exported, export_report = export_for_inference(model, datamodule, cfg.latency)
    exported_test = evaluate_accuracy(exported, test_loader)
    latency = latency_block(original, model, exported, input_size, cfg.latency)
    summary = {
        "stage": "prune",
        "method": cfg.get("method"),  # the paper's name when chosen with method=...
        "criterion": crit,
        "selector": method,
        "surgery": surgery,
        "device": str(device),  # where the run pruned, scored and fine-tuned (trainer=)
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "dataset": cfg.dataset.name,
        "test_images": len(datamodule.splits["test"]),
        "target": {"params": target_params, "flops": target_flops},
        "accuracy": {"dense_test": dense_test, "dense_calib": dense_calib, "pruned_test_before_finetune": pruned_test,
                     "pruned_test_after_finetune": finetuned_test, "final_finetune_steps": final_steps,
                     "exported_test": exported_test},
        "cost": {"convention": "params: all parameters; flops: MACs of conv+linear for one "
                               f"{'x'.join(map(str, input_size))} image",
                 "original": {"params": reference.params_original, "flops": reference.flops_original},
                 "adapter_augmented": {"params": reference.params_augmented, "flops": reference.flops_augmented},
                 "pruned": {"params": cost.params, "flops": cost.flops},
                 "exported": {"params": count_params(exported), "flops": count_macs(exported, input_size)},
                 "reduction_vs_original_pct": {"params": cost.params_reduction, "flops": cost.flops_reduction},
                 "reduction_vs_adapter_augmented_pct": {"params": cost.params_reduction_vs_augmented,
                                                        "flops": cost.flops_reduction_vs_augmented}},
        "widths": widths,
        "seconds": {"pruning": prune_seconds, "short_finetunes": short_finetune.seconds, "final_finetune": final_seconds},
        "latency_cpu": latency,
        "export": export_report.as_dict(),
        "details": details,
        "regularizer": OmegaConf.to_container(cfg.regularizer, resolve=True),  # during fine-tuning
        "seed": cfg.seed,
        "resumed_after_rounds": state.resumes,  # where earlier invocations of this run stopped
        "versions": library_versions(),
        "config": config,  # the full resolved config
    }
    meta = {"pruned_from": summary["checkpoint"], "criterion": crit, "selector": method,
            "test_acc": finetuned_test, "dataset": cfg.dataset.name, "input_size": list(input_size)}
    save_model(model, run_dir / "model.pt", model_cfg=model_cfg, meta=meta | {"exported": False})
    save_model(exported, run_dir / "model_exported.pt", model_cfg=model_cfg,
               meta=meta | {"test_acc": exported_test, "exported": True, "export": export_report.as_dict()})
    write_csv(run_dir / "history.csv", reporter.history)
    title = f"{cfg.model._target_.rsplit('.', 1)[-1]}: {crit} + {method}"
    plots = {"accuracy_vs_flops": run_dir / "accuracy_vs_flops.png", "widths": run_dir / "widths.png"}
    plot_accuracy_vs_flops(plots["accuracy_vs_flops"], reporter.history, dense_calib, title)
    plot_widths(plots["widths"], widths, title)
    reporter.log.on_prune_end(reporter.history, plots)
    summary["outputs"] = {k: str(v) for k, v in plots.items()} | {"model": str(run_dir / "model.pt"),
                                                                   "model_exported": str(run_dir / "model_exported.pt"),
                                                                   "history": str(run_dir / "history.csv")}
    state.remove()  # finished: model.pt and the rest replace the resumable state
    return summary


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
