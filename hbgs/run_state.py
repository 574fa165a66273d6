"""What a prune run keeps so that it can be continued, and what stops it at a round boundary.

After every round (and after one-shot pruning) ``<run dir>/resume/`` holds

* ``round-NNNN.pt``: the model after that round (``hbgs.checkpoint.save_model``, pickle-free);
* ``state.json``: the round index, whether the pruning loop is done, the history rows, the
  pruner's own state, the time spent so far, the RNG states of torch, numpy and Python, the
  resolved config and library versions of the run, and the SHA-256 of the checkpoint it started
  from. Plain JSON: readable, and loading it runs no code.

The model is written before the state that names it, each atomically (a temp file, then
``os.replace``), so a kill at any moment leaves a ``state.json`` whose model file is complete.
Caches (the suffix cache, the proposals) are not kept: they are rebuilt, with the same values.

``python -m hbgs.run <same overrides> resume=<run dir>`` (``hbgs.prune_stage``) reloads the
model, restores the RNG states where the next round starts, and continues in that directory, so
the run ends with the same layer choices and weights as one never stopped.

``StopRequests``: while armed, SIGINT and SIGTERM only set a flag that the run checks at the end
of each round; the run saves its state, logs how to resume and exits with 128 + the signal
number (``stop_after_rounds=N`` stops the same way after round N, exit status 3).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hbgs.atomic import copy_atomically, write_atomically
from hbgs.errors import HbgsError

log = logging.getLogger("hbgs")

FORMAT = "hbgs-prune-state/1"
STATE_DIR = "resume"
STOPPED_BY_REQUEST = 3  # exit status of a run stopped by stop_after_rounds (signals: 128 + signum)

# Options that do not change what a prune run computes: a resumed run may differ in these. Every
# other option (model, data, criterion, selector, fine-tune, seed, surgery, the trainer's
# device and precision, ...) must be as the run started, or the result would not be the run's.
# ckpt is compared by the file's content instead (``checkpoint_difference``).
IGNORED_OPTIONS = ("resume", "stop_after_rounds", "logger", "latency", "threads", "optim",
                   "robustness", "dataset.num_workers", "dataset.cache_dir", "ckpt")
TRAINER_OPTIONS_THAT_MATTER = ("trainer.accelerator", "trainer.devices", "trainer.precision")


class RunStopped(HbgsError):
    """A prune run stopped at a round boundary on request; its run directory can be resumed."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# -- provenance ------------------------------------------------------------------------------

def library_versions() -> dict:
    """Versions of what decides a run's numbers: Python and the libraries, hbgs and its commit."""
    import lightning
    import torchvision

    import hbgs

    try:
        import torch_pruning
        tp_version = getattr(torch_pruning, "__version__", "unknown")
    except ImportError:
        tp_version = None
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "lightning": str(lightning.__version__),
            "torch_pruning": tp_version, "numpy": np.__version__, "hbgs": hbgs.__version__,
            "hbgs_commit": _git_commit()}


