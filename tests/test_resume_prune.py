"""Long prune runs that survive: stopped at a round boundary (SIGTERM, stop_after_rounds) and
resumed, they end as a run never stopped; seeded runs repeat; a diverging fine-tune stops the run
and keeps the last good round. Short runs of the zoo ResNet-20 (4-5 rounds of HBGS on 32
calibration images, a one-step fine-tune every other round, a final one of 4 steps, one thread:
seconds each)."""

import csv
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hbgs.checkpoint import load_model, save_model
from hbgs.errors import HbgsError
from hbgs.finetune import FinetuneDiverged, finetune
from hbgs.models import resnet20
from hbgs.prune_stage import prune
from hbgs.run_state import STOPPED_BY_REQUEST, Resumed, RunState, RunStopped
from conftest import CONF_DIR, REPO, hbgs_run

SHORT = ["stage=prune", "ckpt=zoo", "logger=none", "trainer.enable_progress_bar=false", "threads=1",
         "dataset.calib_size=64", "dataset.limit_train=64", "dataset.limit_test=64", "dataset.batch_size=16",
         "latency.repeats=1", "latency.batch_sizes=[1]", "latency.export_repeats=1",
         "criterion=hbgs", "criterion.step=0.5", "criterion.calib_batch=32", "criterion.target.params=null",
         "finetune.steps=1", "finetune.every=2", "finetune.final_epochs=1"]
ADAPTERS = [*SHORT, "criterion.target.flops=8"]  # 4 rounds
REMOVE = [*SHORT, "surgery=remove", "criterion.target.flops=20"]  # 5 rounds


def run_in_process(run_dir: Path, *overrides: str) -> dict:
    """stage=prune as `python -m hbgs.run` runs it, without a new interpreter (seconds saved)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    cfg.ckpt = str(REPO / "zoo" / "resnet20-cifar10.pt")  # what ckpt=zoo resolves to
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # as hbgs.run does; one thread: fast on a shared machine, and
    try:                                # the CPU kernels' sums come out the same in every run
        return prune(cfg, run_dir)
    finally:
        torch.set_num_threads(threads)


def history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def choices(run_dir: Path) -> list[tuple]:
    return [(r["round"], r["layer"], r["side"], r["width_after"], r["calib_acc"]) for r in history(run_dir)]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_model(a).state_dict(), load_model(b).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: each run straight through, in this process."""
    runs = {}
    for name, overrides in (("adapters", ADAPTERS), ("remove", REMOVE)):
        run_dir = tmp_path_factory.mktemp(f"uninterrupted_{name}")
        runs[name] = (run_dir, run_in_process(run_dir, *overrides))
        assert 3 <= len(history(run_dir)) <= 6
        assert not (run_dir / "resume").exists()  # a finished run keeps no resumable state
    return runs


def test_sigterm_stops_at_a_round_boundary_and_resume_ends_as_an_uninterrupted_run(tmp_path, uninterrupted):
    reference, summary = uninterrupted["adapters"]
    run_dir = tmp_path / "run"
    args = [*ADAPTERS, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen([sys.executable, "-m", "hbgs.run", *args], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (run_dir / "resume" / "state.json").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no round finished in time"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # as SLURM does before preempting a job
    stdout, stderr = process.communicate(timeout=240)
    output = stdout + stderr
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output
    stopped = [line for line in output.splitlines() if "Stopped (SIGTERM received" in line]
    assert len(stopped) == 1 and f"resume={run_dir}" in stopped[0], output[-3000:]
    assert "criterion.target.flops=8" in stopped[0]  # the command to continue repeats the overrides
    state = json.loads((run_dir / "resume" / "state.json").read_text())
    assert len(history(run_dir)) >= state["round"] >= 1 and not (run_dir / "summary.json").exists()

    out = hbgs_run(*ADAPTERS, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'resumed_log'}")
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads((run_dir / "summary.json").read_text())  # the run continued in its own directory
    assert choices(run_dir) == choices(reference)
    assert_same_weights(run_dir / "model.pt", reference / "model.pt")
    assert resumed["accuracy"] == summary["accuracy"]
    assert resumed["resumed_after_rounds"] == [state["round"]]
    assert not (run_dir / "resume").exists()


def test_stop_after_rounds_and_resume_with_channels_removed(tmp_path, uninterrupted):
    reference, summary = uninterrupted["remove"]
    with pytest.raises(RunStopped, match="after round 2, resumable") as stopped:
        run_in_process(tmp_path, *REMOVE, "stop_after_rounds=2")
    assert stopped.value.exit_code == STOPPED_BY_REQUEST
    assert len(history(tmp_path)) == 2 and (tmp_path / "resume" / "round-0002.pt").is_file()
    assert not (tmp_path / "model.pt").exists()
    resumed = run_in_process(tmp_path, *REMOVE, f"resume={tmp_path}", "latency.repeats=2")  # changes nothing
    assert choices(tmp_path) == choices(reference)
    assert_same_weights(tmp_path / "model.pt", reference / "model.pt")
    assert resumed["accuracy"] == summary["accuracy"]
    assert resumed["details"]["rounds"] == summary["details"]["rounds"]


def test_seeded_runs_repeat_and_the_summary_says_how_they_were_made(tmp_path, uninterrupted):
    reference, summary = uninterrupted["adapters"]
    out = hbgs_run(*ADAPTERS, f"hydra.run.dir={tmp_path}")  # the same command, in a new process
    assert out.returncode == 0, out.stderr[-3000:]
    again = json.loads((tmp_path / "summary.json").read_text())
    assert choices(tmp_path) == choices(reference)
    assert again["accuracy"] == summary["accuracy"]
    assert_same_weights(tmp_path / "model.pt", reference / "model.pt")
    assert again["seed"] == 0
    assert {"python", "torch", "torchvision", "lightning", "torch_pruning", "hbgs"} <= again["versions"].keys()
    assert again["versions"]["torch"] == torch.__version__
    config = again["config"]
    assert config["criterion"]["target"]["flops"] == 8 and config["finetune"]["every"] == 2
    assert config["ckpt"].endswith("resnet20-cifar10.pt") and config["dataset"]["calib_size"] == 64


def test_a_diverging_finetune_stops_the_run_and_keeps_the_last_good_round(tmp_path):
    # Round 1 has no fine-tune (every=2); round 2's, at an absurd learning rate, diverges.
    with pytest.raises(FinetuneDiverged) as diverged:
        run_in_process(tmp_path, *ADAPTERS, "finetune.lr=1e6")
    message = str(diverged.value)
    assert "\n" not in message and "round 2's fine-tune diverged" in message and "finetune.lr=0.001" in message
    assert len(history(tmp_path)) == 1
    kept = load_model(tmp_path / "model.pt")
    round_1 = load_model(tmp_path / "resume" / "round-0001.pt")
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), round_1.state_dict().values()))
    assert all(t.isfinite().all() for t in kept.state_dict().values() if t.is_floating_point())
    assert not (tmp_path / "summary.json").exists()


