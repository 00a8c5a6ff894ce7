"""data -> sweep -> register -> [optimize] -> deploy -> check. `python -m jobs.pipeline [overrides]`"""

import hydra

from orchestrator.config.schema import register_configs, to_config
from orchestrator.optimize.run import print_report
from orchestrator.flows import connected, print_summary, run_pipeline, serve_until_interrupted

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg) -> None:
    cfg = to_config(dcfg)  # a bad override fails here, before Ray starts
    with connected(cfg):
        result = run_pipeline(cfg)
        if result.optimize is not None:
            print_report(result.optimize)
        print_summary(result.summary())
        if cfg.serve.block:
            serve_until_interrupted(cfg)


if __name__ == "__main__":
    main()
