"""Hyperparameter sweeps: Ray Tune over Ray Train.

Ray 2.60 (Train V2) rejects `Tuner(TorchTrainer(...))`, so each trial is a Tune function
trainable that builds and fits one TorchTrainer and forwards its reports to Tune (from the trial's
own thread: `_run_trial` says why not through Ray's `TuneReportCallback`). The trial itself reserves
a sliver of CPU; its Train workers reserve their own, so several trials of several workers share a
small machine.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from orchestrator.config import PipelineConfig, flatten, iter_search_space, to_config
from orchestrator.registry import storage
from orchestrator.training.checkpoints import is_complete
from orchestrator.training.data import DatasetInfo, prepare_dataset, ray_datasets
from orchestrator.training.loop import TrainResult, build_trainer, read_history
from orchestrator.training.resume import mark_done, run_name_for
from orchestrator.training.schedules import schedule_epochs
from orchestrator.training.tasks import get_task, reported_metrics

log = logging.getLogger(__name__)

CHECKPOINT_PATH_KEY = "checkpoint_path"
"""Where a trial's report names its checkpoint (the key Ray's own TuneReportCallback uses)."""


@dataclass(kw_only=True)
class TrialSummary:
    trial_id: str
    overrides: Dict[str, Any]
    """Sampled values, by dotted config path."""
    epochs_run: int
    metric: str
    """The metric trials are ranked by (tune.metric)."""
    best: Optional[float]
    """Best value of `metric` the trial reported (highest or lowest, by tune.mode)."""
    status: str
    """'completed', 'stopped early' (by the scheduler) or 'error: ...'."""


@dataclass(kw_only=True)
class SweepResult:
    name: str
    """Sweep name; its Tune results live under <root>/ray_results/<name>."""
    best_trial_id: str
    best_overrides: Dict[str, Any]
    """The best trial's sampled values, by dotted config path."""
    best: TrainResult
    """The best trial's best checkpoint and metrics."""
    trials: List[TrialSummary] = field(default_factory=list)
    plot_url: str = ""
    """PNG of every trial's tune.metric per epoch, best marked."""


def to_tune_space(space: Dict[str, Any]) -> Dict[str, Any]:
    """Turn the config's nested [sampler, *args] leaves into Tune search-space objects."""
    from ray import tune

    samplers = {
        "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a), "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
    }
    out: Dict[str, Any] = {}
    for path, spec in iter_search_space(space):
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = samplers[spec[0]](list(spec[1:]))
    return out


def _run_trial(config: Dict[str, Any], base: PipelineConfig, info: DatasetInfo, datasets, sweep_name: str,
               events=None) -> None:
    """One Tune trial: fit one TorchTrainer with the sampled values and forward its reports (and, to
    `events`, its workers' failures, which the driver prints).

    The reports reach Tune from this thread (`tune.report`, `_forward_reports`), not through Ray's
    TuneReportCallback: that one hands each report to the trial's main thread, which can deadlock when the
    run's last report and the end of this function arrive together (the main thread then waits to put the
    report on a one-slot queue that only it empties; seen as sweeps hanging on 2026-12-02, Ray 2.60)."""
    from ray import tune
    from ray.util.queue import Queue

    from orchestrator.training.reports import TrialReports

    trial_id = tune.get_context().get_trial_id()
    cfg = to_config(base, flatten(config))
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})  # one slot: the run waits for Tune, as ASHA needs
    callbacks = [TrialReports(reports)] + ([events.named(f"trial {trial_id}", reports=False)] if events else [])
    trainer = build_trainer(
        cfg, info, run_name=trial_id, group=sweep_name, storage_subdir=f"ray_results/{sweep_name}/trials",
        datasets=datasets, callbacks=callbacks,
    )
    try:
        result = _forward_reports(trainer.fit, reports, tune.report)
    finally:
        reports.shutdown()
    if result.error is not None:
        raise result.error


