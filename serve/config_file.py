"""Serve config files (the YAML `serve run` / `serve deploy` and a KubeRay RayService accept) for
the app builder `serve.app:app_builder`, and what the builder's `args` may hold.

Light on purpose (no torch, no Ray): writing a config file or a RayService manifest starts nothing.
"""

from typing import Any, Dict

import yaml

from orchestrator.config import PipelineConfig, to_dict

IMPORT_PATH = "serve.app:app_builder"
REQUIRED_ARGS = ("storage_root", "model", "ref")
NOT_ARGS = ("host", "port", "model_version", "write_config", "block", "app_name")
"""ServeConfig fields a config file sets elsewhere (http_options, the application's name) or that mean nothing here."""


def serve_config(cfg: PipelineConfig) -> Dict[str, Any]:
    """A Serve config (the format `serve run` / `serve deploy` accept) deploying
    `cfg.serve.model_version` of `cfg.registry.model_name` through `serve.app:app_builder`."""
    s = cfg.serve
    args = {"storage_root": cfg.storage.root, "model": cfg.registry.model_name, "ref": s.model_version}
    args.update({name: value for name, value in to_dict(s).items() if name not in NOT_ARGS})
    return {
        "http_options": {"host": s.host, "port": s.port},
        "applications": [{"name": s.app_name, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}],
    }


def write_serve_config(cfg: PipelineConfig, path: str) -> str:
    """Write `serve_config(cfg)` as YAML to `path`; the path written."""
    header = ("# Written by `python -m jobs.deploy serve.write_config=...`. Deploy with\n"
              "#   PYTHONPATH=<repository root> serve run <this file>\n"
              "#   serve deploy <this file> -a http://<head>:<dashboard port>\n")
    with open(path, "w") as f:
        f.write(header + yaml.safe_dump(serve_config(cfg), sort_keys=False))
    return path

