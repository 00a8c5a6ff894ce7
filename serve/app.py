"""Building the Serve application: the serving replicas and the rollout controller bound together
(`build_app`), and the builder Serve config files name (`import_path: serve.app:app_builder`).

    serve run serve/config.yaml                       # from the repository root
    serve deploy serve/config.yaml -a http://127.0.0.1:<dashboard port>

`args` in the config file: storage_root, model, ref (version number, alias or 'latest'), plus any
ServeConfig field (min_replicas, max_batch_size, auth: {enabled: false}, limits: {...}, ...) to
override. Host and port belong to the config file's http_options, not here.
`python -m jobs.deploy serve.write_config=out.yaml` writes such a file for any alias.

With auth on and no key in the store yet, building the app creates one and prints it once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import ray
from ray import serve

from orchestrator.config import PipelineConfig, ServeConfig, to_config
from orchestrator.registry import ModelRegistry, ModelVersion, parse_ref
from serve.auth import api_key_for_deploy, keys_url
from serve.config_file import NOT_ARGS, REQUIRED_ARGS
from serve.controller import RolloutController
from serve.ingress import V2Ingress
from serve.weights import weights_ref


def build_app(cfg: PipelineConfig, ref: str) -> serve.Application:
    """The Serve application with version `ref` (number, alias or 'latest') of
    `cfg.registry.model_name` as the stable version; other registry models are served on demand.

    Needs a connected Ray. Raises RegistryError for an unknown model or ref, IntegrityError when
    the registry files do not match their checksums.
    """
    version = ModelRegistry(cfg.storage.root).get(cfg.registry.model_name, ref)
    return _bind(cfg, version, weights_ref(cfg.storage.root, version, cfg.registry.encryption))


def _bind(cfg: PipelineConfig, version: ModelVersion, ref: ray.ObjectRef) -> serve.Application:
    s = cfg.serve
    # @serve.deployment turns each class into a Deployment at runtime; its annotations keep the class type.
    controller = RolloutController.options(  # type: ignore[attr-defined]
        health_check_period_s=s.health_check_period_s
    ).bind(
        # The alias (or number) alone: the controller applies it to every model it serves, and moves it on promotion.
        root=cfg.storage.root, default_ref=parse_ref(s.model_version).selector, model=version.model,
        version=version.version, weights={"ref": ref}, rollout=s.rollout, encryption=cfg.registry.encryption,
    )
    # One deployment parses, routes and runs the model. It admits more than its queue limit so that
    # it, not the proxy, answers 503 + Retry-After when full.
    replicas = V2Ingress.options(  # type: ignore[attr-defined]
        autoscaling_config={
            "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests, "downscale_delay_s": s.downscale_delay_s,
        },
        max_ongoing_requests=s.limits.max_pending_requests + 32,
        ray_actor_options={"num_cpus": s.replica_cpus}, health_check_period_s=s.health_check_period_s,
        logging_config={"enable_access_log": s.access_log, "log_level": "INFO" if s.access_log else "WARNING"},
    )
    keys = keys_url(cfg.storage.root, s.auth.keys_url) if s.auth.enabled else None
    return replicas.bind(controller, serve_cfg=s, keys=keys)


def app_builder(args: Dict[str, Any]) -> serve.Application:
    """Build the app for the registry version named by `args`. Raises ValueError for bad args."""
    cfg = config_from_args(args)
    app = build_app(cfg, str(args["ref"]))
    api_key_for_deploy(cfg, mint=False)  # first start only: the store keeps hashes, a later key could not be shown
    return app


def config_from_args(args: Dict[str, Any]) -> PipelineConfig:
    """The PipelineConfig that `args` describe, built the one way every config is built (`to_config`):
    nested sections such as `auth: {enabled: false}` merge onto their schema. Raises ValueError for a
    missing argument, an unknown one, or a value the schema refuses."""
    missing = [key for key in REQUIRED_ARGS if key not in args]
    if missing:
        raise ValueError(f"serve app args are missing {missing} (required: {list(REQUIRED_ARGS)})")
    overrides = {key: value for key, value in args.items() if key not in REQUIRED_ARGS}
    allowed = {f.name for f in dataclasses.fields(ServeConfig)} - set(NOT_ARGS)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown serve app args {unknown}: allowed are {list(REQUIRED_ARGS)} and {sorted(allowed)}")
    return to_config({
        "storage": {"root": str(args["storage_root"])},
        "registry": {"model_name": str(args["model"])},
        "serve": {"model_version": str(args["ref"]), **overrides},
    })