def _forward_reports(fit: Callable[[], Any], queue: Any, report: Callable[[Dict[str, Any]], None]) -> Any:
    """Run `fit` in a thread and `report` what its run puts on `queue`, in order, from this thread; then
    `fit`'s result (or its exception). Every put has returned once `fit` has, so a last drain misses nothing."""
    from ray.util.queue import Empty

    outcome: Dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as error:  # noqa: BLE001 - raised again in the trial's thread below
            outcome["error"] = error

    fitting = threading.Thread(target=run, name="trial-fit", daemon=True)
    fitting.start()
    while True:
        running = fitting.is_alive()  # read before the get: once False, the queue holds all that is left
        try:
            report(queue.get(block=running, timeout=0.5 if running else None))
        except Empty:
            if not running:
                break
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _scheduler(cfg: PipelineConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    # time_attr "epoch" (not training_iteration): a trial resumed after a failure keeps its rung.
    # A grace period longer than the run means "never stop early": ASHA itself would reject it.
    longest = longest_trial(cfg)
    return ASHAScheduler(
        time_attr="epoch", max_t=longest, grace_period=min(cfg.tune.grace_period, longest),
        reduction_factor=cfg.tune.reduction_factor,
    )


def longest_trial(cfg: PipelineConfig) -> int:
    """Epochs of the longest trial the search space can sample (ASHA stops every trial at its max_t)."""
    lengths = [schedule_epochs(cfg.schedule, cfg.train.epochs)]
    for path, spec in iter_search_space(cfg.tune.search_space):
        if path in ("train.epochs", "schedule.phase_epochs"):
            values = spec[1:] if spec[0] in ("choice", "grid") else [spec[2]]
            lengths += [sum(v) if isinstance(v, (list, tuple)) else int(v) for v in values]
    return max(lengths)


def concurrent_trials_that_fit(cfg: PipelineConfig) -> int:
    """`tune.max_concurrent_trials`, lowered to what the cluster's CPUs can hold at once.

    A trial whose workers cannot all be placed does not queue: its worker group times out after
    60 s and the trial fails, so asking for more concurrency than fits loses trials.
    """
    import ray

    per_trial = cfg.tune.trial_cpus + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    fits = int(ray.cluster_resources().get("CPU", 0) // per_trial)
    if fits < 1:
        raise ValueError(
            f"one trial needs {per_trial:g} CPUs (scaling.num_workers x scaling.cpus_per_worker + tune.trial_cpus); "
            f"the cluster has {ray.cluster_resources().get('CPU', 0):g}"
        )
    if fits < cfg.tune.max_concurrent_trials:
        log.warning(
            "tune.max_concurrent_trials=%d lowered to %d: that is what %g CPUs hold",
            cfg.tune.max_concurrent_trials,
            fits,
            ray.cluster_resources()["CPU"],
        )
    return min(fits, cfg.tune.max_concurrent_trials)


def run_sweep(cfg: PipelineConfig, info: Optional[DatasetInfo] = None) -> SweepResult:
    """Sweep `cfg.tune.search_space` (Ray must be connected). Returns the best trial and a summary of all.

    With `cfg.resume`, restores the newest unfinished sweep of `cfg.run_name` from the storage root:
    finished trials are kept, unfinished ones continue from their newest complete checkpoint.
    """
    from orchestrator.training.reports import follow_runs

    info = info or prepare_dataset(cfg.data, cfg.storage.root)
    name = run_name_for(cfg, "sweep")
    # Worker failures that a trial's Train run retries by itself reach the driver through this queue.
    with follow_runs(get_task(cfg.task.name), metric=cfg.tune.metric, mode=cfg.tune.mode) as runs:
        grid = _tuner(cfg, info, name, runs).fit()
    result = _summarize(grid, cfg, name, info)
    mark_done(
        cfg.storage.root, name, {"best_trial": result.best_trial_id, "best_checkpoint": result.best.checkpoint_path}
    )
    return result


def _tuner(cfg: PipelineConfig, info: DatasetInfo, name: str, runs):
    """The Tuner of sweep `name`: new, or with `cfg.resume` the restored unfinished one. Its trials' Train
    runs send their workers' failures to `runs` (a RunFollower)."""
    from ray import tune

    from orchestrator.training.reports import TrialProgress

    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=cfg, info=info, datasets=ray_datasets(info), sweep_name=name,
                             events=runs.events),
        {"cpu": cfg.tune.trial_cpus},
    )
    fs, path = storage.pyarrow_filesystem(storage.join(cfg.storage.root, "ray_results"))
    experiment = f"{path.rstrip('/')}/{name}"
    if cfg.resume and tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        return tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    progress = TrialProgress(get_task(cfg.task.name), metric=cfg.tune.metric, mode=cfg.tune.mode,
                             planned=functools.partial(trial_epochs, cfg), sampled=flatten, runs=runs)
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(cfg.tune.search_space),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=_scheduler(cfg),
            num_samples=cfg.tune.num_samples, max_concurrent_trials=concurrent_trials_that_fit(cfg),
        ),
        run_config=tune.RunConfig(
            # Tune's own table only with verbose=true; the progress lines are TrialProgress's.
            name=name, storage_path=path, storage_filesystem=fs, verbose=1 if cfg.verbose else 0,
            callbacks=[progress],
            # A trial whose process dies is retried; its Train run resumes from its newest complete checkpoint.
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
        ),
    )


