"""Collect the prune runs of a multirun into one table, our figures beside the paper's.

    python -m hbgs.collect <sweep dir> [more dirs ...] [--out DIR]

reads every ``*/summary.json`` (stage=prune) under the given directories with the
``config.yaml`` beside it, and writes ``table.md`` and ``table.csv`` (into ``--out``, default
the first directory); where a method ran at one target more than once (seeds), ``table.md`` ends
with the mean table and ``table_means.csv`` holds it. A multirun writes them by itself at its end (``CollectTable``, a Hydra
callback in conf/config.yaml). The paper's figure for a row comes from the experiment config's
``paper:`` block, keyed by method name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from hbgs.reporting import write_csv

# (criterion, selector) -> the method names of conf/method (the paper's column names)
METHOD_NAMES = {("hbgs", "omp"): "hbgs", ("hbgs", "backward"): "hbgs_b", ("hbgts", "omp"): "hbgts",
                ("hbgts", "backward"): "hbgts_b", ("uniform", "backward"): "fp_backward",
                ("uniform", "omp"): "fp_omp", ("uniform", "random"): "random", ("uniform", "l1"): "l1",
                ("sensitivity", "backward"): "sensitivity",
                # the Torch-Pruning peers (hbgs.pruning.peers): their "selector" is the importance
                ("tp_l1", "tp-l1"): "tp_l1", ("tp_group_norm", "tp-group-norm"): "tp_group_norm"}
# the score and BatchNorm recalibration a method config sets; a run that changes them is named with the change
METHOD_VARIANTS = {"hbgts_b_cost": ("error_per_cost", "BN recal 0"),
                   "hbgts_b_latency": ("error_per_latency", "BN recal 0")}
COLUMNS = ["method", "criterion", "selector", "surgery", "model", "target", "params_reduction",
           "flops_reduction", "dense_acc", "acc_before_finetune", "acc_after_finetune", "paper_acc",
           "paper_dense", "speedup_b64", "finetune_steps", "prune_minutes", "finetune_minutes", "seed", "run_dir"]
# what the runs of one row of the mean table share: the same method at the same target, seeds apart
SAME_ROW = ("model", "target", "method", "criterion", "selector", "surgery")
AVERAGED = ("params_reduction", "flops_reduction", "acc_before_finetune", "acc_after_finetune", "speedup_b64")


def collect_rows(directories) -> list[dict]:
    """One row per finished prune run under ``directories`` (sorted by method, then run)."""
    rows = []
    for directory in directories:
        for summary_path in sorted(Path(directory).glob("**/summary.json")):
            summary = json.loads(summary_path.read_text())
            if summary.get("stage") != "prune":
                continue
            config_path = summary_path.with_name("config.yaml")
            config = OmegaConf.to_container(OmegaConf.load(config_path)) if config_path.is_file() else {}
            rows.append(table_row(summary, config, summary_path.parent))
    return sorted(rows, key=lambda r: (r["method"], r["target"], r["surgery"], r["seed"] or 0, r["run_dir"]))


def table_row(summary: dict, config: dict, run_dir: Path) -> dict:
    criterion, selector = summary["criterion"], summary["selector"]
    method = config.get("method") or METHOD_NAMES.get((criterion, selector), f"{criterion}+{selector}")
    variants = [(config.get("criterion") or {}).get("score", "error"),
                f"BN recal {(config.get('finetune') or {}).get('bn_recalibrate', 0)}"]
    named = [name for name, (score, _) in METHOD_VARIANTS.items() if method == "hbgts_b" and score == variants[0]]
    method = named[0] if named else method  # hbgts_b with a named variant's score is that variant
    method += "".join(f", {v}" for v in variants if v not in METHOD_VARIANTS.get(method, ("error", "BN recal 0")))
    paper = config.get("paper") or {}
    target = summary["target"]
    target_text = (f"-{target['params']:g}% params" if target.get("params") is not None else
                   f"-{target['flops']:g}% FLOPs" if target.get("flops") is not None else
                   f"{summary['details'].get('fraction', '?')} of each layer")
    accuracy, cost, seconds = summary["accuracy"], summary["cost"], summary["seconds"]
    speedup = (summary.get("latency_cpu") or {}).get("speedup_vs_dense", {}).get("exported", {})
    return {
        "method": method, "criterion": criterion, "selector": selector,
        "surgery": summary.get("surgery", "adapters"),  # runs before surgery= existed used adapters
        "model": (config.get("model") or {}).get("_target_", "?").rsplit(".", 1)[-1],
        "target": target_text,
        "params_reduction": cost["reduction_vs_original_pct"]["params"],
        "flops_reduction": cost["reduction_vs_original_pct"]["flops"],
        "dense_acc": 100 * accuracy["dense_test"],
        "acc_before_finetune": 100 * accuracy["pruned_test_before_finetune"],
        # no final fine-tune, no "after" figure: the summary then repeats the "before" one
        "acc_after_finetune": (100 * accuracy["pruned_test_after_finetune"]
                               if accuracy["final_finetune_steps"] else None),
        "paper_acc": paper.get(method), "paper_dense": paper.get("dense"),
        # the exported model's CPU latency at batch 64 against the dense model's, one process
        "speedup_b64": speedup.get("64"),
        "latency_threads": (summary.get("latency_cpu") or {}).get("threads"),
        "finetune_steps": accuracy["final_finetune_steps"],
        "prune_minutes": seconds["pruning"] / 60,
        "finetune_minutes": (seconds["short_finetunes"] + seconds["final_finetune"]) / 60,
        "seed": config.get("seed"),
        "run_dir": str(run_dir),
        "dataset": summary["dataset"], "test_images": summary["test_images"],
        "flops_convention": cost["convention"],
    }


def seed_means(rows: list[dict]) -> list[dict]:
    """One row per method and target (``SAME_ROW``): how many runs (seeds), and the mean, lowest
    and highest of each ``AVERAGED`` figure over them (None where no run has the figure)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in SAME_ROW), []).append(row)
    means = []
    for key, runs in groups.items():
        mean = dict(zip(SAME_ROW, key)) | {"runs": len(runs), "seeds": sorted(r["seed"] for r in runs if r["seed"] is not None)}
        for name in AVERAGED:
            values = [r[name] for r in runs if r[name] is not None]
            mean[name] = sum(values) / len(values) if values else None
            mean[f"{name}_min"], mean[f"{name}_max"] = (min(values), max(values)) if values else (None, None)
        means.append(mean)
    return sorted(means, key=lambda m: (m["model"], m["target"], -(m["acc_after_finetune"] or 0)))


