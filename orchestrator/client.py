"""A small HTTP client of a deployed app: JSON requests, the readiness poll, the endpoint check.

Standard library and numpy only (no torch, no Ray): jobs that only talk to a running deployment,
such as `jobs.rollout`, start fast and run anywhere.
"""

import json
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Optional, Protocol, Tuple

import numpy as np

API_KEY_ENV = "ORCHESTRATOR_API_KEY"
"""Environment variable holding the API key that clients and deployments use."""


class Endpoint(Protocol):
    """Where a model answers: what `check_endpoint` needs (serve.deploy.DeployResult is one)."""

    @property
    def endpoint(self) -> str:
        """f"{base_url}/v2/models/{model}"."""
        ...

    @property
    def api_key(self) -> Optional[str]:
        """The key to send as `Authorization: Bearer`, or None without auth."""
        ...


def http_json(
    method: str, url: str, body: Optional[Dict[str, Any]] = None, *, api_key: Optional[str] = None,
    timeout_s: float = 30.0,
) -> Tuple[int, Any]:
    """(status, body parsed as JSON, or its text where it is not JSON) of one HTTP request."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, _json_or_text(response.read())
    except urllib.error.HTTPError as err:
        return err.code, _json_or_text(err.read())


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # e.g. the proxy's own plain-text errors
        return raw.decode(errors="replace")


def wait_until_ready(base_url: str, timeout_s: float) -> None:
    """Poll `base_url`/v2/health/ready until it answers 200. Raises TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, _ = http_json("GET", f"{base_url}/v2/health/ready")
            if status == 200:
                return
        except OSError:  # the proxy may not listen yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}/v2/health/ready did not answer 200 within {timeout_s} s")
        time.sleep(0.25)


def check_endpoint(deployment: Endpoint, features: np.ndarray) -> Dict[str, Any]:
    """POST `features` (one row per sample) to the deployment's infer route with its key; the
    parsed v2 response. Raises RuntimeError when the endpoint answers anything but 200."""
    rows = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
    status, payload = http_json("POST", f"{deployment.endpoint}/infer", {"id": "check_endpoint", "inputs": [tensor]},
                                api_key=deployment.api_key)
    if status != 200:
        raise RuntimeError(f"POST {deployment.endpoint}/infer answered {status}: {payload}")
    return payload
