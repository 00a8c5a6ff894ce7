"""Train once with the configured hyperparameters and register the best epoch. `python -m jobs.train [overrides]`"""

from jobs._entry import Summary, hydra_job
from orchestrator.config import PipelineConfig
from orchestrator.flows import register_run
from orchestrator.training.loop import run_train


def run(cfg: PipelineConfig) -> Summary:
    result = run_train(cfg)
    version = register_run(cfg, result, {"kind": "train", "run": result.run_path})
    last = result.run_history[-1]
    resumed_from = sorted({row["restored_epoch"] for row in result.run_history if row["restored_epoch"] > 0})
    return {"model": version.model, "version": version.version, "val_accuracy": result.metrics["val_accuracy"],
            "epoch": result.metrics["epoch"], "epochs_trained": last["epoch"], "steps": last["steps"],
            "resumed_from": resumed_from, "run": result.run_path}


main = hydra_job(run)

if __name__ == "__main__":
    main()
