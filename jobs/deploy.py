"""Deploy a registry version or alias. `python -m jobs.deploy serve.model_version=production [overrides]`

`serve.write_config=out.yaml` writes a Serve config file for that alias instead (for `serve run` /
`serve deploy` on an existing cluster) and exits without starting Ray.
"""

from jobs._entry import Summary, hydra_job
from orchestrator.config import PipelineConfig
from serve.config_file import write_serve_config
from serve.deploy import run_deploy


def deploys(cfg: PipelineConfig) -> bool:
    """False when the job only writes a Serve config file: then Ray does not start."""
    return not cfg.serve.write_config


def run(cfg: PipelineConfig) -> Summary:
    if not deploys(cfg):
        return {"serve_config": write_serve_config(cfg, cfg.serve.write_config), "ref": cfg.serve.model_version}
    result = run_deploy(cfg)
    return {"model": result.model, "version": result.version, "endpoint": result.endpoint, "api_key": result.api_key}


main = hydra_job(run, needs_ray=deploys, serves=True)

if __name__ == "__main__":
    main()
