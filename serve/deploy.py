"""Deploying a registry version as a Serve app on the connected Ray, and where it then answers."""

from dataclasses import dataclass
from typing import Optional

from ray import serve

from orchestrator.client import wait_until_ready
from orchestrator.config import PipelineConfig
from orchestrator.registry import ModelRegistry
from serve.app import build_app
from serve.auth import api_key_for_deploy


@dataclass(frozen=True, kw_only=True)
class DeployResult:
    """Where a deployed version answers."""

    model: str
    version: int
    endpoint: str
    """f"{base_url}/v2/models/{model}"."""
    base_url: str
    """http://host:port of the Serve proxy, as a client on this machine reaches it."""
    api_key: Optional[str] = None
    """A key to send as `Authorization: Bearer`, or None with serve.auth.enabled=false."""


def run_deploy(cfg: PipelineConfig, ref: Optional[str] = None, *, ready_timeout_s: float = 120.0) -> DeployResult:
    """Deploy version `ref` (default `cfg.serve.model_version`) as Serve app `cfg.serve.app_name` on
    `cfg.serve.host:port`, and wait until its /v2/health/ready answers 200.

    With auth on, the result carries a key (`serve.auth.api_key_for_deploy`). Assumes Ray is
    connected (`orchestrator.runtime.ensure_ray`). Raises RegistryError or IntegrityError as
    `build_app` does, TimeoutError when the app is not ready in time.
    """
    model = cfg.registry.model_name
    # Resolve an alias once, so the app and the result name the same version even if it moves.
    number = ModelRegistry(cfg.storage.root).resolve(model, ref or cfg.serve.model_version)
    app = build_app(cfg, str(number))
    api_key = api_key_for_deploy(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=cfg.serve.app_name, route_prefix="/")
    base_url = f"http://{_client_host(cfg.serve.host)}:{cfg.serve.port}"
    wait_until_ready(base_url, ready_timeout_s)
    return DeployResult(model=model, version=number, endpoint=f"{base_url}/v2/models/{model}", base_url=base_url,
                        api_key=api_key)


def _client_host(host: str) -> str:
    # A proxy bound to every interface is reached through loopback from this machine.
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