def markdown_means(means: list[dict]) -> str:
    """The mean table: accuracy after the fine-tune as mean (lowest–highest over the seeds)."""
    def spread(m, name):
        if m[name] is None:
            return "–"
        return f"{m[name]:.2f}" + (f" ({m[name + '_min']:.2f}–{m[name + '_max']:.2f})" if m["runs"] > 1 else "")

    lines = ["| model | target | method | surgery | seeds | params ↓ % | FLOPs ↓ % | acc before FT | acc after FT | "
             "speed-up b64 |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for m in means:
        lines.append(f"| {m['model']} | {m['target']} | {m['method']} | {m['surgery']} | "
                     f"{', '.join(map(str, m['seeds'])) or '–'} | {m['params_reduction']:.2f} | "
                     f"{m['flops_reduction']:.2f} | {spread(m, 'acc_before_finetune')} | "
                     f"{spread(m, 'acc_after_finetune')} | "
                     f"{'–' if m['speedup_b64'] is None else format(m['speedup_b64'], '.2f') + '×'} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    """The table as Markdown, with the conventions it was measured under."""
    def number(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| method | criterion + selector | surgery | model | target | params ↓ % | FLOPs ↓ % | dense acc | "
             "acc before FT | acc after FT | paper acc (dense) | speed-up b64 | prune min | FT min | seed |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        paper = "–" if r["paper_acc"] is None else f"{r['paper_acc']:.1f} ({number(r['paper_dense'], 1)})"
        speedup = "–" if r["speedup_b64"] is None else f"{r['speedup_b64']:.2f}×"
        lines.append(f"| {r['method']} | {r['criterion']} + {r['selector']} | {r['surgery']} | {r['model']} | "
                     f"{r['target']} | {number(r['params_reduction'])} | {number(r['flops_reduction'])} | "
                     f"{number(r['dense_acc'])} | {number(r['acc_before_finetune'])} | "
                     f"{number(r['acc_after_finetune'])} | {paper} | {speedup} | "
                     f"{number(r['prune_minutes'], 1)} | {number(r['finetune_minutes'], 1)} | "
                     f"{'–' if r['seed'] is None else r['seed']} |")
    if rows:
        first = rows[0]
        lines += ["", f"Accuracy: % on the {first['dataset']} test split ({first['test_images']} images; the offline "
                      "CIFAR copy is JPEG-encoded, so figures can differ slightly from the PNG/pickle release). "
                      "Reductions against the original network (no adapters); "
                      f"{first['flops_convention']}. FT = fine-tune (distilled from the unpruned model). "
                      "Speed-up: CPU latency at batch 64 of the dense model over the exported pruned model's "
                      f"(model_exported.pt), measured in the run's process, interleaved, {first['latency_threads']} "
                      "thread(s); surgery=adapters keeps every width (1×1 adapters), remove cuts channels."]
    return "\n".join(lines) + "\n"


def write_table(directories, out: Path | None = None) -> Path | None:
    """Write table.md and table.csv; return the Markdown path (None when no prune run was found)."""
    directories = [Path(d) for d in directories]
    rows = collect_rows(directories)
    if not rows:
        return None
    out = Path(out or directories[0])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "table.csv", [{k: r[k] for k in COLUMNS} for r in rows])
    text = markdown(rows)
    means = seed_means(rows)
    if any(m["runs"] > 1 for m in means):  # the same method at the same target more than once: seeds
        write_csv(out / "table_means.csv", [{k: v for k, v in m.items() if k != "seeds"} |
                                             {"seeds": " ".join(map(str, m["seeds"]))} for m in means])
        text += ("\nMean over seeds, best first within each target; accuracy after FT as mean (lowest–highest):\n\n"
                 + markdown_means(means))
    (out / "table.md").write_text(text)
    return out / "table.md"


class CollectTable(Callback):
    """Hydra callback: at the end of a multirun, the table of its prune runs in the sweep directory."""

    def on_multirun_end(self, config, **kwargs) -> None:
        path = write_table([config.hydra.sweep.dir])
        if path is not None:
            print(f"\n{path.read_text()}\ntable written to {path} and {path.with_suffix('.csv')}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", type=Path, help="multirun (or run) directories to search")
    parser.add_argument("--out", type=Path, default=None, help="where to write table.md/table.csv")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.directories if not d.is_dir()]
    if missing:
        parser.error(f"no such directory: {', '.join(missing)}")
    path = write_table(args.directories, args.out)
    if path is None:
        parser.error("found no finished stage=prune run (a summary.json) under "
                     + ", ".join(map(str, args.directories)))
    print(path.read_text())
    print(f"written: {path} and {path.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
