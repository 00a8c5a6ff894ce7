"""Train once with the configured hyperparameters and register the best epoch. `python -m jobs.train [overrides]`"""

from jobs._entry import Summary, hydra_job
from orchestrator.config import PipelineConfig
from orchestrator.flows import register_run, version_summary
from orchestrator.training.loop import run_train
from orchestrator.training.tasks import get_task


def run(cfg: PipelineConfig) -> Summary:
    result = run_train(cfg)
    version = register_run(cfg, result, {"kind": "train", "run": result.run_path})
    last = result.run_history[-1]
    resumed_from = sorted({row["restored_epoch"] for row in result.run_history if row["restored_epoch"] > 0})
    return {"model": version.model, "version": version.version, **version_summary(version, get_task(cfg.task.name)),
            "epoch": result.metrics["epoch"], "epochs_trained": last["epoch"], "steps": last["steps"],
            "resumed_from": resumed_from, "run": result.run_path}


main = hydra_job(run)

if __name__ == "__main__":
    main()
