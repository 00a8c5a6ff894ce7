"""KubeRay manifests (`RayCluster`, `RayJob`, `RayService`) from the same config the jobs run with.

Nothing here starts Ray. The three kinds share one cluster spec (`cluster_spec`) and one pod template
helper (`_pod_template`). Each manifest is checked against the KubeRay CRD schema shipped in
orchestrator/kuberay/crds before it is written, strictly: a field the CRD does not define is an error, as
with `kubectl apply`'s strict field validation (the API server would otherwise drop it silently).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import math
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import jsonschema
import yaml

from orchestrator.config import EXPORT_KINDS, PipelineConfig, require
from orchestrator.runtime import SERVE_ENV
from serve.config_file import serve_config

log = logging.getLogger(__name__)

CRD_DIR = Path(__file__).resolve().parent / "crds"  # package data: installed with the wheel
API_VERSION = "ray.io/v1"
KINDS = ("RayCluster", "RayJob", "RayService")
HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001))
"""Ports of the head container; KubeRay's head Service exposes exactly the ports listed here."""


def write_manifests(cfg: PipelineConfig, overrides: Sequence[str]) -> List[str]:
    """Write the manifests `cfg.export.kind` names as `<out_dir>/<kind>.yaml`; the paths written.

    `overrides` are the Hydra overrides the RayJob's entrypoint passes on (export.* ones are dropped).
    Raises ValueError naming the field when the config cannot run on Kubernetes as it stands.
    """
    kinds = EXPORT_KINDS if cfg.export.kind == "all" else (cfg.export.kind,)
    check_exportable(cfg, kinds)
    if cfg.export.image.startswith("rayproject/ray:"):
        log.warning("export.image=%s lacks this project: build cluster/kuberay/Dockerfile, push it and pass "
                    "export.image=<that image>", cfg.export.image)
    builders = {"raycluster": lambda: raycluster(cfg), "rayjob": lambda: rayjob(cfg, overrides),
                "rayservice": lambda: rayservice(cfg)}
    manifests = {kind: builders[kind]() for kind in kinds}
    for manifest in manifests.values():  # all checked before any is written: no half-written set
        validate_manifest(manifest)
    os.makedirs(cfg.export.out_dir, exist_ok=True)
    paths = []
    for kind, manifest in manifests.items():
        path = os.path.join(cfg.export.out_dir, f"{kind}.yaml")
        with open(path, "w") as f:
            yaml.dump(manifest, f, Dumper=_ManifestDumper, sort_keys=False)
        paths.append(path)
    return paths


def check_exportable(cfg: PipelineConfig, kinds: Sequence[str]) -> None:
    """Raise ValueError naming the field where `cfg` would not work in pods."""
    root = cfg.storage.root
    # Fail rather than warn: pods would each write to their own disk, and nothing would survive them.
    require(not root.startswith(("file://", "memory://")), "storage.root",
            f"must be reachable from every pod (s3://, gs://, ...), got {root!r}, which exists only on this machine")
    if "rayservice" in kinds:
        host = cfg.serve.host
        require(not (host.startswith("127.") or host in ("localhost", "::1")), "serve.host",
                f"must be 0.0.0.0 for a RayService (KubeRay's serve Service reaches the proxy on the pod's "
                f"address), got {host!r}")
    if "rayjob" in kinds and cfg.export.job == "pipeline":
        require(not cfg.serve.block, "serve.block", "must be false for export.job=pipeline: the RayJob ends "
                "when its entrypoint exits (the deployment keeps serving on the job's cluster)")


def raycluster(cfg: PipelineConfig) -> Dict[str, Any]:
    """A standing RayCluster to `ray job submit` the jobs to."""
    return _manifest(cfg, "RayCluster", cfg.export.name, cluster_spec(cfg))


