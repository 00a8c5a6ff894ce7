"""End-to-end against layer-staged training, on the same data and epoch budget, over several seeds.

Every run trains the same model on the same split for `train.epochs` epochs under the same parallel
plan; only the schedule (and `train.seed`) changes. Compute is what the runs report: stage-sample
forward and backward passes, estimated FLOPs (measured per stage), the seconds spent in epochs and
the whole fit's wall time, startup included.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, List

from orchestrator.config import PipelineConfig, ScheduleConfig
from orchestrator.registry import storage
from orchestrator.training.data import prepare_dataset, ray_datasets
from orchestrator.training.loop import run_train
from orchestrator.training.schedules import schedule_epochs

COLUMNS = [
    "schedule",
    "runs",
    "val_accuracy",
    "val_accuracy_std",
    "final_val_accuracy",
    "train_gflops",
    "forward_passes",
    "backward_passes",
    "epoch_s",
    "wall_s",
    "gflops_vs_end_to_end",
]


@dataclass(kw_only=True)
class CompareResult:
    rows: List[Dict[str, Any]]
    """One row per schedule: means over seeds (COLUMNS)."""
    runs: List[Dict[str, Any]]
    """Every run: schedule, seed, best and final val accuracy, compute, history."""
    url: str
    """Folder holding compare.md, compare.csv, compare.png and runs.json."""

    def markdown(self) -> str:
        return to_markdown(self.rows)


def compare_schedules(cfg: PipelineConfig) -> List[ScheduleConfig]:
    """The schedule of each kind in `cfg.compare.schedules`; the configured schedule keeps its own settings.
    Raises ValueError (before Ray starts) for a kind that cannot run on this model and budget."""
    if cfg.task.name != "classification":  # the comparison ranks schedules by val accuracy
        raise ValueError(f"task.name {cfg.task.name} cannot be compared yet: jobs.compare ranks classification runs")
    out = []
    for kind in cfg.compare.schedules:
        if kind == cfg.schedule.kind:
            out.append(cfg.schedule)
        elif kind == "custom":
            raise ValueError(
                "compare.schedules has 'custom' but schedule.kind is not custom: set schedule=... with its phases"
            )
        else:
            out.append(ScheduleConfig(kind=kind, cache_frozen=cfg.schedule.cache_frozen))
        if schedule_epochs(out[-1], cfg.train.epochs) != cfg.train.epochs:
            raise ValueError(
                f"compare needs every schedule to run train.epochs ({cfg.train.epochs}) epochs; "
                f"schedule {kind} runs {schedule_epochs(out[-1], cfg.train.epochs)}"
            )
        dataclasses.replace(cfg, schedule=out[-1])  # validates the schedule against the model
    return out


def run_compare(cfg: PipelineConfig) -> CompareResult:
    """Train every schedule of `cfg.compare` once per seed (Ray must be connected); write and return the table."""
    info = prepare_dataset(cfg.data, cfg.storage.root)
    datasets = ray_datasets(info)  # materialized once, shared by every run
    runs = []
    for schedule in compare_schedules(cfg):
        for seed in cfg.compare.seeds:
            # A distinct run name per run: two fits started within one second must not share a results folder.
            run_cfg = dataclasses.replace(
                cfg,
                schedule=schedule,
                train=dataclasses.replace(cfg.train, seed=seed),
                run_name=f"{cfg.run_name}-{schedule.kind}-s{seed}",
            )
            started = time.perf_counter()
            result = run_train(run_cfg, info, datasets)
            runs.append(_run_record(schedule.kind, seed, result, time.perf_counter() - started))
    rows = summarize(runs)
    url = storage.join(cfg.storage.root, "compare", f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    _write(url, rows, runs)
    return CompareResult(rows=rows, runs=runs, url=url)


def _run_record(kind: str, seed: int, result, wall_s: float) -> Dict[str, Any]:
    history = result.run_history  # every epoch, not only up to the best checkpoint
    last = history[-1]
    return {
        "schedule": kind, "seed": seed, "val_accuracy": float(result.metrics["val_accuracy"]),
        "final_val_accuracy": float(last["val_accuracy"]), "train_gflops": float(last["train_gflops"]),
        "forward_passes": int(last["forward_passes"]), "backward_passes": int(last["backward_passes"]),
        "epoch_s": sum(h["epoch_time_s"] for h in history), "wall_s": wall_s,
        "history": [{k: h[k] for k in ("epoch", "phase", "val_accuracy", "train_gflops")} for h in history],
    }


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean (and spread of best val accuracy) per schedule, in first-seen order; compute relative to end_to_end."""
    kinds = list(dict.fromkeys(r["schedule"] for r in runs))
    rows = []
    for kind in kinds:
        mine = [r for r in runs if r["schedule"] == kind]
        accuracies = [r["val_accuracy"] for r in mine]
        row = {"schedule": kind, "runs": len(mine), "val_accuracy": statistics.fmean(accuracies),
               "val_accuracy_std": statistics.pstdev(accuracies)}
        for key in ("final_val_accuracy", "train_gflops", "forward_passes", "backward_passes", "epoch_s", "wall_s"):
            row[key] = statistics.fmean(r[key] for r in mine)
        rows.append(row)
    baseline = next((r["train_gflops"] for r in rows if r["schedule"] == "end_to_end"), None)
    for row in rows:
        row["gflops_vs_end_to_end"] = row["train_gflops"] / baseline if baseline else float("nan")
    return rows


def to_markdown(rows: List[Dict[str, Any]]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return header + "".join("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |\n" for row in rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _write(url: str, rows: List[Dict[str, Any]], runs: List[Dict[str, Any]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes_atomic(storage.join(url, "compare.csv"), text.getvalue().encode())
    storage.write_bytes_atomic(storage.join(url, "compare.md"), to_markdown(rows).encode())
    storage.write_bytes_atomic(storage.join(url, "runs.json"), json.dumps(runs, indent=2).encode())
    storage.write_bytes_atomic(storage.join(url, "compare.png"), _plot(runs))


def _plot(runs: List[Dict[str, Any]]) -> bytes:
    """Val accuracy against cumulative training GFLOPs, one line per run, one colour per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours: Dict[str, str] = {}
    for run in runs:
        first = run["schedule"] not in colours
        colour = colours.setdefault(run["schedule"], f"C{len(colours)}")
        xs = [h["train_gflops"] for h in run["history"]]
        ys = [h["val_accuracy"] for h in run["history"]]
        ax.plot(xs, ys, color=colour, alpha=0.7, marker=".", label=run["schedule"] if first else None)
    ax.set_xlabel("training compute (GFLOPs, cumulative)")
    ax.set_ylabel("val accuracy (whole model)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
