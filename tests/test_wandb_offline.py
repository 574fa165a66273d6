"""The default logger (W&B, offline: conf/logger/wandb.yaml) on the README's main path: stage=prune
and stage=robustness through the command line, then the offline run read back: the per-round
(per-point) metrics, the table and the images, as `wandb sync` would upload them.

wandb 0.31 has no Python reader for its .wandb transaction log (its writer and reader live in
the Go core), so ``wandb_records`` reads the file's LevelDB-log framing here and decodes each
record with wandb's own protobuf schema (``wandb.proto.wandb_internal_pb2.Record``)."""

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2

from conftest import REPO, hbgs_run

ZOO = REPO / "zoo" / "resnet20-cifar10.pt"
SHORT = ["threads=1", "trainer.enable_progress_bar=false", "dataset.calib_size=100", "latency.repeats=2"]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, everything it writes outside the run directory kept in tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable, folder in (("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "wandb_cache"),
                             ("WANDB_CONFIG_DIR", "wandb_config"), ("WANDB_DATA_DIR", "wandb_data")):
        monkeypatch.setenv(variable, str(tmp_path / folder))


def wandb_records(path: Path):
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    blocks of 32 KiB, each record framed by checksum (4 bytes), length (2, little-endian) and
    type (1: full, 2/3/4: first/middle/last fragment); a block's tail shorter than a frame
    header is padding."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending = 32 * 1024, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        assert kind in (1, 2, 3, 4), f"record type {kind} at byte {pos}"
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


class OfflineRun:
    """The one offline W&B run inside a run directory: its history rows (key → decoded JSON value),
    the files it hands to `wandb sync`, its name and exit code."""

    def __init__(self, run_dir: Path):
        runs = sorted((run_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        self.dir = runs[0]
        (log,) = self.dir.glob("run-*.wandb")
        self.history, self.files, self.name, self.exit_code = [], set(), None, None
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                self.history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                     for item in record.history.item})
            elif kind == "files":
                self.files |= {f.path for f in record.files.files}
            elif kind == "run":
                self.name = record.run.display_name
            elif kind == "exit":
                self.exit_code = record.exit.exit_code

    def rows_with(self, key: str) -> list[dict]:
        return [row for row in self.history if key in row]

    def media(self, key: str, kind: str) -> Path:
        """The file behind a logged table or image, checked to be handed to `wandb sync`."""
        rows = self.rows_with(f"{key}/_type")
        assert len(rows) == 1, f"{key} was logged {len(rows)} times, not once"
        row = rows[0]
        assert row[f"{key}/_type"] == kind
        (name,) = row[f"{key}/filenames"] if kind == "images/separated" else [row[f"{key}/path"]]
        assert name in self.files
        return self.dir / "files" / name


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def number(text: str):
    return float(text) if any(c in text for c in ".eE") or text in ("inf", "nan") else int(text)


def test_prune_with_the_default_logger_fills_the_offline_run(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    out = hbgs_run("stage=prune", f"ckpt={ZOO}", f"hydra.run.dir={run_dir}", *SHORT, "dataset.limit_train=128",
                   "dataset.limit_test=100", "criterion=hbgts", "criterion.target.params=null",
                   "criterion.target.flops=5", "criterion.step=0.5", "criterion.calib_batch=64",
                   "finetune.steps=1", "finetune.final_epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert OmegaConf.load(run_dir / "config.yaml").logger.name == "wandb"  # the default, not chosen
    run = OfflineRun(run_dir)
    assert (run.name, run.exit_code) == ("prune-hbgts-backward", 0)
    history = read_csv(run_dir / "history.csv")
    assert len(history) >= 2

    # Per-round metrics: one W&B row per round, at step = round, with history.csv's numbers.
    rounds = run.rows_with("prune/round")
    assert [r["prune/round"] for r in rounds] == [r["trainer/global_step"] for r in rounds] == \
        list(range(1, len(history) + 1))
    for logged, row in zip(rounds, history):
        for key in ("width_before", "width_after", "params", "flops", "params_reduction", "flops_reduction",
                    "score", "calib_acc"):
            assert logged[f"prune/{key}"] == pytest.approx(number(row[key]), rel=1e-12), key
    assert run.rows_with("train/loss_epoch")  # the final fine-tune logged to the same run

    # The table of layer choices: the history's columns, row for row.
    table = json.loads(run.media("prune/choices", "table-file").read_text())
    columns = ["round", "layer", "side", "width_before", "width_after", "score", "params_reduction",
               "flops_reduction", "calib_acc"]
    assert table["columns"] == columns
    assert len(table["data"]) == len(history)
    for logged, row in zip(table["data"], history):
        assert logged[1:3] == [row["layer"], row["side"]]
        numbers = [number(row[c]) for c in columns if c not in ("layer", "side")]
        assert [logged[0], *logged[3:]] == pytest.approx(numbers, rel=1e-12)

    # Both charts, the very PNGs the run wrote beside history.csv.
    for key in ("accuracy_vs_flops", "widths"):
        image = run.media(f"prune/{key}", "images/separated")
        assert image.read_bytes() == (run_dir / f"{key}.png").read_bytes()
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_robustness_with_the_default_logger_fills_the_offline_run(tmp_path, wandb_offline):
    out = hbgs_run("stage=robustness", f"ckpt={ZOO}", f"hydra.run.dir={tmp_path}", *SHORT,
                   "robustness.fractions=[0,0.5]", "dataset.limit_test=200")
    assert out.returncode == 0, out.stderr[-3000:]
    run = OfflineRun(tmp_path)
    assert (run.name, run.exit_code) == ("robustness", 0)
    points = read_csv(tmp_path / "robustness.csv")
    assert [(p["method"], float(p["fraction"])) for p in points] == [
        ("l2-removal", 0.0), ("l2-removal", 0.5), ("backward", 0.0), ("backward", 0.5)]

    # One W&B row per point: its accuracy under checkpoint/method, at step = % of filters removed.
    logged = [(key, row[key], row["trainer/global_step"]) for row in run.history for key in row
              if key.startswith("robustness/") and key.endswith("/test_acc")]
    assert logged == [(f"robustness/{p['checkpoint']}/{p['method']}/test_acc", pytest.approx(float(p["test_acc"])),
                       round(100 * float(p["fraction"]))) for p in points]

    table = json.loads(run.media("robustness/points", "table-file").read_text())
    assert table["columns"] == list(points[0])
    assert table["data"] == [[number(v) if k not in ("checkpoint", "method") else v for k, v in p.items()]
                             for p in points]
    image = run.media("robustness/chart", "images/separated")
    assert image.read_bytes() == (tmp_path / "robustness.png").read_bytes()
