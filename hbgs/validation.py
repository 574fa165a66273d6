"""Every option of a run checked before any work: one pass over the composed config.

``hbgs.run`` calls ``validate(cfg)`` before a checkpoint or any data is read, so a bad option
costs seconds instead of a run. A failure is an ``HbgsError`` of one line naming the option, its
bad value and a valid example (``finetune.lr=-1 must be a positive number, e.g.
finetune.lr=0.001``); the first bad option found is the one reported. Only the options the chosen
``stage`` reads are checked.

Two halves: ``check_config`` (types, ranges, choices and combinations: true or false on any
machine) and ``check_machine`` (what this machine must have: the files named, the GPUs asked
for, Torch-Pruning).

The lists of valid choices come from the modules that use them. A few of those modules import
Lightning, which takes seconds, so the checks needing them come last in their stage; the stage
imports them anyway. ``STAGES`` is restated here for the same reason (a test keeps it equal to
``hbgs.stages.STAGES``); ``CRITERIA`` comes from ``hbgs.pruning.criteria``, which imports nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hbgs.errors import HbgsError
from hbgs.pruning import hierarchical
from hbgs.pruning.criteria import CRITERIA, LOOP_CRITERIA, PEER_CRITERIA
from hbgs.pruning.peers import IMPORTANCES
from hbgs.pruning.selectors import METHODS

STAGES = ("train", "eval", "prune", "robustness")
DATASETS = ("cifar10", "cifar100", "imagefolder")  # what hbgs.data.ImageDataModule reads
LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("offline", "online", "disabled")
REGULARIZERS = ("none", "bridgeout")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
# Lightning's precisions (its transformer-engine ones need a library hbgs does not install), and
# auto: bf16-mixed where the CPU is fast at it, else 32-true (hbgs.devices.lightning_precision)
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true",
              32, 16, 64, "32", "16", "64", "bf16", "auto")
# Precisions that convert the weights for good (Lightning casts the module): the pruning loop
# then meets float32 calibration images, and the teacher is converted too.
CASTING_PRECISIONS = ("16-true", "bf16-true", "64-true", 64, "64")
MAX_SEED = 2**32 - 1  # Lightning's seed_everything and numpy accept no more
EXAMPLES_OF_MANDATORY = {"dataset.root": "/path/to/images", "dataset.num_classes": "10"}

_ABSENT = object()


def validate(cfg: DictConfig) -> None:
    """HbgsError for the first bad option of a run (one line: the option, its value and a valid
    example); nothing when the run may start."""
    check_config(cfg)
    check_machine(cfg)


def check_config(cfg: DictConfig) -> None:
    """Types, ranges, choices and combinations of the options ``cfg.stage`` reads."""
    _check_complete(cfg)
    stage = _choice(cfg, "stage", STAGES, example="stage=prune")
    _integer(cfg, "seed", 0, "seed=0", high=MAX_SEED)
    _integer(cfg, "threads", 1, "threads=1", null=True)
    _check_logger(cfg)
    _check_dataset(cfg)
    {"train": _check_train, "eval": _check_eval, "prune": _check_prune,
     "robustness": _check_robustness}[stage](cfg)


def check_machine(cfg: DictConfig) -> None:
    """What the run needs of this machine: the files it names, the accelerator it asks for and
    Torch-Pruning where channels are removed."""
    stage = cfg.stage
    if stage in ("eval", "prune") or (stage == "robustness" and not cfg.robustness.checkpoints):
        _require_file("ckpt", cfg.ckpt)
    if stage == "robustness":
        for label, path in (_get(cfg, "robustness.checkpoints") or {}).items():
            _require_file(f"robustness.checkpoints.{label}", path)
    resume = _get(cfg, "resume", optional=True)
    if _given(resume):
        if stage == "train" and not Path(resume).is_file():
            _fail("resume", resume, "is not a file", "resume=<run dir>/checkpoints/last.ckpt (the Lightning "
                  "checkpoint a stage=train run writes)")
        if not Path(resume).exists():
            _fail("resume", resume, "does not exist", "resume=<run dir>")
    root = cfg.dataset.root
    if root is not None and not cfg.dataset.download and not Path(root).expanduser().exists():
        _fail("dataset.root", root, "does not exist", f"dataset.root=/path/to/{cfg.dataset.name}"
              + (" (or dataset.download=true with internet)" if cfg.dataset.name != "imagefolder" else ""))
    _check_accelerator_present(cfg)  # every stage computes on the trainer's device
    if stage in ("prune", "robustness"):
        surgery = hierarchical.surgery_of(cfg)
        peer = stage == "prune" and cfg.criterion.name in PEER_CRITERIA
        if surgery == "remove" or peer:
            from hbgs.pruning.surgery import require_torch_pruning

            require_torch_pruning(f"criterion={cfg.criterion.name}" if peer else "surgery=remove")


# -- the stages ------------------------------------------------------------------------------

def _check_train(cfg: DictConfig) -> None:
    _check_trainer(cfg, fit=True)
    _number(cfg, "optim.lr", "optim.lr=0.1", low=0, open_low=True)
    _number(cfg, "optim.momentum", "optim.momentum=0.9", low=0, high=1, open_high=True)
    _number(cfg, "optim.weight_decay", "optim.weight_decay=5e-4", low=0)
    _flag(cfg, "optim.nesterov")
    milestones = _get(cfg, "optim.milestones")
    if not isinstance(milestones, list) or not all(_is_number(m) and 0 < m < 1 for m in milestones):
        _fail("optim.milestones", milestones, "must be a list of fractions of the whole fit in (0, 1)",
              "optim.milestones=[0.5,0.75]")
    _number(cfg, "optim.gamma", "optim.gamma=0.1", low=0, open_low=True)
    _check_regularizer(cfg)
    model_classes = _get(cfg, "model.num_classes", optional=True)
    if model_classes is not _ABSENT and model_classes != cfg.dataset.num_classes:
        _fail("model.num_classes", model_classes, f"must equal dataset.num_classes={cfg.dataset.num_classes} (the "
              "labels the model is trained on)", f"model.num_classes={cfg.dataset.num_classes}")
    # Last: these import what training imports anyway (Lightning; the model's module), so a
    # cheaper mistake is reported without waiting for them.
    from hbgs.module import SCHEDULES

    _choice(cfg, "optim.schedule", SCHEDULES)
    _check_model_target(cfg)


def _check_eval(cfg: DictConfig) -> None:
    _require_ckpt(cfg)
    _check_trainer(cfg, fit=False)  # its device measures the accuracy
    _check_latency(cfg)


def _check_prune(cfg: DictConfig) -> None:
    _require_ckpt(cfg)
    hierarchical.surgery_of(cfg)
    _integer(cfg, "dataset.calib_size", 1, "dataset.calib_size=1000",
             note="stage=prune decides on held-out calibration images")
    criterion = _check_criterion(cfg)
    if criterion not in PEER_CRITERIA:  # the peers rank channels by their own importance
        _choice(cfg, "selector.method", METHODS, example="selector=backward")
    _check_finetune(cfg)
    _integer(cfg, "stop_after_rounds", 1, "stop_after_rounds=10", null=True, optional=True)
    _check_trainer(cfg, fit=False)
    _check_one_device(cfg)
    precision = _get(cfg, "trainer.precision")
    if precision in CASTING_PRECISIONS:
        _fail("trainer.precision", precision, "casts the model and its teacher for good during the fine-tunes, "
              "which the pruning loop cannot score on (float32 calibration images); keep float32 weights",
              "trainer.precision=bf16-mixed (on a GPU) or trainer.precision=32-true")
    _check_regularizer(cfg)
    _check_latency(cfg, export=True)


def _check_robustness(cfg: DictConfig) -> None:
    surgery = hierarchical.surgery_of(cfg)
    _check_trainer(cfg, fit=False)  # its device runs the evaluations
    _check_one_device(cfg)
    checkpoints = _get(cfg, "robustness.checkpoints")
    if checkpoints is not None and (not isinstance(checkpoints, dict)
                                    or not all(isinstance(p, str) and p for p in checkpoints.values())):
        _fail("robustness.checkpoints", checkpoints, "must map labels to model files",
              "'robustness.checkpoints={plain: a/model.pt, bridgeout: b/model.pt}'")
    if not checkpoints and cfg.ckpt is None:
        raise HbgsError("ckpt=null and robustness.checkpoints=null: stage=robustness needs models, e.g. "
                        "ckpt=<model.pt>, or several as 'robustness.checkpoints={plain: a/model.pt, "
                        "bridgeout: b/model.pt}'")
    fractions = _get(cfg, "robustness.fractions")
    if not isinstance(fractions, list) or not fractions or not all(_is_number(f) and 0 <= f < 1 for f in fractions):
        _fail("robustness.fractions", fractions, "must be a non-empty list of fractions in [0, 1)",
              "robustness.fractions=[0.0,0.25,0.5]")
    _integer(cfg, "robustness.calib_batch", 1, "robustness.calib_batch=256", optional=True)
    if surgery == "remove":
        _integer(cfg, "dataset.calib_size", 1, "dataset.calib_size=1000",
                 note="surgery=remove fits its compensation on calibration images")
    methods = _get(cfg, "robustness.methods")
    if not isinstance(methods, list) or not methods:
        _fail("robustness.methods", methods, "must be a non-empty list", "robustness.methods=[l2-removal,backward]")
    from hbgs.robustness import parse_method  # last: it imports Lightning, as the stage does

    for method in methods:
        try:
            parse_method(method)
        except HbgsError as err:
            raise HbgsError(f"robustness.methods={_show(methods)}: {err}, e.g. "
                            "robustness.methods=[l2-removal,backward]") from None


# -- groups ----------------------------------------------------------------------------------

def _check_logger(cfg: DictConfig) -> None:
    if _choice(cfg, "logger.name", LOGGERS, example="logger=csv") == "wandb":
        _choice(cfg, "logger.mode", WANDB_MODES, optional=True)


def _check_dataset(cfg: DictConfig) -> None:
    name = _choice(cfg, "dataset.name", DATASETS, example="dataset=cifar10")
    root = _get(cfg, "dataset.root")
    if root is None and name != "cifar10":  # only CIFAR-10 has an offline copy to fall back on
        _fail("dataset.root", root, f"leaves dataset={name} without data: give its folder",
              f"dataset.root=/path/to/{name}")
    if root is not None and (not isinstance(root, str) or not root):
        _fail("dataset.root", root, "must be a folder", f"dataset.root=/path/to/{name}")
    _integer(cfg, "dataset.num_classes", 2, "dataset.num_classes=10")
    _flag(cfg, "dataset.download")
    _integer(cfg, "dataset.batch_size", 1, "dataset.batch_size=128")
    _integer(cfg, "dataset.eval_batch_size", 1, "dataset.eval_batch_size=512")
    _integer(cfg, "dataset.num_workers", 0, "dataset.num_workers=0")
    _integer(cfg, "dataset.calib_size", 0, "dataset.calib_size=1000")
    _integer(cfg, "dataset.seed", 0, "dataset.seed=0", high=MAX_SEED)
    _integer(cfg, "dataset.limit_train", 1, "dataset.limit_train=10000", null=True)
    _integer(cfg, "dataset.limit_test", 1, "dataset.limit_test=1000", null=True)
    _integer(cfg, "dataset.image_size", 1, "dataset.image_size=224", null=True)
    statistics = {}
    for key, example in (("mean", "[0.49,0.48,0.45]"), ("std", "[0.25,0.24,0.26]")):
        value = statistics[key] = _get(cfg, f"dataset.{key}", optional=True)
        if _given(value) and not (
                isinstance(value, list) and len(value) == 3
                and all(_is_number(v) and (key == "mean" or v > 0) for v in value)):
            _fail(f"dataset.{key}", value, "must be null or 3 numbers (one per RGB channel"
                  + (", each positive)" if key == "std" else ")"), f"dataset.{key}={example}")
    if _given(statistics["mean"]) != _given(statistics["std"]):  # the loader ignores a lone one
        raise HbgsError(f"dataset.mean={_show(statistics['mean'])} and dataset.std={_show(statistics['std'])}: "
                        "give both or neither (null: the known CIFAR statistics, else computed from the "
                        "training images), e.g. dataset.mean=null dataset.std=null")
    cache_dir = _get(cfg, "dataset.cache_dir", optional=True)
    if _given(cache_dir) and (not isinstance(cache_dir, str) or not cache_dir):
        _fail("dataset.cache_dir", cache_dir, "must be null or a folder", "dataset.cache_dir=~/.cache/hbgs")


def _check_criterion(cfg: DictConfig) -> str:
    """The prune criterion's options; its name."""
    name = _choice(cfg, "criterion.name", CRITERIA, example="criterion=hbgts")
    if name != "uniform_fraction":  # the only criterion without a target
        _check_target(cfg)
    layerwise = name in LOOP_CRITERIA
    if layerwise:
        step = _get(cfg, "criterion.step")
        try:
            hierarchical.check_step(step)
        except HbgsError:
            _fail("criterion.step", step, "must be a channel count (an integer ≥ 1) or a fraction of the current "
                  "width in (0, 1)", "criterion.step=5 or criterion.step=0.25")
    # Keys the stage reads directly must be there; the others have defaults in prune_stage.
    _integer(cfg, "criterion.min_channels", 1, "criterion.min_channels=1", optional=not layerwise)
    _integer(cfg, "criterion.calib_batch", 1, "criterion.calib_batch=256",
             optional=name not in (*LOOP_CRITERIA, "sensitivity"))
    _choice(cfg, "criterion.score", hierarchical.SCORES, optional=True)
    _choice(cfg, "criterion.signal", hierarchical.SIGNALS, optional=True)
    _number(cfg, "criterion.tolerance", "criterion.tolerance=0.5", low=0,
            optional=name in (*LOOP_CRITERIA, "uniform_fraction"), note="% points of the target")
    if name == "uniform_fraction":
        _number(cfg, "criterion.fraction", "criterion.fraction=0.5", low=0, high=1, open_low=True)
    if name == "sensitivity":
        ratios = _get(cfg, "criterion.ratios")
        if not isinstance(ratios, list) or not ratios or not all(_is_number(r) for r in ratios) \
                or ratios != sorted(set(ratios)) or not 0 < ratios[0] <= ratios[-1] <= 1:
            _fail("criterion.ratios", ratios, "must be distinct ascending ratios in (0, 1]",
                  "criterion.ratios=[0.1,0.3,0.5,0.7,0.9]")
    if name in PEER_CRITERIA:
        _choice(cfg, "criterion.importance", IMPORTANCES)
        global_pruning = _get(cfg, "criterion.global_pruning", optional=True)
        if _given(global_pruning) and not isinstance(global_pruning, bool):
            _fail("criterion.global_pruning", global_pruning, "must be true, false or null (the importance's "
                  "default)", "criterion.global_pruning=true")
    return name


