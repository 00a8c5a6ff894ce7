"""Sweep the search space and register the best trial. `python -m jobs.sweep [overrides]`"""

from jobs._entry import Summary, hydra_job
from orchestrator.config import PipelineConfig
from orchestrator.flows import register_sweep, version_summary
from orchestrator.training.sweep import run_sweep
from orchestrator.training.tasks import get_task


def run(cfg: PipelineConfig) -> Summary:
    sweep = run_sweep(cfg)
    version = register_sweep(cfg, sweep)
    for trial in sweep.trials:
        print(f"{trial.trial_id}  {trial.status:<14} epochs={trial.epochs_run:<3} "
              f"{trial.metric}={trial.best}  {trial.overrides}")
    return {
        "model": version.model, "version": version.version,
        **version_summary(version, get_task(cfg.task.name)),
        "best_config": sweep.best_overrides, "plot": sweep.plot_url, "sweep": sweep.name,
        "trials": [{"id": t.trial_id, "status": t.status, "epochs": t.epochs_run} for t in sweep.trials],
    }


main = hydra_job(run)

if __name__ == "__main__":
    main()
