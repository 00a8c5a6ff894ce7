"""Write KubeRay manifests of this config, without starting Ray.

    python -m jobs.export storage.root=s3://bucket/runs serve.host=0.0.0.0 export.image=<your image> \
        export.out_dir=k8s export.kind=all export.job=sweep [other overrides]

Writes `raycluster.yaml`, `rayjob.yaml` (running `python -m jobs.<export.job>` with the same overrides)
and `rayservice.yaml` (its serveConfigV2 is what `python -m jobs.deploy serve.write_config=...` writes).
"""

from hydra.core.hydra_config import HydraConfig

from jobs._entry import Summary, hydra_job, never
from orchestrator.config import PipelineConfig
from orchestrator.kuberay.manifests import write_manifests


def run(cfg: PipelineConfig) -> Summary:
    paths = write_manifests(cfg, list(HydraConfig.get().overrides.task))
    return {"manifests": paths, "kind": cfg.export.kind, "job": cfg.export.job}


main = hydra_job(run, needs_ray=never)

if __name__ == "__main__":
    main()