def _check_target(cfg: DictConfig) -> None:
    params = _get(cfg, "criterion.target.params", optional=True)
    flops = _get(cfg, "criterion.target.flops", optional=True)
    params, flops = (None if v is _ABSENT else v for v in (params, flops))
    if (params is None) == (flops is None):
        raise HbgsError(f"criterion.target.params={_show(params)} and criterion.target.flops={_show(flops)}: give "
                        "exactly one target (a % reduction against the original network) and set the other to "
                        "null, e.g. criterion.target.params=null criterion.target.flops=50")
    key, value = ("criterion.target.params", params) if params is not None else ("criterion.target.flops", flops)
    if not (_is_number(value) and 0 < value < 100):
        _fail(key, value, "must be a % reduction greater than 0 and below 100 (100 or more is out of reach: "
              "nothing would be left)", f"{key}=50")


def _check_finetune(cfg: DictConfig) -> None:
    _integer(cfg, "finetune.every", 0, "finetune.every=1", note="rounds between short fine-tunes; 0: never")
    _integer(cfg, "finetune.steps", 0, "finetune.steps=20")
    _integer(cfg, "finetune.final_epochs", 0, "finetune.final_epochs=1")
    _integer(cfg, "finetune.bn_recalibrate", 0, "finetune.bn_recalibrate=256", optional=True,
             note="calibration images; 0: off")
    _number(cfg, "finetune.lr", "finetune.lr=0.001", low=0, open_low=True)
    _number(cfg, "finetune.final_lr", "finetune.final_lr=0.01", low=0, open_low=True)
    _number(cfg, "finetune.momentum", "finetune.momentum=0.9", low=0, high=1, open_high=True)
    _number(cfg, "finetune.weight_decay", "finetune.weight_decay=1e-4", low=0)
    _number(cfg, "finetune.kd_temperature", "finetune.kd_temperature=2.0", low=0, open_low=True)
    _number(cfg, "finetune.kd_weight", "finetune.kd_weight=1.0", low=0)


