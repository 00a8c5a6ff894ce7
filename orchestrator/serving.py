"""Serving: a registry version behind Ray Serve, spoken to over the Open Inference Protocol v2 (REST).

The application is two deployments:
  V2Ingress    FastAPI front: parses and validates every request itself, so bad input is a 4xx JSON
               error and never a 5xx; answers health, metadata and infer routes.
  ModelServer  autoscaled, dynamically batched replicas running the model on weights they share.

Weights are put once in the object store by a detached `_WeightsHolder` actor and every replica
reads that copy zero-copy (see `weights_ref`).
"""

# No `from __future__ import annotations`: FastAPI must see real types on the ingress methods
# (a string "Request" in a Serve class-based view is taken for a query parameter).
import asyncio
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.config import PipelineConfig, ServeConfig
from orchestrator.registry import WEIGHTS, ModelRegistry, ModelVersion
from orchestrator.servable import build_servable

NAMESPACE = "orchestrator"
MODEL_DEPLOYMENT = "ModelServer"
INGRESS_DEPLOYMENT = "V2Ingress"
READY_TIMEOUT_S = 5.0
_JSON_TYPES = {str: "a string", type(None): "null", bool: "a boolean", dict: "an object", list: "an array"}


# ---------------------------------------------------------------------------------------------
# Request validation (pure: no Ray, no HTTP)
# ---------------------------------------------------------------------------------------------


class BadRequest(Exception):
    """A client error: `status` is the HTTP status (4xx) and `message` says what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, kw_only=True)
class InferRequest:
    """A validated v2 infer request."""

    rows: np.ndarray
    """float32 [N, features], finite."""
    request_id: Optional[str]
    """The request's "id", echoed in the response."""


def parse_infer_request(body: bytes, input_shape: Sequence[int], max_rows: int) -> InferRequest:
    """Parse and validate a v2 infer body for a model taking samples of `input_shape`.

    Accepts one FP32 input whose shape is [N, F], [N, *input_shape] or [F] (one row), F being the
    feature count, with data flat or nested to match the shape. Raises BadRequest (400, or 413 for
    more than `max_rows` rows or an oversized body) naming what is wrong.
    """
    features = int(np.prod(input_shape))
    if len(body) > _max_body_bytes(features, max_rows):
        raise BadRequest(413, f"body of {len(body)} bytes is larger than {max_rows} rows of {features} numbers can be")
    payload = _load_json(body)
    tensor = _single_input(payload)
    shape = _checked_shape(tensor["shape"])
    rows = _row_count(shape, input_shape)
    if rows > max_rows:
        raise BadRequest(413, f"{rows} rows in one request; at most {max_rows} are accepted")
    if tensor["datatype"] != "FP32":
        raise BadRequest(400, f"datatype {tensor['datatype']!r} is not supported: this model takes 'FP32'")
    values = _finite_float32(_flat_numbers(tensor["data"], shape))
    return InferRequest(rows=values.reshape(rows, features), request_id=_request_id(payload))


def _max_body_bytes(features: int, max_rows: int) -> int:
    # A JSON number rarely needs more than ~25 characters; 64 leaves room for nesting and
    # whitespace while still refusing a body that could never hold a valid request.
    return max_rows * features * 64 + 65536


def _reject_constant(name: str) -> None:
    raise BadRequest(400, f"{name} is not a number this server accepts: send finite numbers")


def _load_json(body: bytes) -> Dict[str, Any]:
    try:
        # json.loads accepts NaN and Infinity, which are not JSON: parse_constant rejects them.
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(400, f"body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, f"body must be a JSON object with 'inputs', got {_json_type(payload)}")
    return payload


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "a number")