def test_resume_refuses_a_directory_without_state_or_with_another_config(tmp_path):
    with pytest.raises(HbgsError, match="holds no resumable prune run: no resume/state.json"):
        run_in_process(tmp_path, *ADAPTERS, f"resume={tmp_path}")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(HbgsError, match="it finished"):
        run_in_process(tmp_path, *ADAPTERS, f"resume={tmp_path}")
    # A state as a run with finetune.lr=0.001 leaves it after its first round.
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = OmegaConf.to_container(compose("config", overrides=ADAPTERS), resolve=True)
    model_cfg = {"_target_": "hbgs.models.resnet20", "num_classes": 10}
    RunState(tmp_path, config).save(resnet20(), model_cfg=model_cfg, round=1, loop_done=False, history=[],
                                    pruner={"rounds": 1}, seconds={"pruning": 1.0, "short_finetunes": 0.0})
    with pytest.raises(HbgsError, match=r"finetune.lr=0.001 in the run, 0.01 now") as refused:
        run_in_process(tmp_path, *ADAPTERS, "finetune.lr=0.01", f"resume={tmp_path}")
    assert "\n" not in str(refused.value)
    config["latency"]["repeats"], config["resume"] = 5, str(tmp_path)  # options that change nothing may differ
    assert Resumed.load(tmp_path, config).round == 1


def test_resume_knows_the_starting_checkpoint_by_its_content_not_its_path(tmp_path):
    """A run's directory resumes in another checkout (ckpt=zoo resolves to an absolute path), but
    not once the file it started from holds other weights."""
    model_cfg = {"_target_": "hbgs.models.resnet20", "num_classes": 10}
    started_from = tmp_path / "checkout_a" / "resnet20-cifar10.pt"
    started_from.parent.mkdir()
    save_model(resnet20(), started_from, model_cfg=model_cfg)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = OmegaConf.to_container(compose("config", overrides=ADAPTERS), resolve=True)
    config["ckpt"] = str(started_from)
    run_dir = tmp_path / "run"
    RunState(run_dir, config).save(resnet20(), model_cfg=model_cfg, round=1, loop_done=False, history=[],
                                   pruner={"rounds": 1}, seconds={"pruning": 1.0, "short_finetunes": 0.0})
    state = json.loads((run_dir / "resume" / "state.json").read_text())
    assert state["ckpt_sha256"] == hashlib.sha256(started_from.read_bytes()).hexdigest()

    elsewhere = tmp_path / "checkout_b" / started_from.name
    elsewhere.parent.mkdir()
    shutil.copy(started_from, elsewhere)
    assert Resumed.load(run_dir, {**config, "ckpt": str(elsewhere)}).round == 1

    torch.manual_seed(1)
    save_model(resnet20(), started_from, model_cfg=model_cfg)  # the file replaced by other weights
    with pytest.raises(HbgsError, match=r"resnet20-cifar10.pt is not the checkpoint the run started from"):
        Resumed.load(run_dir, config)
    with pytest.raises(HbgsError, match=r"its file is missing"):
        Resumed.load(run_dir, {**config, "ckpt": str(tmp_path / "nowhere.pt")})


def test_a_fine_tune_stops_at_its_first_non_finite_loss():
    class Data:  # 32 random images in batches of 8: a fine-tune of at most 4 steps
        num_classes = 10

        def train_dataloader(self):
            images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(list(zip(images, torch.arange(32) % 10)), batch_size=8)

    class Cfg:
        momentum, weight_decay, kd_temperature, kd_weight = 0.9, 0.0, 2.0, 1.0

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 10))
    steps = []
    counter = type("Counter", (L.Callback,), {"on_train_batch_end": lambda self, *a: steps.append(1)})()
    with pytest.raises(FinetuneDiverged, match=r"its loss became (nan|inf) at step 2, at lr=inf"):
        finetune(model, Data(), None, Cfg, steps=4, lr=float("inf"), callbacks=[counter])
    assert len(steps) == 2  # the first step made the weights infinite; the second's loss stopped it
