"""Train once with the configured hyperparameters and register the best epoch. `python -m jobs.train [overrides]`"""

import hydra

from orchestrator.config.schema import register_configs, to_config
from orchestrator.flows import connected, print_summary, register_run
from orchestrator.training.loop import run_train

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg) -> None:
    cfg = to_config(dcfg)
    with connected(cfg):
        result = run_train(cfg)
        version = register_run(cfg, result, {"kind": "train", "run": result.run_path})
    last = result.run_history[-1]
    resumed_from = sorted({row["restored_epoch"] for row in result.run_history if row["restored_epoch"] > 0})
    print_summary({"model": version.model, "version": version.version, "val_accuracy": result.metrics["val_accuracy"], "epoch": result.metrics["epoch"],
                   "epochs_trained": last["epoch"], "steps": last["steps"], "resumed_from": resumed_from, "run": result.run_path})


if __name__ == "__main__":
    main()