def _check_trainer(cfg: DictConfig, fit: bool) -> None:
    """The device settings (where every stage computes: hbgs.devices.run_device); with ``fit``
    (stage=train) the rest of Lightning's Trainer options hbgs ships."""
    accelerator = _choice(cfg, "trainer.accelerator", ACCELERATORS, example="trainer=cpu")
    devices = _get(cfg, "trainer.devices")
    if accelerator == "cpu":
        if not (devices == "auto" or (_is_int(devices) and devices >= 1)):
            _fail("trainer.devices", devices, "must be a process count ≥ 1 (or auto) on trainer.accelerator=cpu",
                  "trainer.devices=1")
    elif not (devices == "auto" or (_is_int(devices) and (devices >= 1 or devices == -1)) or (
            isinstance(devices, list) and devices and all(_is_int(d) and d >= 0 for d in devices))):
        _fail("trainer.devices", devices, "must be a device count ≥ 1, -1 (all), auto or a list of device "
              "indices", "trainer.devices=1")
    _choice(cfg, "trainer.precision", PRECISIONS, example="trainer.precision=32-true")
    if not fit:
        return
    max_epochs = _get(cfg, "trainer.max_epochs")
    max_steps = _get(cfg, "trainer.max_steps")
    if not (_is_int(max_steps) and (max_steps >= 1 or max_steps == -1)):
        _fail("trainer.max_steps", max_steps, "must be an integer ≥ 1, or -1 (epochs decide)", "trainer.max_steps=-1")
    unbounded_epochs = max_epochs is None or max_epochs == -1
    if not ((_is_int(max_epochs) and max_epochs >= 1) or (unbounded_epochs and max_steps >= 1)):
        _fail("trainer.max_epochs", max_epochs, "must be an integer ≥ 1 for stage=train (or -1 with trainer.max_steps "
              "≥ 1)", "trainer.max_epochs=30")
    _integer(cfg, "trainer.log_every_n_steps", 1, "trainer.log_every_n_steps=20", optional=True)
    _flag(cfg, "trainer.enable_progress_bar", optional=True)
    fast_dev_run = _get(cfg, "trainer.fast_dev_run", optional=True)
    if fast_dev_run is not _ABSENT and not (isinstance(fast_dev_run, bool) or (_is_int(fast_dev_run)
                                                                                and fast_dev_run >= 0)):
        _fail("trainer.fast_dev_run", fast_dev_run, "must be true, false or a batch count ≥ 0",
              "trainer.fast_dev_run=false")
    # Training and testing need batches (an empty test leaves no accuracy); validation may skip.
    for which, least in (("train", 1), ("val", 0), ("test", 1)):
        key = f"trainer.limit_{which}_batches"
        limit = _get(cfg, key, optional=True)
        if not _given(limit):
            continue
        if not ((_is_int(limit) and limit >= least) or (
                isinstance(limit, float) and (0 <= limit <= 1 if least == 0 else 0 < limit <= 1))):
            _fail(key, limit, f"must be null, a batch count ≥ {least} or a fraction in {'[' if least == 0 else '('}0, 1] "
                  "of the batches", f"{key}=1.0")
    deterministic = _get(cfg, "trainer.deterministic", optional=True)
    if deterministic is not _ABSENT and not (isinstance(deterministic, bool) or deterministic == "warn"):
        _fail("trainer.deterministic", deterministic, "must be true, false or warn", "trainer.deterministic=false")
    _flag(cfg, "trainer.sync_batchnorm", optional=True)


