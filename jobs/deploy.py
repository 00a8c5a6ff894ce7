"""Deploy a registry version or alias. `python -m jobs.deploy serve.model_version=production [overrides]`

`serve.write_config=out.yaml` writes a Serve config file for that alias instead (for `serve run` /
`serve deploy` on an existing cluster) and exits without starting Ray.
"""

import hydra

from orchestrator.config.schema import register_configs, to_config
from orchestrator.flows import connected, print_summary, serve_until_interrupted
from serve.serving import run_deploy, write_serve_config

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg) -> None:
    cfg = to_config(dcfg)
    if cfg.serve.write_config:
        print_summary({"serve_config": write_serve_config(cfg, cfg.serve.write_config), "ref": cfg.serve.model_version})
        return
    with connected(cfg):
        result = run_deploy(cfg)
        print_summary({"model": result.model, "version": result.version, "endpoint": result.endpoint, "api_key": result.api_key})
        if cfg.serve.block:
            serve_until_interrupted(cfg)


if __name__ == "__main__":
    main()
