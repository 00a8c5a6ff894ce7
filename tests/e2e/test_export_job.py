"""`python -m jobs.export` as a user runs it: the manifests it writes pass the KubeRay CRDs, and the
RayService serves exactly the config `python -m jobs.deploy serve.write_config=...` writes. No Ray starts."""

import shlex
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from orchestrator.kuberay.manifests import validate_manifest
from tests.support import last_json_line, run_job

pytestmark = pytest.mark.slow

OVERRIDES = ["storage.root=s3://bucket/runs", "serve.host=0.0.0.0", "serve.port=8080", "model=cnn",
             "scaling.num_workers=4", "tune.search_space.train.lr=[loguniform,0.001,0.03]"]


def test_export_job_writes_valid_manifests_matching_jobs_deploy(tmp_path):
    out = tmp_path / "k8s"
    with ThreadPoolExecutor(2) as pool:  # two independent processes: run them side by side
        exporting = pool.submit(run_job, "export", *OVERRIDES, f"export.out_dir={out}", "export.job=train",
                                "export.worker_cpus=2", timeout=120)
        deploying = pool.submit(run_job, "deploy", *OVERRIDES, f"serve.write_config={tmp_path / 'serve.yaml'}",
                                timeout=120)
    export, deploy = exporting.result(), deploying.result()
    assert export.returncode == 0, export.stderr[-3000:]
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    summary = last_json_line(export.stdout)
    assert summary["manifests"] == [str(out / f"{kind}.yaml") for kind in ("raycluster", "rayjob", "rayservice")]

    manifests = {m["kind"]: m for m in (yaml.safe_load(open(path)) for path in summary["manifests"])}
    for manifest in manifests.values():
        validate_manifest(manifest)
    assert shlex.split(manifests["RayJob"]["spec"]["entrypoint"]) == ["python", "-m", "jobs.train", *OVERRIDES]
    assert manifests["RayCluster"]["spec"]["workerGroupSpecs"][0]["replicas"] == 2  # 4 workers x 1 CPU on 2-CPU pods

    written = yaml.safe_load(open(tmp_path / "serve.yaml"))
    assert yaml.safe_load(manifests["RayService"]["spec"]["serveConfigV2"]) == written


def test_export_job_refuses_a_local_storage_root(tmp_path):
    export = run_job("export", "serve.host=0.0.0.0", f"export.out_dir={tmp_path / 'k8s'}", timeout=120)
    assert export.returncode != 0
    assert "storage.root must be reachable from every pod" in export.stderr
    assert not (tmp_path / "k8s").exists()