def _check_one_device(cfg: DictConfig) -> None:
    """stage=prune and robustness run in one process on one device: under DDP every rank would
    repeat the whole pruning loop (and write the same files)."""
    fix = "trainer=gpu trainer.devices=1"
    strategy = _get(cfg, "trainer.strategy", optional=True)
    if _given(strategy) and strategy not in ("auto", "single_device"):
        _fail("trainer.strategy", strategy, f"would run stage={cfg.stage} in every process, each repeating the "
              "pruning; it runs in one process on one device", fix)
    devices = _get(cfg, "trainer.devices")
    if not (devices == 1 or (isinstance(devices, list) and len(devices) == 1)
            or (devices == "auto" and cfg.trainer.accelerator == "cpu")):
        _fail("trainer.devices", devices, f"asks for several devices; stage={cfg.stage} runs in one process on "
              "one device", fix)


def _check_regularizer(cfg: DictConfig) -> None:
    if _choice(cfg, "regularizer.name", REGULARIZERS, example="regularizer=none") != "bridgeout":
        return
    _number(cfg, "regularizer.p", "regularizer.p=0.3", low=0, high=1, open_high=True, optional=True,
            note="the bridgeout p, a drop probability")
    _number(cfg, "regularizer.q", "regularizer.q=1.5", low=0, open_low=True, optional=True,
            note="the bridgeout q, the exponent of its L_q penalty")
    _number(cfg, "regularizer.target_fraction", "regularizer.target_fraction=0.75", low=0, high=1, optional=True,
            note="the fraction of each filter's kernel slices that get noise")


