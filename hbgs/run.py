"""The Hydra entry point: `python -m hbgs.run [group=option ...]`. See `--help`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hbgs.errors import HbgsError

log = logging.getLogger("hbgs")


def flat_scalars(data: dict, prefix: str = "", skip=("widths", "sensitivity", "model", "batchnorms_folded",
                                                     "batchnorms_kept")):
    """(dotted key, value) for the numbers and strings of a nested summary, for the console."""
    for key, value in data.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            yield from flat_scalars(value, f"{prefix}{key}.", skip)
        elif isinstance(value, (int, float, str)):
            yield f"{prefix}{key}", value


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    from hbgs.validation import validate

    try:  # every option, before the stage's modules (Lightning: seconds) are imported or anything is read
        validate(cfg)
    except HbgsError as e:
        log.error("%s", e)
        sys.exit(2)
    from hbgs.loggers import finish_wandb
    from hbgs.atomic import write_atomically
    from hbgs.run_state import RunStopped, resumed_run_dir
    from hbgs.stages import STAGES, write_json
    from hbgs.zoo import resolve_ckpt

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.threads is not None:  # e.g. threads=1 for parallel jobs sharing a machine's cores
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.stage != "train":  # training starts from scratch (or resume=); the others read ckpt
            choices = hydra_cfg.runtime.choices
            cfg.ckpt = resolve_ckpt(cfg.ckpt, choices.get("model"), choices.get("dataset"))
        if cfg.stage == "prune" and cfg.get("resume") is not None:  # a prune run continues in its own directory
            run_dir = resumed_run_dir(cfg)
        write_atomically(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # may replace a resumed run's
        summary = STAGES[cfg.stage](cfg, run_dir)
    except RunStopped as e:  # a prune run stopped at a round boundary (a signal, stop_after_rounds): resumable
        log.warning("%s", e)
        sys.exit(e.exit_code)
    except HbgsError as e:
        log.error("%s", e)
        sys.exit(2)
    finally:
        finish_wandb()
    if summary is None:  # a DDP rank other than 0: rank 0 writes the results
        return None
    summary["run_dir"] = str(run_dir)
    write_json(run_dir / "summary.json", summary)
    for key, value in flat_scalars(summary):
        log.info("%-48s %s", key, f"{value:.4f}" if isinstance(value, float) else value)
    log.info("summary written to %s", run_dir / "summary.json")
    return summary


if __name__ == "__main__":
    main()
