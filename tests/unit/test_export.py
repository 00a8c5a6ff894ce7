"""KubeRay manifests from the Hydra config: valid against the shipped CRDs, sized from `scaling`, and
carrying exactly what jobs.deploy and the jobs themselves would use. No Ray is started."""

from __future__ import annotations

import copy
import shlex

import pytest
import yaml
from hydra.errors import ConfigCompositionException

from orchestrator.config import to_config
from orchestrator.kuberay.manifests import (
    crd_validator,
    rayjob,
    validate_manifest,
    worker_replicas,
    write_manifests,
)

# What a Kubernetes deployment needs beyond the defaults: a root every pod reaches, a proxy on the pod address.
K8S = ["storage.root=s3://bucket/runs", "serve.host=0.0.0.0"]
IMAGE = "export.image=registry.example/orchestrator:1"


@pytest.fixture
def export(compose, tmp_path):
    """export(*overrides) -> ({kind: manifest loaded back from the file written}, cfg)."""

    def _export(*extra: str):
        overrides = [*K8S, IMAGE, f"export.out_dir={tmp_path}", *extra]
        cfg = to_config(compose(overrides))
        paths = write_manifests(cfg, overrides)
        return {p.rsplit("/", 1)[1].removesuffix(".yaml"): yaml.safe_load(open(p)) for p in paths}, cfg

    return _export


def test_all_three_kinds_are_written_and_valid_against_their_crds(export):
    manifests, _ = export()

    assert {kind: (m["apiVersion"], m["kind"], m["metadata"]["name"]) for kind, m in manifests.items()} == {
        "raycluster": ("ray.io/v1", "RayCluster", "orchestrator"),
        "rayjob": ("ray.io/v1", "RayJob", "orchestrator-job"),
        "rayservice": ("ray.io/v1", "RayService", "orchestrator-serve"),
    }
    for manifest in manifests.values():
        validate_manifest(manifest)  # raises on any breach
        assert not list(crd_validator(manifest["kind"]).iter_errors(manifest))


def test_rayservice_serve_config_is_what_jobs_deploy_writes(export, tmp_path):
    from serve.config_file import serve_config, write_serve_config

    manifests, cfg = export("serve.port=8080", "serve.max_replicas=5", "serve.model_version=7")
    served = yaml.safe_load(manifests["rayservice"]["spec"]["serveConfigV2"])
    written = yaml.safe_load(open(write_serve_config(cfg, str(tmp_path / "deploy.yaml"))))

    assert served == serve_config(cfg) == written
    assert served["http_options"] == {"host": "0.0.0.0", "port": 8080}
    assert served["applications"][0]["args"]["max_replicas"] == 5
    head = manifests["rayservice"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8080} in head["ports"]  # KubeRay's serve Service targets it


@pytest.mark.parametrize("job", ["train", "sweep", "pipeline"])
def test_rayjob_entrypoint_runs_the_job_with_the_same_overrides(export, job):
    given = ["train.epochs=3", "tune.search_space.train.lr=[loguniform,0.001,0.03]", "serve.block=false"]
    manifests, _ = export(*given, f"export.job={job}")

    argv = shlex.split(manifests["rayjob"]["spec"]["entrypoint"])
    assert argv == ["python", "-m", f"jobs.{job}", *K8S, *given]  # export.* dropped, the rest in order
    assert manifests["rayjob"]["spec"]["shutdownAfterJobFinishes"] is (job != "pipeline")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # 2 workers x 1 CPU on 4-CPU pods: one pod per run; a sweep of 4 concurrent trials needs 8 CPUs.
        (["scaling.num_workers=2", "export.worker_cpus=4", "export.job=sweep", "tune.max_concurrent_trials=4"], (1, 2)),
        (["scaling.num_workers=4", "export.worker_cpus=2", "export.job=train"], (2, 2)),
        # 5 workers x 1.5 CPU: a 4-CPU pod holds 2 (a worker cannot span pods), so 3 pods, not ceil(7.5 / 4) = 2.
        (["scaling.num_workers=5", "scaling.cpus_per_worker=1.5", "export.worker_cpus=4", "export.job=train"], (3, 3)),
        (["scaling.num_workers=3", "scaling.cpus_per_worker=0.3", "export.worker_cpus=1", "export.job=pipeline",
          "tune.max_concurrent_trials=3", "serve.block=false"], (1, 3)),
        (["scaling=gpu", "scaling.num_workers=4", "export.worker_cpus=16", "export.worker_gpus=2",
          "export.job=train"], (2, 2)),
    ],
)
def test_worker_replicas_hold_one_run_and_scale_to_the_sweeps_concurrency(export, overrides, expected):
    manifests, cfg = export(*overrides)

    assert worker_replicas(cfg) == expected
    for spec in (manifests["raycluster"]["spec"], manifests["rayjob"]["spec"]["rayClusterSpec"]):
        group = spec["workerGroupSpecs"][0]
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (expected[0], *expected)
        assert spec["enableInTreeAutoscaling"] is (expected[1] > expected[0])
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["cpu"] == str(cfg.export.worker_cpus)
        assert limits.get("nvidia.com/gpu") == (str(cfg.export.worker_gpus) if cfg.scaling.use_gpu else None)


