"""End-to-end against layer-staged training, on the same data and epoch budget, over several seeds.

Every run trains the same model on the same split for `train.epochs` epochs under the same parallel
plan; only the schedule (and `train.seed`; and, for the from-scratch row, the initial weights) changes.
Val selects each run's checkpoint; that checkpoint is scored once on the test split. Compute is what the
runs report: stage-sample forward and backward passes, estimated FLOPs (measured per stage), the seconds
spent in epochs and the whole fit's wall time, startup included.
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

from orchestrator.config import BuiltinModel, PipelineConfig, ScheduleConfig, ScheduleKind
from orchestrator.registry import storage
from orchestrator.training.data import prepare_dataset, ray_datasets
from orchestrator.training.loop import evaluate_checkpoint, run_train
from orchestrator.training.schedules import schedule_epochs

COLUMNS = [
    "schedule",
    "runs",
    "test_accuracy",
    "test_accuracy_std",
    "test_points_vs_end_to_end",
    "val_accuracy",
    "val_accuracy_std",
    "final_val_accuracy",
    "train_gflops",
    "gflops_vs_end_to_end",
    "forward_passes",
    "backward_passes",
    "epoch_s",
    "wall_s",
]
BASELINE = "end_to_end"
"""The row every other one is measured against (compute ratio, test accuracy gap)."""
SCRATCH = "end_to_end_scratch"
"""The row of `compare.from_scratch`: end_to_end from random weights."""


@dataclass(kw_only=True)
class CompareResult:
    rows: List[Dict[str, Any]]
    """One row per variant: means over seeds (COLUMNS)."""
    runs: List[Dict[str, Any]]
    """Every run: variant, seed, test accuracy of the checkpoint val chose, best and final val accuracy,
    compute, history."""
    url: str
    """Folder holding compare.md, compare.csv, compare.png and runs.json."""

    def markdown(self) -> str:
        return to_markdown(self.rows)


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One row of the comparison: a schedule, on the pretrained weights or from scratch."""

    label: str
    schedule: ScheduleConfig
    from_scratch: bool = False


def compare_variants(cfg: PipelineConfig) -> List[Variant]:
    """The variants `cfg.compare` races: each kind of `compare.schedules` (the configured schedule keeps its own
    settings, the others take `compare.schedule_settings`), then end_to_end from scratch if asked.
    Raises ValueError (before Ray starts) for a variant that cannot run on this model and budget."""
    if cfg.task.name != "classification":  # the comparison ranks schedules by accuracy
        raise ValueError(f"task.name {cfg.task.name} cannot be compared yet: jobs.compare ranks classification runs")
    variants = [Variant(label=str(kind.value), schedule=_schedule_of(cfg, kind)) for kind in cfg.compare.schedules]
    if cfg.compare.from_scratch:
        if cfg.model.name != BuiltinModel.hf:
            raise ValueError("compare.from_scratch needs a pretrained model (model=hf), "
                             f"got model.name={cfg.model.name}")
        variants.append(Variant(label=SCRATCH, schedule=_schedule_of(cfg, ScheduleKind.end_to_end), from_scratch=True))
    for variant in variants:
        epochs = schedule_epochs(variant.schedule, cfg.train.epochs)
        if epochs != cfg.train.epochs:
            raise ValueError(f"compare needs every schedule to run train.epochs ({cfg.train.epochs}) epochs; "
                             f"schedule {variant.label} runs {epochs}")
        _run_config(cfg, variant, cfg.train.seed)  # validates the schedule against the model
    return variants


def _schedule_of(cfg: PipelineConfig, kind: ScheduleKind) -> ScheduleConfig:
    if kind == cfg.schedule.kind:
        return cfg.schedule
    if kind == ScheduleKind.custom:
        raise ValueError(
            "compare.schedules has 'custom' but schedule.kind is not custom: set schedule=... with its phases")
    # What every schedule shares with the configured one: caching and the head's learning rate.
    shared = {name: getattr(cfg.schedule, name) for name in ("cache_frozen", "cache_max_mb", "head_lr_scale")}
    settings = {**shared, **cfg.compare.schedule_settings.get(kind.value, {})}
    try:
        return ScheduleConfig(kind=kind, **settings)
    except TypeError as err:  # a key that is no ScheduleConfig field
        raise ValueError(f"compare.schedule_settings.{kind.value}: {err}") from None


