"""Application builder for Serve config files: `import_path: serve.app:app_builder`.

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

from ray.serve import Application

from orchestrator.config.schema import PipelineConfig, RegistryConfig, ServeConfig, StorageConfig
from serve.serving import api_key_for_deploy, build_app

REQUIRED_ARGS = ("storage_root", "model", "ref")
NOT_ARGS = ("host", "port", "model_version", "write_config", "block", "app_name")
"""ServeConfig fields a config file sets elsewhere (http_options, the application's name) or that mean nothing here."""


def app_builder(args: Dict[str, Any]) -> Application:
    """Build the app for the registry version named by `args`. Raises ValueError for bad args."""
    cfg = config_from_args(args)
    app = build_app(cfg, str(args["ref"]))
    api_key_for_deploy(cfg, mint=False)  # first start only: the store keeps hashes, a later key could not be shown
    return app


def config_from_args(args: Dict[str, Any]) -> PipelineConfig:
    """The PipelineConfig that `args` describe (validated like any other config)."""
    missing = [key for key in REQUIRED_ARGS if key not in args]
    if missing:
        raise ValueError(f"serve app args are missing {missing} (required: {list(REQUIRED_ARGS)})")
    overrides = {key: value for key, value in args.items() if key not in REQUIRED_ARGS}
    allowed = {f.name for f in dataclasses.fields(ServeConfig)} - set(NOT_ARGS)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown serve app args {unknown}: allowed are {list(REQUIRED_ARGS)} and {sorted(allowed)}")
    return PipelineConfig(
        storage=StorageConfig(root=str(args["storage_root"])),
        registry=RegistryConfig(model_name=str(args["model"])),
        serve=ServeConfig(model_version=str(args["ref"]), **overrides),
    )