def _check_latency(cfg: DictConfig, export: bool = False) -> None:
    sizes = _get(cfg, "latency.batch_sizes")
    if not isinstance(sizes, list) or not sizes or not all(_is_int(b) and b >= 1 for b in sizes):
        _fail("latency.batch_sizes", sizes, "must be a non-empty list of batch sizes ≥ 1", "latency.batch_sizes=[1,64]")
    _integer(cfg, "latency.threads", 1, "latency.threads=1", null=True)
    _integer(cfg, "latency.repeats", 1, "latency.repeats=20")
    if export:
        _integer(cfg, "latency.export_repeats", 1, "latency.export_repeats=7", optional=True)


def _require_ckpt(cfg: DictConfig) -> None:
    if cfg.ckpt is None:
        raise HbgsError(f"ckpt=null: stage={cfg.stage} needs a trained model: pass ckpt=<path to model.pt> "
                        "(stage=train writes one), e.g. ckpt=zoo")


def _check_model_target(cfg: DictConfig) -> None:
    target = _get(cfg, "model._target_")
    from hydra._internal.utils import _locate  # what instantiate uses; hydra.utils.get_object also logs

    try:
        found = isinstance(target, str) and callable(_locate(target))
    except (ImportError, ValueError, TypeError):
        found = False
    if not found:
        _fail("model._target_", target, "is not an importable model builder",
              "model=resnet20 or model._target_=hbgs.models.resnet20")