def _single_input(payload: Dict[str, Any]) -> Dict[str, Any]:
    if "inputs" not in payload:
        raise BadRequest(400, "body has no 'inputs'")
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(400, f"'inputs' must be a non-empty array, got {_json_type(inputs)}")
    if len(inputs) != 1:
        raise BadRequest(400, f"this model takes exactly one input, got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise BadRequest(400, f"inputs[0] must be an object, got {_json_type(tensor)}")
    missing = [key for key in ("name", "shape", "datatype", "data") if key not in tensor]
    if missing:
        raise BadRequest(400, f"inputs[0] is missing {', '.join(repr(k) for k in missing)}")
    if not isinstance(tensor["name"], str) or not tensor["name"]:
        raise BadRequest(400, "inputs[0].name must be a non-empty string")
    return tensor


def _checked_shape(shape: Any) -> List[int]:
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise BadRequest(400, f"inputs[0].shape must be a non-empty array of positive integers, got {shape!r:.80}")
    return shape


def _row_count(shape: List[int], input_shape: Sequence[int]) -> int:
    features = int(np.prod(input_shape))
    if shape == [features]:
        return 1
    if len(shape) >= 2 and shape[1:] in ([features], list(input_shape)):
        return shape[0]
    raise BadRequest(
        400, f"shape {shape} does not fit this model: send [N, {features}], [N, *{list(input_shape)}] or [{features}] for one row"
    )


def _flat_numbers(data: Any, shape: List[int]) -> list:
    if not isinstance(data, list):
        raise BadRequest(400, f"inputs[0].data must be an array of numbers, got {_json_type(data)}")
    if any(isinstance(v, list) for v in data):
        flat: list = []
        _flatten_nested(data, shape, flat)
    else:
        _check_numbers(data)
        flat = data
    needed = math.prod(shape)
    if len(flat) != needed:
        raise BadRequest(400, f"inputs[0].data holds {len(flat)} numbers but shape {shape} needs {needed}")
    return flat


def _flatten_nested(data: list, shape: List[int], out: list) -> None:
    if len(data) != shape[0]:
        raise BadRequest(400, f"nested inputs[0].data must match shape {shape}: found {len(data)} items where {shape[0]} were expected")
    if len(shape) == 1:
        _check_numbers(data)
        out.extend(data)
        return
    for item in data:
        if not isinstance(item, list):
            raise BadRequest(400, f"nested inputs[0].data must match its shape: found {_json_type(item)} where an array was expected")
        _flatten_nested(item, shape[1:], out)


def _check_numbers(values: list) -> None:
    # `type(v) in` rather than isinstance: JSON true/false arrive as bool, a subclass of int.
    for value in values:
        if type(value) not in (int, float):
            raise BadRequest(400, f"inputs[0].data must hold only numbers, found {_json_type(value)} {json.dumps(value):.40}")


def _finite_float32(values: list) -> np.ndarray:
    try:
        with np.errstate(over="ignore"):  # overflow becomes inf, rejected below with a clear message
            array = np.asarray(values, dtype=np.float32)
    except OverflowError:  # an integer too large for any float
        array = np.array([np.inf], dtype=np.float32)
    if not np.isfinite(array).all():
        raise BadRequest(400, "inputs[0].data must hold finite FP32 numbers (no NaN, Infinity or values beyond 3.4e38)")
    return array


def _request_id(payload: Dict[str, Any]) -> Optional[str]:
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(400, f"'id' must be a string, got {_json_type(request_id)}")
    return request_id


def infer_response(*, model: str, version: int, request_id: Optional[str], result: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """The v2 infer response body for `result` = {"probabilities": [N, C], "label": [N]}."""
    probabilities, labels = result["probabilities"], result["label"]
    body: Dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = [
        {"name": "probabilities", "shape": list(probabilities.shape), "datatype": "FP32", "data": probabilities.ravel().tolist()},
        {"name": "label", "shape": [len(labels)], "datatype": "INT64", "data": labels.tolist()},
    ]
    return body


# ---------------------------------------------------------------------------------------------
# Deployments
# ---------------------------------------------------------------------------------------------


@serve.deployment(name=MODEL_DEPLOYMENT)
class ModelServer:
    """One replica: the manifest's model built on the meta device, run on the shared weights."""

    def __init__(
        self, *, weights: Dict[str, ray.ObjectRef], manifest: Dict[str, Any], version: int,
        max_batch_size: int, batch_wait_timeout_s: float,
    ):
        torch.set_num_threads(1)  # replicas share the node's cores; intra-op threads would fight
        ref = weights["ref"]  # wrapped in a dict so Serve hands over the ref, not a private copy
        self._ref_hex = ref.hex()
        self._version = version
        self._arrays = ray.get(ref)  # read-only numpy views into the node's object store
        self._forward = build_servable(manifest, self._arrays)
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def predict(self, batches: List[np.ndarray]) -> List[Dict[str, np.ndarray]]:
        """Rows [n_i, F] of each batched request -> {"probabilities": [n_i, C], "label": [n_i]} for each."""
        x = torch.from_numpy(np.concatenate(batches))
        with torch.inference_mode():
            logits = self._forward(x)
        probabilities = torch.softmax(logits, dim=1).numpy()
        splits = np.cumsum([len(rows) for rows in batches])[:-1]
        return [{"probabilities": p, "label": p.argmax(axis=1)} for p in np.split(probabilities, splits)]

    def is_ready(self) -> bool:
        return True

    def weights_info(self) -> Dict[str, Any]:
        """Which object-store copy this replica runs on, to show that replicas share one."""
        first = next(iter(self._arrays.values()))
        replica = serve.get_replica_context().replica_id.unique_id
        return {"object_ref": self._ref_hex, "writeable": bool(first.flags.writeable), "version": self._version, "replica": replica}


api = FastAPI(title="orchestrator: Open Inference Protocol v2")


@api.exception_handler(BadRequest)
async def _bad_request(request: Request, err: BadRequest) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    # Unknown routes (404) and wrong methods (405) come from the router, before any endpoint runs.
    message = f"{err.detail}: {request.method} {request.url.path}"
    return JSONResponse({"error": message}, status_code=err.status_code, headers=err.headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": f"invalid request: {err.errors()}"}, status_code=400)


@api.exception_handler(Exception)
async def _server_error(request: Request, err: Exception) -> JSONResponse:
    # Client errors never get here (they are BadRequest); this is a fault of the server or model.
    return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class V2Ingress:
    """HTTP front of one model version: KServe Open Inference Protocol v2 (REST)."""

    def __init__(self, model_server: DeploymentHandle, *, model: str, version: int, signature: Dict[str, Any], max_rows: int):
        self._model_server = model_server
        self._model = model
        self._version = version
        self._signature = signature
        self._max_rows = max_rows

    @api.get("/v2")
    async def server_metadata(self) -> Dict[str, Any]:
        return {"name": "orchestrator", "version": ray.__version__, "extensions": []}

    @api.get("/v2/health/live")
    async def live(self) -> Dict[str, Any]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self) -> JSONResponse:
        return await self._readiness({"ready": True})

    @api.get("/v2/models/{name}")
    async def model_metadata(self, name: str) -> Dict[str, Any]:
        return self._metadata(name, None)

    @api.get("/v2/models/{name}/versions/{version}")
    async def version_metadata(self, name: str, version: str) -> Dict[str, Any]:
        return self._metadata(name, version)

    @api.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str) -> JSONResponse:
        self._check_model(name, None)
        return await self._readiness({"name": name, "ready": True})

    @api.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> JSONResponse:
        return await self._infer(name, None, request)

    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def version_infer(self, name: str, version: str, request: Request) -> JSONResponse:
        return await self._infer(name, version, request)

    def _check_model(self, name: str, version: Optional[str]) -> None:
        if name != self._model:
            raise BadRequest(404, f"unknown model {name!r}: this server serves {self._model!r}")
        if version is not None and version != str(self._version):
            raise BadRequest(404, f"model {name!r} has no served version {version!r}: serving version {self._version}")

    def _metadata(self, name: str, version: Optional[str]) -> Dict[str, Any]:
        self._check_model(name, version)
        return {
            "name": self._model, "versions": [str(self._version)], "platform": "pytorch",
            "inputs": self._signature["inputs"], "outputs": self._signature["outputs"],
        }

    async def _readiness(self, body: Dict[str, Any]) -> JSONResponse:
        try:
            await asyncio.wait_for(self._model_server.is_ready.remote(), READY_TIMEOUT_S)
        except Exception as err:  # any failure to answer, whatever its kind, means not ready
            return JSONResponse({"error": f"model deployment not ready: {type(err).__name__}: {err}"}, status_code=503)
        return JSONResponse(body)

    async def _infer(self, name: str, version: Optional[str], request: Request) -> JSONResponse:
        self._check_model(name, version)
        parsed = parse_infer_request(await request.body(), self._signature["input_shape"], self._max_rows)
        result = await self._model_server.predict.remote(parsed.rows)
        body = infer_response(model=self._model, version=self._version, request_id=parsed.request_id, result=result)
        return JSONResponse(body, headers={"X-Model-Version": str(self._version)})


# ---------------------------------------------------------------------------------------------
# Weights in the object store
# ---------------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class _WeightsHolder:
    """Owns the object-store copy of one version's weights for as long as it lives.

    An object lives only as long as its owner. A ref put by a `serve deploy` build task, or by a
    driver that exits after deploying, would die with it; this detached actor outlives both.
    """

    def __init__(self):
        self._ref: Optional[ray.ObjectRef] = None

    def load(self, root: str, model: str, version: int) -> Dict[str, ray.ObjectRef]:
        # Verify on every call, not only the first: a build must fail on a tampered file even
        # when an earlier, verified copy is already held.
        _, weights = ModelRegistry(root).load(model, version)
        if self._ref is None:
            self._ref = ray.put(weights)
        return {"ref": self._ref}  # in a dict so the caller receives the ref, not the arrays

    def holds_weights(self) -> bool:
        return self._ref is not None


def weights_holder_name(version: ModelVersion) -> str:
    """Name of the detached actor holding `version`'s weights (namespace "orchestrator").

    The weights digest is part of the name: two registries that both have a 'v1' of a model
    never share a holder unless their weights are identical.
    """
    return f"weights:{version.model}:v{version.version}:{version.manifest['files'][WEIGHTS][:12]}"


def weights_ref(root: str, version: ModelVersion) -> ray.ObjectRef:
    """The shared object-store copy of `version`'s weights, verified against the registry.

    Raises IntegrityError when the registry files do not match their checksums.
    """
    holder = _WeightsHolder.options(
        name=weights_holder_name(version), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        # Next to the caller, which can read the storage root (a local root may exist only there).
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
    ).remote()
    try:
        return ray.get(holder.load.remote(root, version.model, version.version))["ref"]
    except ray.exceptions.RayTaskError as err:
        if not ray.get(holder.holds_weights.remote()):
            ray.kill(holder)  # an empty holder would only keep a process alive
        raise err.cause from None


# ---------------------------------------------------------------------------------------------
# Building and deploying
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeployResult:
    """Where a deployed version answers."""

    model: str
    version: int
    endpoint: str
    """f"{base_url}/v2/models/{model}"."""
    base_url: str
    """http://host:port of the Serve proxy, as a client on this machine reaches it."""


def build_app(cfg: PipelineConfig, ref: str) -> serve.Application:
    """The Serve application for version `ref` (number, alias or 'latest') of `cfg.registry.model_name`.

    Needs a connected Ray. Raises RegistryError for an unknown model or ref, IntegrityError when
    the registry files do not match their checksums.
    """
    version = ModelRegistry(cfg.storage.root).get(cfg.registry.model_name, ref)
    return _bind(cfg.serve, version, weights_ref(cfg.storage.root, version))


def _bind(serve_cfg: ServeConfig, version: ModelVersion, ref: ray.ObjectRef) -> serve.Application:
    # A replica never batches more requests than it may hold at once: leave room for a full batch.
    per_replica = max(serve_cfg.max_batch_size, math.ceil(serve_cfg.target_ongoing_requests))
    model_server = ModelServer.options(
        autoscaling_config={
            "min_replicas": serve_cfg.min_replicas, "max_replicas": serve_cfg.max_replicas,
            "target_ongoing_requests": serve_cfg.target_ongoing_requests,
        },
        max_ongoing_requests=per_replica,
        ray_actor_options={"num_cpus": serve_cfg.replica_cpus},
    ).bind(
        weights={"ref": ref}, manifest=version.manifest, version=version.version,
        max_batch_size=serve_cfg.max_batch_size, batch_wait_timeout_s=serve_cfg.batch_wait_timeout_s,
    )
    # The single ingress only awaits the model: it must admit enough requests to fill every replica.
    ingress = V2Ingress.options(max_ongoing_requests=per_replica * serve_cfg.max_replicas)
    return ingress.bind(
        model_server, model=version.model, version=version.version, signature=version.signature,
        max_rows=serve_cfg.max_rows_per_request,
    )


def run_deploy(cfg: PipelineConfig, ref: Optional[str] = None, *, ready_timeout_s: float = 120.0) -> DeployResult:
    """Deploy version `ref` (default `cfg.serve.model_version`) as Serve app `cfg.serve.app_name` on
    `cfg.serve.host:port`, and wait until its /v2/health/ready answers 200.

    Assumes Ray is connected (`orchestrator.runtime.ensure_ray`). Raises RegistryError or
    IntegrityError as `build_app` does, TimeoutError when the app is not ready in time.
    """
    model = cfg.registry.model_name
    # Resolve an alias once, so the app and the result name the same version even if it moves.
    number = ModelRegistry(cfg.storage.root).resolve(model, ref or cfg.serve.model_version)
    app = build_app(cfg, str(number))
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=cfg.serve.app_name, route_prefix="/")
    base_url = f"http://{_client_host(cfg.serve.host)}:{cfg.serve.port}"
    _wait_until_ready(base_url, ready_timeout_s)
    return DeployResult(model=model, version=number, endpoint=f"{base_url}/v2/models/{model}", base_url=base_url)


def _client_host(host: str) -> str:
    # A proxy bound to every interface is reached through loopback from this machine.
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _wait_until_ready(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, _ = _http_json("GET", f"{base_url}/v2/health/ready")
            if status == 200:
                return
        except OSError:  # the proxy may not listen yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}/v2/health/ready did not answer 200 within {timeout_s} s")
        time.sleep(0.25)


def _http_json(method: str, url: str, body: Optional[Dict[str, Any]] = None, *, timeout_s: float = 30.0):
    """(status, body parsed as JSON, or its text where it is not JSON) of one HTTP request."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
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


def check_endpoint(result: DeployResult, features: np.ndarray) -> Dict[str, Any]:
    """POST `features` (one row per sample) to the deployed infer route; the parsed v2 response.

    Raises RuntimeError when the endpoint answers anything but 200.
    """
    rows = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    body = {"id": "check_endpoint", "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
    status, payload = _http_json("POST", f"{result.endpoint}/infer", body)
    if status != 200:
        raise RuntimeError(f"POST {result.endpoint}/infer answered {status}: {payload}")
    return payload