def rayjob(cfg: PipelineConfig, overrides: Sequence[str]) -> Dict[str, Any]:
    """A RayJob running `python -m jobs.<export.job> <overrides>` on a cluster of its own."""
    entrypoint = shlex.join(["python", "-m", f"jobs.{cfg.export.job}", *job_overrides(overrides)])
    return _manifest(cfg, "RayJob", f"{cfg.export.name}-job", {
        "entrypoint": entrypoint,
        # Train and sweep leave everything in storage.root; a pipeline ends with a deployment to keep.
        "shutdownAfterJobFinishes": cfg.export.job != "pipeline",
        "rayClusterSpec": cluster_spec(cfg),
    })


def rayservice(cfg: PipelineConfig) -> Dict[str, Any]:
    """A RayService whose `serveConfigV2` is `serve_config(cfg)`, as `jobs.deploy serve.write_config=...` writes it."""
    return _manifest(cfg, "RayService", f"{cfg.export.name}-serve", {
        "serveConfigV2": yaml.safe_dump(serve_config(cfg), sort_keys=False),
        "rayClusterConfig": cluster_spec(cfg),
    })


def job_overrides(overrides: Sequence[str]) -> List[str]:
    """`overrides` less the export group's own (the job in the pod has nothing to export)."""
    return [o for o in overrides if not o.lstrip("+~").startswith("export.")]


def cluster_spec(cfg: PipelineConfig) -> Dict[str, Any]:
    """The RayClusterSpec every kind uses: a head and one autoscaled worker group sized from `scaling`."""
    ex = cfg.export
    replicas, max_replicas = worker_replicas(cfg)
    return {
        "rayVersion": importlib.metadata.version("ray"),
        # Autoscale only where there is a range: from one training run up to a sweep's concurrent trials.
        "enableInTreeAutoscaling": max_replicas > replicas,
        "authOptions": {"mode": "token" if ex.token_auth else "disabled",
                        **({"secretName": ex.token_secret} if ex.token_auth and ex.token_secret else {})},
        "headGroupSpec": {
            # The operator and the RayJob submitter reach the dashboard (Jobs API, Serve REST API) through
            # the head Service, so it listens on the pod address; the Service stays ClusterIP (nothing
            # outside the Kubernetes cluster reaches it) and the token guards it.
            "serviceType": "ClusterIP",
            "rayStartParams": {"dashboard-host": "0.0.0.0"},
            "template": _pod_template(cfg, "head"),
        },
        "workerGroupSpecs": [{
            "groupName": "workers", "replicas": replicas, "minReplicas": replicas, "maxReplicas": max_replicas,
            "rayStartParams": {}, "template": _pod_template(cfg, "worker"),
        }],
    }


def worker_replicas(cfg: PipelineConfig) -> Tuple[int, int]:
    """(replicas, maxReplicas) of the worker group: the pods of one training run, and for a sweep (or a
    pipeline, which sweeps) the pods of `tune.max_concurrent_trials` runs at once."""
    per_pod = workers_per_pod(cfg)
    runs = cfg.tune.max_concurrent_trials if cfg.export.job in ("sweep", "pipeline") else 1
    return math.ceil(cfg.scaling.num_workers / per_pod), math.ceil(runs * cfg.scaling.num_workers / per_pod)


def workers_per_pod(cfg: PipelineConfig) -> int:
    """Training workers one worker pod holds: a worker's CPUs (and GPU) cannot span pods."""
    s, ex = cfg.scaling, cfg.export
    require(ex.worker_cpus >= s.cpus_per_worker, "export.worker_cpus",
            f"must hold one training worker (scaling.cpus_per_worker={s.cpus_per_worker}), got {ex.worker_cpus}")
    per_pod = math.floor(ex.worker_cpus / s.cpus_per_worker + 1e-9)  # 0.9 / 0.3 is 2.9999999999999996
    if s.use_gpu:
        require(ex.worker_gpus >= 1, "export.worker_gpus", "must be >= 1 when scaling.use_gpu=true")
        per_pod = min(per_pod, ex.worker_gpus)
    return per_pod