@functools.cache
def _git_commit() -> str | None:
    """The checkout's commit (``-dirty`` with local changes), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                             cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


# -- RNG states --------------------------------------------------------------------------------

def rng_states() -> dict:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, as JSON data."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    states = {"torch": _b64(torch.get_rng_state()),
              "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
              "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states: dict) -> None:
    """Restore what ``rng_states`` returned."""
    torch.set_rng_state(_unb64(states["torch"]))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in states["cuda"]])


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


# -- the state on disk -------------------------------------------------------------------------

class RunState:
    """The resumable state of the prune run writing into ``run_dir`` (see the module docstring).

    ``config``: the run's resolved config (plain dict); ``resumed``: the state it continues."""

    def __init__(self, run_dir: Path, config: dict, resumed: "Resumed | None" = None):
        self.dir = Path(run_dir) / STATE_DIR
        self.config = config
        self.data: dict | None = None  # what the last save wrote (or the resumed run's state)
        self.resumes: list[int] = []  # the rounds after which earlier invocations of the run stopped
        self.ckpt_sha256 = ((resumed.data.get("ckpt_sha256") if resumed is not None else None)
                            or checkpoint_digest(config.get("ckpt")))
        if resumed is not None:
            source = resumed.run_dir / STATE_DIR
            if source.resolve() != self.dir.resolve():  # continued in another directory: the state moves along
                shutil.copytree(source, self.dir, dirs_exist_ok=True)
            self.data, self.resumes = resumed.data, resumed.resumes()

    @property
    def round(self) -> int | None:
        """The last round saved (0: one-shot pruning), None before any."""
        return None if self.data is None else self.data["round"]

    def save(self, model: nn.Module, *, model_cfg: dict | None, round: int, loop_done: bool,
             history: list[dict], pruner: dict | None, seconds: dict, details: dict | None = None) -> None:
        """Write the model after ``round`` and the state naming it. Call it when everything of the
        round is done (its fine-tune and report), so that the RNG states are where the next
        round starts."""
        from hbgs.checkpoint import save_model

        self.dir.mkdir(parents=True, exist_ok=True)
        model_file = f"round-{round:04d}.pt"
        save_model(model, self.dir / model_file, model_cfg=model_cfg, meta={"round": round, "resumable": True})
        self.data = {"format": FORMAT, "round": round, "loop_done": loop_done, "model": model_file,
                     "history": history, "pruner": pruner, "seconds": seconds, "details": details,
                     "resumes": self.resumes, "rng": rng_states(), "config": self.config,
                     "ckpt_sha256": self.ckpt_sha256, "versions": library_versions()}
        self._write()
        for old in self.dir.glob("round-*.pt"):  # only after the new state names the new model
            if old.name != model_file:
                old.unlink(missing_ok=True)

    def mark_loop_done(self) -> None:
        """Record that the pruning loop ended (the model is the last round's, already saved)."""
        if self.data is not None and not self.data["loop_done"]:
            self.data["loop_done"] = True
            self._write()

    def model_path(self) -> Path | None:
        return None if self.data is None else self.dir / self.data["model"]

    def keep_last_good(self, run_dir: Path) -> str:
        """After a failure: the last saved round's model as ``<run dir>/model.pt``; says what was kept."""
        if self.data is None:
            return "No round had finished, so no model was kept"
        copy_atomically(self.model_path(), Path(run_dir) / "model.pt")
        path = Path(run_dir) / "model.pt"
        if self.data["round"]:
            return f"The model after round {self.data['round']}, the last good one, is in {path} (history.csv ends with it)"
        return f"The model after pruning, before any fine-tune, is in {path}"

    def remove(self) -> None:
        """Drop the state of a finished run (summary.json and model.pt replace it)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def _write(self) -> None:
        write_atomically(self.dir / "state.json", json.dumps(self.data) + "\n")


class Resumed:
    """A prune run's saved state, read back by ``resume=<run dir>``."""

    def __init__(self, run_dir: Path, data: dict):
        self.run_dir, self.data = run_dir, data
        self.round, self.loop_done = data["round"], data["loop_done"]
        self.history, self.pruner, self.details = data["history"], data["pruner"], data["details"]
        self.seconds = data["seconds"]

    @classmethod
    def load(cls, resume: str | os.PathLike, config: dict) -> "Resumed":
        """The state in ``resume`` (a prune run's directory); HbgsError when there is none or the
        run was made with a config that differs in an option that changes the result."""
        run_dir = Path(resume)
        path = run_dir / STATE_DIR / "state.json"
        if not path.is_file():
            why = ("it finished (summary.json is there): nothing to resume"
                   if (run_dir / "summary.json").is_file() else
                   f"no {STATE_DIR}/state.json: a prune run writes it after its first round")
            raise HbgsError(f"resume={resume} holds no resumable prune run: {why}. For stage=prune give the "
                            "directory of a prune run that stopped (stage=train resumes from a .ckpt file)")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise HbgsError(f"resume={resume}: cannot read {path} ({err})") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise HbgsError(f"resume={resume}: {path} is not a prune run state of this version "
                            f"(format {FORMAT!r})")
        differences = [*checkpoint_difference(data, config), *config_differences(data["config"], config)]
        if differences:
            shown = "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
            raise HbgsError(f"resume={resume}: this command's config differs from the run's in options that "
                            f"change the result ({shown}); pass the run's own overrides (its config is in "
                            f"{run_dir / 'config.yaml'}) with resume=")
        return cls(run_dir, data)

    def load_model(self) -> nn.Module:
        from hbgs.checkpoint import load_model

        return load_model(self.run_dir / STATE_DIR / self.data["model"]).requires_grad_(True)

    def restore_rng(self) -> None:
        """The RNG states as they were when the run stopped: call it where the next round starts."""
        set_rng_states(self.data["rng"])

    def resumes(self) -> list[int]:
        """The rounds after which this run has stopped so far, this stop included."""
        return [*self.data.get("resumes", []), self.round]

    def warn_if_versions_differ(self) -> None:
        now = library_versions()
        changed = {k: (v, now.get(k)) for k, v in self.data.get("versions", {}).items()
                   if k != "hbgs_commit" and now.get(k) != v}
        if changed:
            log.warning("resuming with other library versions than the run started with (%s): the "
                        "result may differ from an uninterrupted run's",
                        ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))