def test_token_auth_and_secrets(export):
    manifests, _ = export("export.token_secret=ray-token", "export.env_secret=s3-credentials")
    spec = manifests["raycluster"]["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    for group in (spec["headGroupSpec"], spec["workerGroupSpecs"][0]):
        assert group["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]

    manifests, _ = export("export.token_auth=false")
    spec = manifests["rayservice"]["spec"]["rayClusterConfig"]
    assert spec["authOptions"] == {"mode": "disabled"}
    env = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "RAY_AUTH_MODE", "value": "disabled"} in env
    # Every node starts with Serve's fast path on (HAProxy straight to the replicas).
    assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in env


def _break(path, value):
    def mutate(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


WORKERS = ["spec", "rayClusterSpec", "workerGroupSpecs", 0]
HEAD_CONTAINER = ["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            _break([*WORKERS, "replicas"], "two"),
            "at spec.rayClusterSpec.workerGroupSpecs.0.replicas: 'two' is not of type 'integer'",
        ),
        (
            _break([*WORKERS, "groupName"], KeyError),
            "at spec.rayClusterSpec.workerGroupSpecs.0: 'groupName' is a required property",
        ),
        (
            _break(["spec", "rayClusterSpec", "headGroupSpec"], KeyError),
            "at spec.rayClusterSpec: 'headGroupSpec' is a required property",
        ),
        (_break(["spec", "rayClusterSpec", "workerGroupSpec"], []), "('workerGroupSpec' was unexpected)"),  # a typo
        (_break([*HEAD_CONTAINER, "resources", "limits", "memory"], "lots"), "limits.memory: 'lots' does not match"),
        (
            _break(["spec", "rayClusterSpec", "authOptions", "mode"], "password"),
            "'password' is not one of ['disabled', 'token']",
        ),
        (
            _break(["spec", "shutdownAfterJobFinishes"], "yes"),
            "at spec.shutdownAfterJobFinishes: 'yes' is not of type 'boolean'",
        ),
        (_break(["apiVersion"], "ray.io/v1alpha1"), "RayJob.apiVersion must be ray.io/v1"),
    ],
)
def test_the_validator_catches_a_broken_manifest(compose, mutate, message):
    good = rayjob(to_config(compose(K8S)), ["train.epochs=3"])
    validate_manifest(good)
    bad = copy.deepcopy(good)
    mutate(bad)

    with pytest.raises(ValueError) as err:
        validate_manifest(bad)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["storage.root=file:///shared/runs"], "storage.root"),  # exists on this machine only
        (["storage.root=memory://runs"], "storage.root"),
        (["serve.host=127.0.0.1"], "serve.host"),  # the serve Service could not reach the proxy
        (["export.job=pipeline"], "serve.block"),  # serve.block=true: the RayJob would never end
        (["scaling.cpus_per_worker=8", "export.worker_cpus=4"], "export.worker_cpus"),
        (["scaling=gpu"], "export.worker_gpus"),
    ],
)
def test_configs_that_would_not_work_in_pods_fail_naming_the_field(compose, tmp_path, overrides, named):
    cfg = to_config(compose([*K8S, f"export.out_dir={tmp_path}", *overrides]))
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        write_manifests(cfg, [])
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_only_the_kind_asked_for_is_written_and_a_loopback_host_is_fine_without_a_rayservice(export):
    manifests, _ = export("export.kind=rayjob", "serve.host=127.0.0.1")
    assert list(manifests) == ["rayjob"]


@pytest.mark.parametrize(("override", "named"), [("export.kind=deployment", "export.kind"),
                                                  ("export.job=deploy", "export.job")])
def test_an_export_choice_not_offered_fails_at_compose_naming_the_field(compose, override, named):
    with pytest.raises(ConfigCompositionException, match=named.replace(".", r"\.")):
        compose([override])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("export.name=Orchestrator", "export.name"),
        ("export.worker_memory=16GB", "export.worker_memory"),
        ("export.head_cpus=0", "export.head_cpus"),
        ("export.env_secret=aws_creds", "export.env_secret"),
    ],
)
def test_bad_export_values_fail_in_to_config_naming_the_field(compose, override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        to_config(compose([override]))