def trial_epochs(cfg: PipelineConfig, config: Dict[str, Any]) -> int:
    """Epochs the trial with sampled `config` runs unless stopped early."""
    trial_cfg = to_config(cfg, flatten(config))
    return schedule_epochs(trial_cfg.schedule, trial_cfg.train.epochs)


def _summarize(grid, cfg: PipelineConfig, name: str, info: DatasetInfo) -> SweepResult:
    trials = [_trial_summary(result, cfg) for result in grid]
    finished = [r for r in grid if r.metrics_dataframe is not None and CHECKPOINT_PATH_KEY in r.metrics_dataframe]
    if not finished:
        errors = "; ".join(str(r.error) for r in grid if r.error) or "no trial reported a checkpoint"
        raise RuntimeError(f"sweep {name} produced no usable trial: {errors}")
    best_result, best_row = _best_row(finished, cfg.tune.metric, cfg.tune.mode, cfg.storage.root)
    checkpoint_path = best_row[CHECKPOINT_PATH_KEY]
    reported = ["train_loss", *reported_metrics(get_task(cfg.task.name))]
    best = TrainResult(
        metrics={
            "epoch": int(best_row["epoch"]),
            **{k: float(best_row[k]) for k in reported if k in best_row},
        },
        checkpoint_path=checkpoint_path,
        history=read_history(cfg.storage.root, checkpoint_path),
        run_path=best_result.path,
        data=info,
    )
    summary = SweepResult(
        name=name,
        best_trial_id=_trial_id(best_result),
        best_overrides=flatten(best_result.config),
        best=best,
        trials=trials,
    )
    summary.plot_url = write_sweep_plot(
        grid, summary, storage.join(cfg.storage.root, "ray_results", name, f"{cfg.tune.metric}.png"), cfg.tune.metric
    )
    return summary


def _best_row(results, metric: str, mode: str, root: str):
    """(result, dataframe row) of the best reported epoch with a complete checkpoint, across all trials."""
    rows = []
    for result in results:
        df = result.metrics_dataframe.dropna(subset=[CHECKPOINT_PATH_KEY])
        df = df[[is_complete(root, path) for path in df[CHECKPOINT_PATH_KEY]]]  # Ray deleted some; some may be torn
        if len(df):
            row = df.loc[df[metric].idxmax() if mode == "max" else df[metric].idxmin()]
            rows.append((result, row))
    return max(rows, key=lambda pair: pair[1][metric] if mode == "max" else -pair[1][metric])


def _trial_id(result) -> str:
    metrics = result.metrics or {}
    return str(metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1])


def _trial_summary(result, cfg: PipelineConfig) -> TrialSummary:
    df = result.metrics_dataframe
    epochs = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
    best = None
    if df is not None and cfg.tune.metric in df:
        best = float(df[cfg.tune.metric].max() if cfg.tune.mode == "max" else df[cfg.tune.metric].min())
    if result.error is not None:
        status = f"error: {type(result.error).__name__}"
    else:
        status = "completed" if epochs >= trial_epochs(cfg, result.config) else "stopped early"
    return TrialSummary(
        trial_id=_trial_id(result),
        overrides=flatten(result.config),
        epochs_run=epochs,
        metric=cfg.tune.metric,
        best=best,
        status=status,
    )


def write_sweep_plot(grid, summary: SweepResult, url: str, metric: str = "val_accuracy") -> str:
    """Plot every trial's `metric` per epoch (best trial bold, its best epoch starred); returns `url`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in grid:
        df = result.metrics_dataframe
        if df is None or metric not in df:
            continue
        is_best = _trial_id(result) == summary.best_trial_id
        ax.plot(df["epoch"], df[metric], marker="o", markersize=3, linewidth=2.5 if is_best else 1,
                alpha=1.0 if is_best else 0.6, label=f"{_trial_id(result)}{' (best)' if is_best else ''}")
    ax.scatter([summary.best.metrics["epoch"]], [summary.best.metrics.get(metric, float("nan"))], marker="*", s=250,
               color="gold", edgecolor="black", zorder=5, label="best checkpoint")
    ax.set(xlabel="epoch", ylabel=metric.replace("_", " "), title=f"sweep {summary.name}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes_atomic(url, buffer.getvalue())
    return url