def resumed_run_dir(cfg) -> Path:
    """The directory ``resume=`` names, once it is known to hold a prune run this command can
    continue (HbgsError otherwise): the resumed run writes there, not in a new directory."""
    from omegaconf import OmegaConf

    Resumed.load(cfg.resume, OmegaConf.to_container(cfg, resolve=True))
    return Path(cfg.resume)


def checkpoint_digest(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a checkpoint file's bytes (None without a file)."""
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_difference(state: dict, current: dict) -> list[str]:
    """The starting checkpoint, compared by content where the state records its digest: ckpt=zoo
    resolves to an absolute path, and a run must resume in another checkout, but not on a zoo file
    that has been replaced since it started. States without a digest compare the path."""
    before, now = state["config"].get("ckpt"), current.get("ckpt")
    recorded = state.get("ckpt_sha256")
    if recorded is None:
        return [] if before == now else [f"ckpt={before} in the run, {now} now"]
    if checkpoint_digest(now) == recorded:
        return []
    return [f"ckpt={now} is not the checkpoint the run started from ({before}, SHA-256 {recorded[:12]}...): "
            f"its file is missing or its weights differ"]


def config_differences(saved: dict, current: dict) -> list[str]:
    """``option: run value → this value`` for every option that changes the result and differs."""
    before, after = _flatten(saved), _flatten(current)
    return [f"{key}={before.get(key, '<unset>')} in the run, {after.get(key, '<unset>')} now"
            for key in sorted(before.keys() | after.keys())
            if matters(key) and before.get(key) != after.get(key)]


def matters(option: str) -> bool:
    """Whether a dotted option changes what a prune run computes."""
    if option.startswith("trainer."):
        return option in TRAINER_OPTIONS_THAT_MATTER  # the rest is for stage=train
    return not any(option == o or option.startswith(o + ".") for o in IGNORED_OPTIONS)


def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


# -- stopping at a round boundary -------------------------------------------------------------

class StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM (what SLURM sends before preemption) while ``armed``: the first
    one only records the request and the run stops at the next round boundary, its state saved; a
    second SIGINT stops at once. ``stop_after_rounds``: the same stop after that many rounds in
    all (a run to be continued later, or inspected half-way). Outside ``arm``/``disarm`` the
    signals keep their usual effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop_after_rounds: int | None = None, resume_command: str | None = None):
        if stop_after_rounds is not None and (isinstance(stop_after_rounds, bool)
                                              or not isinstance(stop_after_rounds, int) or stop_after_rounds < 1):
            raise HbgsError(f"stop_after_rounds={stop_after_rounds!r} must be a number of rounds ≥ 1 (or null), "
                            "e.g. stop_after_rounds=10")
        self.stop_after_rounds, self.resume_command = stop_after_rounds, resume_command
        self.signal: signal.Signals | None = None  # the request received, if any
        self._previous: dict = {}

    def arm(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # already armed, or not allowed (signal handlers live in the main thread)
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def disarm(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now (the state of the last round stays)
        self.signal = signal.Signals(signum)
        log.warning("%s received: the run stops, resumable, at the end of this round (a final fine-tune ends "
                    "at once); Ctrl-C again stops it now", self.signal.name)

    def check(self, round: int, target_met: bool = False) -> None:
        """At a round boundary, with its state saved: RunStopped when a stop was asked for."""
        if self.signal is not None:
            raise self.stopped(f"{self.signal.name} received", round, 128 + int(self.signal))
        if self.stop_after_rounds is not None and round >= self.stop_after_rounds and not target_met:
            raise self.stopped(f"stop_after_rounds={self.stop_after_rounds}", round, STOPPED_BY_REQUEST)

    def stopped(self, why: str, round: int | None, exit_code: int) -> RunStopped:
        """The RunStopped saying how to continue from the state saved after ``round``."""
        if round is None:
            return RunStopped(f"Stopped ({why}) before the first round ended: nothing to resume", exit_code)
        where = f"after round {round}" if round else "after pruning"
        return RunStopped(f"Stopped ({why}) {where}, resumable: continue with `{self.resume_command}`", exit_code)

    def lightning_callback(self):
        """A Lightning callback that ends a fit at the next batch once a stop was asked for."""
        import lightning as L

        requests = self

        class EndFitOnStop(L.Callback):
            def on_train_batch_end(self, trainer, *args) -> None:
                if requests.signal is not None:
                    trainer.should_stop = True

        return EndFitOnStop()


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``: this command's overrides with
    ``resume=<run dir>`` (and without ``stop_after_rounds``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # not under Hydra's main (a run driven from Python)
        overrides = ["<the same overrides>"]
    kept = [o if o.startswith("<") else shlex.quote(o) for o in overrides
            if not re.match(r"^[+~]*(resume|stop_after_rounds)=", o)]
    return " ".join(["python -m hbgs.run", *kept, shlex.quote(f"resume={run_dir}")])
