"""Sweep the search space and register the best trial. `python -m jobs.sweep [overrides]`"""

import hydra

from orchestrator.config.schema import register_configs, to_config
from orchestrator.flows import connected, print_summary, register_sweep
from orchestrator.training.sweep import run_sweep

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg) -> None:
    cfg = to_config(dcfg)
    with connected(cfg):
        sweep = run_sweep(cfg)
        version = register_sweep(cfg, sweep)
    for trial in sweep.trials:
        print(f"{trial.trial_id}  {trial.status:<14} epochs={trial.epochs_run:<3} val_accuracy={trial.val_accuracy}  {trial.overrides}")
    print_summary({
        "model": version.model, "version": version.version, "val_accuracy": sweep.best.metrics["val_accuracy"],
        "best_config": sweep.best_overrides, "plot": sweep.plot_url, "sweep": sweep.name,
        "trials": [{"id": t.trial_id, "status": t.status, "epochs": t.epochs_run} for t in sweep.trials],
    })


if __name__ == "__main__":
    main()