def _run_config(cfg: PipelineConfig, variant: Variant, seed: int) -> PipelineConfig:
    # A distinct run name per run: two fits started within one second must not share a results folder.
    model = dataclasses.replace(cfg.model, from_scratch=True) if variant.from_scratch else cfg.model
    return dataclasses.replace(cfg, schedule=variant.schedule, model=model,
                               train=dataclasses.replace(cfg.train, seed=seed),
                               run_name=f"{cfg.run_name}-{variant.label}-s{seed}")


def run_compare(cfg: PipelineConfig) -> CompareResult:
    """Train every variant of `cfg.compare` once per seed (Ray must be connected), score each run's
    val-selected checkpoint once on the test split; write and return the table."""
    info = prepare_dataset(cfg.data, cfg.storage.root)
    datasets = ray_datasets(info)  # materialized once, shared by every run
    runs = []
    for variant in compare_variants(cfg):
        for seed in cfg.compare.seeds:
            run_cfg = _run_config(cfg, variant, seed)
            started = time.perf_counter()
            result = run_train(run_cfg, info, datasets)
            wall_s = time.perf_counter() - started
            test = evaluate_checkpoint(run_cfg, info, result.checkpoint_path, "test")
            runs.append(_run_record(variant.label, seed, result, wall_s, test))
    rows = summarize(runs)
    url = storage.join(cfg.storage.root, "compare", f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    _write(url, rows, runs)
    return CompareResult(rows=rows, runs=runs, url=url)


def _run_record(label: str, seed: int, result, wall_s: float, test: Dict[str, float]) -> Dict[str, Any]:
    history = result.run_history  # every epoch, not only up to the best checkpoint
    last = history[-1]
    return {
        "schedule": label, "seed": seed, "test_accuracy": float(test["test_accuracy"]),
        "val_accuracy": float(result.metrics["val_accuracy"]), "best_epoch": int(result.metrics["epoch"]),
        "final_val_accuracy": float(last["val_accuracy"]), "train_gflops": float(last["train_gflops"]),
        "forward_passes": int(last["forward_passes"]), "backward_passes": int(last["backward_passes"]),
        "epoch_s": sum(h["epoch_time_s"] for h in history), "wall_s": wall_s,
        "prefix_cache_mb": max(float(h.get("prefix_cache_mb", 0.0)) for h in history),
        "history": [{k: h[k] for k in ("epoch", "phase", "val_accuracy", "train_gflops")} for h in history],
    }


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Means (and spreads of test and best val accuracy) per variant, in first-seen order; compute and test
    accuracy relative to end_to_end."""
    labels = list(dict.fromkeys(r["schedule"] for r in runs))
    rows = []
    for label in labels:
        mine = [r for r in runs if r["schedule"] == label]
        row: Dict[str, Any] = {"schedule": label, "runs": len(mine)}
        for key in ("test_accuracy", "val_accuracy"):
            row[key] = statistics.fmean(r[key] for r in mine)
            row[f"{key}_std"] = statistics.pstdev(r[key] for r in mine)
        for key in ("final_val_accuracy", "train_gflops", "forward_passes", "backward_passes", "epoch_s", "wall_s"):
            row[key] = statistics.fmean(r[key] for r in mine)
        rows.append(row)
    baseline = next((r for r in rows if r["schedule"] == BASELINE), None)
    for row in rows:
        row["gflops_vs_end_to_end"] = row["train_gflops"] / baseline["train_gflops"] if baseline else float("nan")
        row["test_points_vs_end_to_end"] = (
            100 * (row["test_accuracy"] - baseline["test_accuracy"]) if baseline else float("nan"))
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
    """Left: val accuracy against cumulative training GFLOPs, one line per run. Right: each run's test accuracy
    (of the checkpoint val chose) against its total training GFLOPs. One colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, final) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours: Dict[str, str] = {}
    for run in runs:
        first = run["schedule"] not in colours
        colour = colours.setdefault(run["schedule"], f"C{len(colours)}")
        xs = [h["train_gflops"] for h in run["history"]]
        ys = [h["val_accuracy"] for h in run["history"]]
        curves.plot(xs, ys, color=colour, alpha=0.7, marker=".", label=run["schedule"] if first else None)
        final.scatter([run["train_gflops"]], [run["test_accuracy"]], color=colour,
                      label=run["schedule"] if first else None)
    curves.set_xlabel("training compute (GFLOPs, cumulative)")
    curves.set_ylabel("val accuracy (whole model)")
    curves.set_ylim(0, 1)
    final.set_xlabel("training compute of the run (GFLOPs)")
    final.set_ylabel("test accuracy (checkpoint chosen on val)")
    for ax in (curves, final):
        ax.grid(alpha=0.3)
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
