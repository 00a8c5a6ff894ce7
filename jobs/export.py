"""Write KubeRay manifests of this config, without starting Ray.

    python -m jobs.export storage.root=s3://bucket/runs serve.host=0.0.0.0 export.image=<your image> \
        export.out_dir=k8s export.kind=all export.job=sweep [other overrides]

Writes `raycluster.yaml`, `rayjob.yaml` (running `python -m jobs.<export.job>` with the same overrides)
and `rayservice.yaml` (its serveConfigV2 is what `python -m jobs.deploy serve.write_config=...` writes).
"""

import json

import hydra
from hydra.core.hydra_config import HydraConfig

from orchestrator.config.schema import register_configs, to_config
from orchestrator.kuberay.manifests import write_manifests

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg) -> None:
    cfg = to_config(dcfg)
    paths = write_manifests(cfg, list(HydraConfig.get().overrides.task))
    # One JSON line like every job's summary, printed here: orchestrator.flows.print_summary would load
    # torch and Ray first, which a raycluster/rayjob export or a refused config need not wait for.
    print(json.dumps({"manifests": paths, "kind": cfg.export.kind, "job": cfg.export.job}), flush=True)


if __name__ == "__main__":
    main()
