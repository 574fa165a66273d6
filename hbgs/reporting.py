"""What a prune run leaves for people: history.csv, PNG plots, and the same numbers in the
experiment loggers (W&B offline by default, CSV)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from hbgs.atomic import atomic_file  # noqa: E402


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts to CSV (columns: union of keys, first-seen order), written atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_file(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_accuracy_vs_flops(path: Path, history: list[dict], dense_acc: float | None, title: str) -> None:
    """Calibration accuracy after each round against the FLOPs reduction reached."""
    points = [(r["flops_reduction"], 100 * r["calib_acc"]) for r in history if r.get("calib_acc") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, label="pruned (calibration split)")
    if dense_acc is not None:
        ax.axhline(100 * dense_acc, color="gray", linestyle="--", label="dense (calibration split)")
    ax.set_xlabel("FLOPs (MACs) reduction vs original, %")
    ax.set_ylabel("accuracy, %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_widths(path: Path, widths: dict[str, dict], title: str) -> None:
    """Final output and input widths of every prunable layer against the original."""
    names = list(widths)
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.22 * len(names) + 2), 6), sharex=True)
    for ax, side in zip(axes, ("out", "in")):
        x = range(len(names))
        ax.bar(x, [widths[n][f"{side}_original"] for n in names], color="lightgray", label="original")
        ax.bar(x, [widths[n][f"{side}_current"] for n in names], color="tab:blue", label="pruned")
        ax.set_ylabel(f"{side}put channels")
        ax.legend(loc="upper left")
    axes[1].set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axes[0].set_title(title)
    _save(fig, path)


def plot_robustness(path: Path, rows: list[dict], title: str) -> None:
    """Accuracy against the fraction of filters removed: a colour per checkpoint, a line style
    per method."""
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, checkpoint in enumerate(checkpoints):
        for j, method in enumerate(methods):
            points = sorted((100 * r["fraction"], 100 * r["test_acc"]) for r in rows
                            if r["checkpoint"] == checkpoint and r["method"] == method)
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=f"C{i}", linestyle=styles[j % len(styles)], marker="o", markersize=3,
                    label=f"{checkpoint}, {method}")
    ax.set_xlabel("filters removed from every prunable conv, %")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


class LoggerRoundCallback:
    """Sends each round's numbers to Lightning's experiment loggers
    (step = round), and at the end a W&B table of the layer choices and the two charts."""

    def __init__(self, loggers):
        self.loggers = [lg for lg in (loggers or []) if lg]

    def on_round_end(self, record: dict) -> None:
        metrics = {f"prune/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=record["round"])

    def on_prune_end(self, history: list[dict], plots: dict[str, Path]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                columns = ["round", "layer", "side", "width_before", "width_after", "score",
                           "params_reduction", "flops_reduction", "calib_acc"]
                logger.log_table("prune/choices", columns=columns,
                                 data=[[r.get(c) for c in columns] for r in history])
                for key, path in plots.items():
                    logger.log_image(f"prune/{key}", [str(path)])