def _check_accelerator_present(cfg: DictConfig) -> None:
    import torch

    accelerator, devices = cfg.trainer.accelerator, _get(cfg, "trainer.devices")
    if accelerator in ("gpu", "cuda"):
        have = torch.cuda.device_count()
        if have == 0:
            _fail("trainer.accelerator", accelerator, "needs a CUDA GPU, which this machine does not have",
                  "trainer=cpu")
        wanted = len(devices) if isinstance(devices, list) else devices if _is_int(devices) and devices > 0 else 1
        if wanted > have or (isinstance(devices, list) and max(devices) >= have):
            _fail("trainer.devices", devices, f"asks for more GPUs than the {have} this machine has",
                  f"trainer.devices={have}")
    elif accelerator == "mps" and not torch.backends.mps.is_available():
        _fail("trainer.accelerator", accelerator, "needs Apple's MPS, which this machine does not have",
              "trainer=cpu")


def _require_file(key: str, path) -> None:
    if path is not None and path != "zoo" and not Path(path).is_file():  # zoo: hbgs.zoo.resolve_ckpt's
        _fail(key, path, "does not exist", f"{key}=<run dir>/model.pt (stage=train writes one) or {key}=zoo"
              if key == "ckpt" else f"{key}=<run dir>/model.pt (stage=train writes one)")


