"""Deploy a registry version or alias. `python -m jobs.deploy serve.model_version=production [overrides]`"""

import hydra

from orchestrator.config import register_configs, to_config
from orchestrator.pipeline import connected, print_summary, serve_until_interrupted
from orchestrator.serving import run_deploy

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg) -> None:
    cfg = to_config(dcfg)
    with connected(cfg):
        result = run_deploy(cfg)
        print_summary({"model": result.model, "version": result.version, "endpoint": result.endpoint})
        if cfg.serve.block:
            serve_until_interrupted(cfg)


if __name__ == "__main__":
    main()