def _pod_template(cfg: PipelineConfig, role: str) -> Dict[str, Any]:
    """Pod template of the head or a worker: the project image, its resources, ports and environment."""
    ex = cfg.export
    cpus, memory = (ex.head_cpus, ex.head_memory) if role == "head" else (ex.worker_cpus, ex.worker_memory)
    resources = {"cpu": str(cpus), "memory": memory}
    if role == "worker" and ex.worker_gpus:
        resources["nvidia.com/gpu"] = str(ex.worker_gpus)
    ports = [{"name": name, "containerPort": port} for name, port in HEAD_PORTS] if role == "head" else []
    container: Dict[str, Any] = {
        "name": f"ray-{role}",
        "image": ex.image,
        # Limits equal to requests: KubeRay sets Ray's num-cpus from the CPU limit, and the pod is Guaranteed.
        "resources": {"requests": resources, "limits": dict(resources)},
        # Serve runs a proxy on every node; KubeRay's serve Service targets the port named "serve".
        "ports": ports + [{"name": "serve", "containerPort": cfg.serve.port}],
    }
    # Serve reads its fast-path switches (HAProxy, direct ingress) when each node's Ray starts.
    container["env"] = [{"name": name, "value": value} for name, value in SERVE_ENV.items()]
    if not ex.token_auth:
        # Said outright: Ray 2.60's `ray start` turns token auth on by itself wherever a token file exists.
        container["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"})
    if ex.env_secret:
        container["envFrom"] = [{"secretRef": {"name": ex.env_secret}}]
    return {"spec": {"containers": [container]}}


class _ManifestDumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2) as YAML block literals a person can read and edit."""


_ManifestDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def _manifest(cfg: PipelineConfig, kind: str, name: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    labels = {"app.kubernetes.io/part-of": "orchestrator"}
    metadata = {"name": name, "namespace": cfg.export.namespace, "labels": labels}
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec}


def validate_manifest(manifest: Dict[str, Any]) -> None:
    """Raise ValueError naming the first place where `manifest` breaks its kind's KubeRay CRD schema."""
    kind = manifest.get("kind")
    require(kind in KINDS, "kind", f"must be one of {list(KINDS)}, got {kind!r}")
    require(manifest.get("apiVersion") == API_VERSION, f"{kind}.apiVersion",
            f"must be {API_VERSION}, got {manifest.get('apiVersion')!r}")
    errors = crd_validator(kind).iter_errors(_without_nulls(manifest))
    errors = sorted(errors, key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        where = ".".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        raise ValueError(f"{kind} breaks the KubeRay CRD schema at {where}: {errors[0].message}")


def _without_nulls(value: Any) -> Any:
    # The API server drops null fields (`metadata:` left empty) before it validates, as if never written.
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


@functools.cache
def crd_validator(kind: str):
    """A jsonschema validator of the `ray.io/v1` `kind` (e.g. 'RayJob') from the CRD in orchestrator/kuberay/crds."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads the 1 MB CRDs 3x faster
    crd = yaml.load((CRD_DIR / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == API_VERSION.split("/")[1]]
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def strict_schema(schema: Any) -> Any:
    """`schema` refusing fields it does not list, wherever it lists fields and does not keep unknown ones.

    Fields with a default are no longer required, since the API server fills them in first. OpenAPI's
    `x-kubernetes-*` keywords stay in place: jsonschema ignores keywords it does not know (list-map keys
    and CEL rules are the API server's to check, not this).
    """
    if not isinstance(schema, dict):
        return schema
    out: Dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = strict_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict_schema(sub) for sub in value]
        else:
            out[key] = value
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "required" in schema:
        # The API server fills in defaults before it validates: a field with a default is never missing.
        properties = schema.get("properties", {})
        out["required"] = [name for name in schema["required"] if "default" not in properties.get(name, {})]
    return out