# -- reading and checking one option ---------------------------------------------------------

def _check_complete(cfg: DictConfig) -> None:
    """Every mandatory value (???) given and every interpolation resolvable. Hydra's own node,
    present when composed with its config, is Hydra's business."""
    plain = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    missing = sorted(_missing(plain))
    if missing:
        key = missing[0]
        _fail(key, "???", "has no value: give one", f"{key}={EXAMPLES_OF_MANDATORY.get(key, '<value>')}")
    for key in plain:
        try:
            node = cfg[key]  # resolves a top-level interpolation
            if OmegaConf.is_config(node):
                OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as err:
            where, raw = getattr(err, "full_key", None) or key, plain
            for part in where.split("."):  # the value as written, before resolution
                raw = raw.get(part) if isinstance(raw, dict) else None
            raise HbgsError(f"{where}={_show(raw)} does not resolve ({str(err).splitlines()[0]}), e.g. "
                            f"{where}=<value>") from None


def _missing(data, prefix: str = ""):
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if value == "???":
            yield f"{prefix}{key}"
        else:
            yield from _missing(value, f"{prefix}{key}.")


def _get(cfg: DictConfig, key: str, optional: bool = False):
    """The option's value as plain data; ``_ABSENT`` for an optional key the config lacks."""
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if value is _ABSENT:
        if optional:
            return _ABSENT
        raise HbgsError(f"{key} is not set: the run reads it; give it, e.g. +{key}=<value>")
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _integer(cfg, key, low, example, *, high=None, null=False, optional=False, note=None):
    value = _get(cfg, key, optional)
    if value is _ABSENT or (null and value is None):
        return value
    if not (_is_int(value) and value >= low and (high is None or value <= high)):
        bound = f"an integer ≥ {low}" if high is None else f"an integer in [{low}, {high}]"
        _fail(key, value, f"must be {'null or ' if null else ''}{bound}", example, note)
    return value


def _number(cfg, key, example, *, low=None, high=None, open_low=False, open_high=False, optional=False, note=None):
    value = _get(cfg, key, optional)
    if value is _ABSENT:
        return value
    if not (_is_number(value) and (low is None or (value > low if open_low else value >= low))
            and (high is None or (value < high if open_high else value <= high))):
        if high is None:
            bound = "a positive number" if open_low and low == 0 else f"a number {'>' if open_low else '≥'} {low:g}"
        else:
            bound = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        _fail(key, value, f"must be {bound}", example, note)
    return value


def _choice(cfg, key, valid, *, example=None, optional=False):
    value = _get(cfg, key, optional)
    if value is not _ABSENT and (isinstance(value, bool) or value not in valid):
        shown = ", ".join(dict.fromkeys(map(str, valid)))  # 32 and "32" read the same
        _fail(key, value, f"must be one of {shown}", example or f"{key}={valid[0]}")
    return value


def _flag(cfg, key, *, optional=False):
    value = _get(cfg, key, optional)
    if value is not _ABSENT and not isinstance(value, bool):
        _fail(key, value, "must be true or false", f"{key}=false")
    return value


def _given(value) -> bool:
    """Whether an optional option is there and not null."""
    return value is not None and value is not _ABSENT


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_show, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "''"


def _fail(key: str, value, requirement: str, example: str, note: str | None = None) -> NoReturn:
    raise HbgsError(f"{key}={_show(value)} {requirement}{f' ({note})' if note else ''}, e.g. {example}")
