"""Serving: registry models behind Ray Serve, spoken to over the Open Inference Protocol v2 (REST).

The application is three deployments:
  V2Ingress          FastAPI front: API keys, validation against the manifest's signature, limits
                     (body size, timeout, queue), routing by name, version, alias and canary split,
                     metrics; bad input is a 4xx JSON error, never a 5xx.
  ModelServer        autoscaled, dynamically batched replicas shared by every model and version
                     (`serve.multiplexed`, model id "<name>:<version>").
  RolloutController  one replica owning the routing table (stable, candidate, split), the admin
                     actions and automatic rollback; ingress replicas sync with it twice a second.

Weights are put once in the object store by a detached `_WeightsHolder` actor per version; every
replica reads that copy zero-copy. A new version reaches running replicas as a new object ref
(a new multiplexed model id): no replica restarts.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the ingress methods
# (a string "Request" in a Serve class-based view is taken for a query parameter).
import asyncio
import dataclasses
import json
import logging
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import ray
import torch
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.auth import SCOPES, Authenticator, KeyStore, keys_url
from orchestrator.config.schema import PipelineConfig, ServeConfig
from serve.protocol import BadRequest, InferRequest, infer_response, parse_infer_request
from orchestrator.registry.store import WEIGHTS, IntegrityError, ModelRegistry, ModelVersion, RegistryError
from serve.rollout import RollbackPolicy, RolloutError, Route, RouteTable
from orchestrator.registry.servable import build_servable
from serve.metrics import BatchMetrics, IngressMetrics

__all__ = [
    "BadRequest", "DeployResult", "InferRequest", "build_app", "check_endpoint", "infer_response",
    "parse_infer_request", "run_deploy", "serve_config", "weights_holder_name", "weights_ref",
]

log = logging.getLogger(__name__)

NAMESPACE = "orchestrator"
MODEL_DEPLOYMENT = "ModelServer"
INGRESS_DEPLOYMENT = "V2Ingress"
CONTROLLER_DEPLOYMENT = "RolloutController"
READY_TIMEOUT_S = 5.0
REPLICA_DEATH_RETRIES = 2
"""Times the ingress sends an infer request again when the model replica holding it died."""
API_KEY_ENV = "ORCHESTRATOR_API_KEY"


def model_id(model: str, version: int) -> str:
    """The multiplexed model id of a version (registry names never hold ':')."""
    return f"{model}:{version}"


def split_model_id(mid: str) -> Tuple[str, int]:
    model, _, version = mid.rpartition(":")
    return model, int(version)


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
# Routing state and admin actions
# ---------------------------------------------------------------------------------------------


def _answer(action: Callable[[], Any]) -> Dict[str, Any]:
    """Run a controller action; errors come back as {"error", "status"} for the ingress to answer
    (an exception crossing a handle would lose its HTTP meaning)."""
    try:
        return {"result": action()}
    except IntegrityError as err:  # before RegistryError, its base: a tampered file is our fault
        return {"error": str(err), "status": 500}
    except RegistryError as err:
        return {"error": str(err), "status": 404}
    except RolloutError as err:
        return {"error": str(err), "status": 409}


@serve.deployment(name=CONTROLLER_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
class RolloutController:
    """The one routing table of the app: which version serves each model's unversioned traffic,
    the canary split, promotion, rollback (by request or by the policy), and the weights refs."""

    def __init__(self, *, root: str, default_ref: str, model: str, version: int, weights: Dict[str, ray.ObjectRef], rollout):
        self._registry = ModelRegistry(root)
        self._root, self._default_ref = root, default_ref
        self._table = RouteTable(RollbackPolicy(rollout))
        self._versions: Dict[Tuple[str, int], ModelVersion] = {}
        self._weights: Dict[Tuple[str, int], ray.ObjectRef] = {}
        # Serve runs sync methods in a thread pool: one lock keeps each step whole.
        self._lock = threading.RLock()
        self._versions[(model, version)] = self._registry.get(model, version)
        self._weights[(model, version)] = weights["ref"]
        self._table.add(model, version)

    def snapshot(self) -> Dict[str, Any]:
        """{"routes": {model: Route fields}, "signatures": {model id: signature}} for the ingress."""
        with self._lock:
            signatures = {model_id(m, v): mv.signature for (m, v), mv in self._versions.items()}
            return {"routes": {m: dataclasses.asdict(r) for m, r in self._table.routes.items()}, "signatures": signatures}

    def sync(self, outcomes: List[Tuple[str, int, bool, float]]) -> Dict[str, Any]:
        """Take an ingress replica's outcomes (for the rollback policy); the current snapshot."""
        with self._lock:
            for event in self._table.report(outcomes):
                log.warning("automatic rollback of %s: %s", event["model"], event["reason"])
        return self.snapshot()

    def serve_model(self, model: str) -> Dict[str, Any]:
        """Start routing `model` (at the default alias, or its latest version without one)."""
        def add():
            with self._lock:
                if model not in self._table.routes:
                    ref = self._default_ref if self._has_ref(model, self._default_ref) else "latest"
                    self._table.add(model, self._load(model, ref).version)
            return self.snapshot()
        return _answer(add)

    def resolve(self, model: str, ref: str) -> Dict[str, Any]:
        """{"version", "signature"} of `ref` (number or alias) of `model`, weights loaded."""
        def find():
            version = self._load(model, ref)
            return {"version": version.version, "signature": version.signature}
        return _answer(find)

    def weights(self, model: str, version: int) -> Dict[str, Any]:
        """{"ref", "manifest"} of a version, for a replica to build it (a ref in a dict stays a ref)."""
        mv = self._load(model, str(version))
        return {"ref": self._weights[(model, mv.version)], "manifest": mv.manifest}

    def start(self, model: str, ref: str, percent: float) -> Dict[str, Any]:
        def act():
            version = self._load(model, ref).version
            with self._lock:
                self._table.start(model, version, percent)
                return self._table.status(model)
        return _answer(act)

    def promote(self, model: str) -> Dict[str, Any]:
        def act():
            with self._lock:
                route = self._table.promote(model)
                self._persist(model, route)
                return self._table.status(model)
        return _answer(act)

    def rollback(self, model: str) -> Dict[str, Any]:
        def act():
            with self._lock:
                had_candidate = self._table.routes[model].candidate is not None if model in self._table.routes else False
                route = self._table.rollback(model, lambda v: self._older(model, v))
                if not had_candidate:
                    self._load(model, str(route.stable))
                    self._persist(model, route)
                return self._table.status(model)
        return _answer(act)

    def status(self, model: str) -> Dict[str, Any]:
        def act():
            with self._lock:
                return self._table.status(model)
        return _answer(act)

    def _load(self, model: str, ref: str) -> ModelVersion:
        number = self._registry.resolve(model, ref)
        with self._lock:
            if (model, number) not in self._versions:
                version = self._registry.get(model, number)
                self._weights[(model, number)] = weights_ref(self._root, version)
                self._versions[(model, number)] = version
            return self._versions[(model, number)]

    def _has_ref(self, model: str, ref: str) -> bool:
        try:
            self._registry.resolve(model, ref)
            return True
        except RegistryError:
            if not self._registry.versions(model):
                raise
            return False

    def _older(self, model: str, version: int) -> Optional[int]:
        return max((v for v in self._registry.versions(model) if v < version), default=None)

    def _persist(self, model: str, route: Route) -> None:
        # Promotion and rollback move the deploy alias too, so the next deploy starts where this one is.
        ref = self._default_ref
        if not ref.isdigit() and ref != "latest":
            self._registry.set_alias(model, ref, route.stable)


# ---------------------------------------------------------------------------------------------
# Model replicas
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """One version as a replica runs it."""

    model: str
    version: int
    forward: Callable[[torch.Tensor], torch.Tensor]
    arrays: Dict[str, np.ndarray]
    """Read-only views into the object store (kept alive as long as the model is loaded)."""
    ref_hex: str


@serve.deployment(name=MODEL_DEPLOYMENT)
class ModelServer:
    """A replica shared by every model and version: loads versions on demand (LRU, at most
    `max_models`), each built by `build_servable` on the shared object-store weights."""

    def __init__(self, controller: DeploymentHandle, *, batching: bool, max_batch_size: int, batch_wait_timeout_s: float, max_models: int):
        torch.set_num_threads(1)  # replicas share the node's cores; intra-op threads would fight
        self._controller = controller
        self._batching = batching
        self._metrics = BatchMetrics()

        async def load_model(mid: str) -> LoadedModel:
            return await self._load(mid)

        # Wrapped here, not decorated on the class, so the LRU size comes from the config.
        self.load_model = serve.multiplexed(max_num_models_per_replica=max_models)(load_model)
        self._predict_batch.set_max_batch_size(max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _load(self, mid: str) -> LoadedModel:
        model, version = split_model_id(mid)
        info = await self._controller.weights.remote(model, version)
        arrays = await info["ref"]  # read-only numpy views into the node's object store
        return LoadedModel(model, version, build_servable(info["manifest"], arrays), arrays, info["ref"].hex())

    async def predict(self, rows: np.ndarray) -> Dict[str, np.ndarray]:
        """Rows [n, F] of the multiplexed model -> {"probabilities": [n, C], "label": [n]}."""
        if self._batching:
            return await self._predict_batch(rows)
        return (await self._run([rows]))[0]

    @serve.batch
    async def _predict_batch(self, batches: List[np.ndarray]) -> List[Dict[str, np.ndarray]]:
        # Serve splits batches by multiplexed model id: every request here is for one version.
        return await self._run(batches)

    async def _run(self, batches: List[np.ndarray]) -> List[Dict[str, np.ndarray]]:
        loaded = await self.load_model(serve.get_multiplexed_model_id())
        x = torch.from_numpy(np.concatenate(batches))
        with torch.inference_mode():
            logits = loaded.forward(x)
        probabilities = torch.softmax(logits, dim=1).numpy()
        self._metrics.record(loaded.model, loaded.version, len(batches))
        splits = np.cumsum([len(rows) for rows in batches])[:-1]
        return [{"probabilities": p, "label": p.argmax(axis=1)} for p in np.split(probabilities, splits)]

    def is_ready(self) -> bool:
        return True

    async def weights_info(self, hold_s: float = 0.0) -> Dict[str, Any]:
        """Which object-store copy this replica runs the multiplexed model on, to show sharing.
        `hold_s` keeps the call in flight, so a burst of calls fills a replica and reaches the others."""
        loaded = await self.load_model(serve.get_multiplexed_model_id())
        await asyncio.sleep(hold_s)
        first = next(iter(loaded.arrays.values()))
        replica = serve.get_replica_context().replica_id.unique_id
        return {"object_ref": loaded.ref_hex, "writeable": bool(first.flags.writeable), "version": loaded.version,
                "replica": replica, "pid": os.getpid()}


# ---------------------------------------------------------------------------------------------
# HTTP front
# ---------------------------------------------------------------------------------------------


api = FastAPI(title="orchestrator: Open Inference Protocol v2")


def _error(err: BadRequest, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers={**err.headers, **(headers or {})})


@api.exception_handler(BadRequest)
async def _bad_request(request: Request, err: BadRequest) -> JSONResponse:
    return _error(err)


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


# Helpers the ingress uses sit above it: @serve.ingress copies the module globals as they are when
# the class is decorated, so a name defined further down would be missing in the replica.


async def _awaited(response) -> Any:
    return await response


def _replica_died(err: BaseException) -> bool:
    """Whether a model call failed because its replica process died or became unreachable.

    A RayTaskError is the replica's own code failing, even one that wraps an actor error (a call
    the replica made to another actor): the replica lived, and sending the request again would
    fail the same way.
    """
    return isinstance(err, RayActorError) and not isinstance(err, RayTaskError)


def _checked(answer: Dict[str, Any]) -> Any:
    if "error" in answer:
        raise BadRequest(answer["status"], answer["error"])
    return answer["result"]


def _rollout_body(raw: bytes) -> Tuple[str, float]:
    """(version ref, percent) of a rollout request body {"version": "3" | 3 | "alias", "percent": 10}."""
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise BadRequest(400, f"body is not valid JSON: {err}") from None
    if not isinstance(body, dict) or "version" not in body:
        raise BadRequest(400, 'body must be {"version": <number or alias>, "percent": <0-100>}')
    version, percent = body["version"], body.get("percent", 10)
    if type(version) not in (int, str) or str(version) == "":
        raise BadRequest(400, f"'version' must be a version number or an alias, got {version!r:.40}")
    if type(percent) not in (int, float) or not 0 <= percent <= 100:
        raise BadRequest(400, f"'percent' must be a number in [0, 100], got {percent!r:.40}")
    return str(version), float(percent)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class V2Ingress:
    """HTTP front of every registry model: KServe Open Inference Protocol v2 (REST) plus /admin."""

    def __init__(self, model_server: DeploymentHandle, controller: DeploymentHandle, *, serve_cfg: ServeConfig, keys: Optional[str], check_model_ready: bool):
        self._model_server, self._controller = model_server, controller
        self._cfg = serve_cfg
        self._auth = Authenticator(KeyStore(keys), serve_cfg.auth.cache_ttl_s) if keys else None
        self._check_model_ready = check_model_ready
        self._routes: Dict[str, Route] = {}
        self._signatures: Dict[str, Dict[str, Any]] = {}
        self._aliases: Dict[Tuple[str, str], Tuple[int, float]] = {}
        self._handles: Dict[str, DeploymentHandle] = {}
        self._outcomes: List[Tuple[str, int, bool, float]] = []
        self._pending = 0
        self._metrics = IngressMetrics()
        self._sync_task: Optional[asyncio.Task] = None

    # -- open routes ---------------------------------------------------------------------------

    @api.get("/v2")
    async def server_metadata(self) -> Dict[str, Any]:
        return {"name": "orchestrator", "version": ray.__version__, "extensions": []}

    @api.get("/v2/health/live")
    async def live(self) -> Dict[str, Any]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self) -> JSONResponse:
        return await self._readiness({"ready": True})

    # -- model routes (scope "infer") ----------------------------------------------------------

    @api.get("/v2/models/{name}")
    async def model_metadata(self, name: str, request: Request) -> Dict[str, Any]:
        self._authorize(request, "infer")
        route = await self._route(name)
        versions = [route.stable] + ([route.candidate] if route.candidate is not None else [])
        return self._metadata(name, versions, self._signatures[model_id(name, route.stable)])

    @api.get("/v2/models/{name}/versions/{version}")
    async def version_metadata(self, name: str, version: str, request: Request) -> Dict[str, Any]:
        self._authorize(request, "infer")
        number, signature = await self._resolve(name, version)
        return self._metadata(name, [number], signature)

    @api.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str, request: Request) -> JSONResponse:
        self._authorize(request, "infer")
        await self._route(name)
        return await self._readiness({"name": name, "ready": True})

    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def version_ready(self, name: str, version: str, request: Request) -> JSONResponse:
        self._authorize(request, "infer")
        await self._resolve(name, version)
        return await self._readiness({"name": name, "version": version, "ready": True})

    @api.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> JSONResponse:
        return await self._infer(name, None, request)

    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def version_infer(self, name: str, version: str, request: Request) -> JSONResponse:
        return await self._infer(name, version, request)

    # -- admin routes (scope "admin") ----------------------------------------------------------

    @api.get("/admin/models/{name}/rollout")
    async def rollout_status(self, name: str, request: Request) -> JSONResponse:
        self._authorize(request, "admin")
        await self._route(name)
        return await self._admin(self._controller.status.remote(name))

    @api.post("/admin/models/{name}/rollout")
    async def rollout_start(self, name: str, request: Request) -> JSONResponse:
        self._authorize(request, "admin")
        version, percent = _rollout_body(await request.body())
        await self._route(name)
        return await self._admin(self._controller.start.remote(name, version, percent))

    @api.post("/admin/models/{name}/promote")
    async def rollout_promote(self, name: str, request: Request) -> JSONResponse:
        self._authorize(request, "admin")
        await self._route(name)
        return await self._admin(self._controller.promote.remote(name))

    @api.post("/admin/models/{name}/rollback")
    async def rollout_rollback(self, name: str, request: Request) -> JSONResponse:
        self._authorize(request, "admin")
        await self._route(name)
        return await self._admin(self._controller.rollback.remote(name))

    # -- internals ----------------------------------------------------------------------------

    def _authorize(self, request: Request, scope: str) -> None:
        if self._auth is not None:
            self._auth.check(request.headers.get("authorization"), scope)

    def _metadata(self, name: str, versions: List[int], signature: Dict[str, Any]) -> Dict[str, Any]:
        return {"name": name, "versions": [str(v) for v in versions], "platform": "pytorch",
                "inputs": signature["inputs"], "outputs": signature["outputs"]}

    async def _readiness(self, body: Dict[str, Any]) -> JSONResponse:
        # With min_replicas=0 a probe must not wake the model replicas: the controller answers alone.
        calls = [self._controller.snapshot.remote()] + ([self._model_server.is_ready.remote()] if self._check_model_ready else [])
        try:
            for call in calls:
                await asyncio.wait_for(_awaited(call), READY_TIMEOUT_S)
        except Exception as err:  # any failure to answer, whatever its kind, means not ready
            return JSONResponse({"error": f"not ready: {type(err).__name__}: {err}"}, status_code=503)
        return JSONResponse(body)

    async def _infer(self, name: str, version: Optional[str], request: Request) -> JSONResponse:
        started = time.perf_counter()
        served: Optional[int] = None
        status = 500
        try:
            self._authorize(request, "infer")
            served, signature = await (self._pick(name) if version is None else self._resolve(name, version))
            body = await self._run_limited(name, served, signature, request)
            status = 200
            return JSONResponse(body, headers=self._served_headers(name, served))
        except BadRequest as err:
            status = err.status
            return _error(err, self._served_headers(name, served))
        except Exception as err:  # the model failed: a server fault, counted against its version
            return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500,
                                headers=self._served_headers(name, served))
        finally:
            self._record(name, served, status, (time.perf_counter() - started) * 1000)

    @staticmethod
    def _served_headers(name: str, served: Optional[int]) -> Dict[str, str]:
        return {"X-Model-Name": name, **({"X-Model-Version": str(served)} if served is not None else {})}

    def _record(self, name: str, served: Optional[int], status: int, latency_ms: float) -> None:
        self._metrics.record(name, served, status, latency_ms)
        if served is not None and status not in (401, 403):
            # Client mistakes say nothing about a version; 5xx (and 504 timeouts) count against it.
            if status < 400 or status >= 500:
                self._outcomes.append((name, served, status < 500, latency_ms))

    async def _run_limited(self, name: str, version: int, signature: Dict[str, Any], request: Request) -> Dict[str, Any]:
        limits = self._cfg.limits
        if self._pending >= limits.max_pending_requests:
            raise BadRequest(503, f"{self._pending} requests are already waiting here; retry in {limits.retry_after_s} s",
                             headers={"Retry-After": str(limits.retry_after_s)})
        self._pending += 1
        try:
            parsed = await self._parse(request, signature)
            result = await self._predict(name, version, parsed.rows)
        finally:
            self._pending -= 1
        return infer_response(model=name, version=version, request_id=parsed.request_id, result=result)

    async def _parse(self, request: Request, signature: Dict[str, Any]) -> InferRequest:
        limits = self._cfg.limits
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:  # refused before reading it
            raise BadRequest(413, f"body of {declared} bytes is larger than serve.limits.max_body_bytes={limits.max_body_bytes}")
        return parse_infer_request(
            await request.body(), signature["input_shape"], self._cfg.max_rows_per_request,
            datatype=signature["inputs"][0]["datatype"], allow_non_finite=limits.allow_non_finite,
            max_body_bytes=limits.max_body_bytes,
        )

    async def _predict(self, name: str, version: int, rows: np.ndarray) -> Dict[str, np.ndarray]:
        """The model's outputs for `rows`. Sent again, at most REPLICA_DEATH_RETRIES times, when the
        replica holding it died; all tries share one serve.limits.request_timeout_s (504 past it)."""
        deadline = time.monotonic() + self._cfg.limits.request_timeout_s
        for _ in range(REPLICA_DEATH_RETRIES):
            try:
                return await self._predict_once(name, version, rows, deadline)
            except Exception as err:
                # Inference is idempotent, so a request lost with its replica is sent again (Serve's
                # router has already dropped that replica); any other failure is the answer.
                if not _replica_died(err):
                    raise
                self._metrics.record_retry(name, version)
                log.warning("model replica died under a request for %s v%d (%s); sending it again", name, version, type(err).__name__)
        return await self._predict_once(name, version, rows, deadline)

    async def _predict_once(self, name: str, version: int, rows: np.ndarray, deadline: float) -> Dict[str, np.ndarray]:
        mid = model_id(name, version)
        if mid not in self._handles:
            self._handles[mid] = self._model_server.options(multiplexed_model_id=mid)
        response = self._handles[mid].predict.remote(rows)
        try:
            return await asyncio.wait_for(_awaited(response), deadline - time.monotonic())
        except asyncio.TimeoutError:
            response.cancel()
            timeout = self._cfg.limits.request_timeout_s
            raise BadRequest(504, f"model {name!r} version {version} did not answer within {timeout} s") from None
        except BackPressureError:
            retry = self._cfg.limits.retry_after_s
            raise BadRequest(503, f"the model replicas are full; retry in {retry} s", headers={"Retry-After": str(retry)}) from None

    async def _pick(self, name: str) -> Tuple[int, Dict[str, Any]]:
        version = (await self._route(name)).pick(random.random())
        return version, self._signatures[model_id(name, version)]

    async def _route(self, name: str) -> Route:
        self._ensure_sync()
        if name not in self._routes:
            self._apply(_checked(await self._controller.serve_model.remote(name)))
        return self._routes[name]

    async def _resolve(self, name: str, ref: str) -> Tuple[int, Dict[str, Any]]:
        # Numbers never change meaning; an alias is trusted for one sync interval.
        cached = self._aliases.get((name, ref))
        if ref.isdigit() and model_id(name, int(ref)) in self._signatures:
            return int(ref), self._signatures[model_id(name, int(ref))]
        if cached is None or cached[1] < time.monotonic():
            found = _checked(await self._controller.resolve.remote(name, ref))
            self._signatures[model_id(name, found["version"])] = found["signature"]
            cached = (found["version"], time.monotonic() + self._cfg.rollout.sync_interval_s)
            self._aliases[(name, ref)] = cached
        return cached[0], self._signatures[model_id(name, cached[0])]

    async def _admin(self, call) -> JSONResponse:
        status = _checked(await call)
        self._apply(await self._controller.snapshot.remote())  # this replica sees its own change at once
        return JSONResponse(status)

    def _apply(self, snapshot: Dict[str, Any]) -> None:
        self._routes = {m: Route(**r) for m, r in snapshot["routes"].items()}
        self._signatures.update(snapshot["signatures"])

    def _ensure_sync(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        while True:
            outcomes, self._outcomes = self._outcomes, []
            try:
                self._apply(await self._controller.sync.remote(outcomes))
            except Exception as err:  # keep serving on the last table; the next round retries
                log.warning("routing sync failed: %s: %s", type(err).__name__, err)
            await asyncio.sleep(self._cfg.rollout.sync_interval_s)


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
    api_key: Optional[str] = None
    """A key to send as `Authorization: Bearer`, or None with serve.auth.enabled=false."""


def build_app(cfg: PipelineConfig, ref: str) -> serve.Application:
    """The Serve application with version `ref` (number, alias or 'latest') of
    `cfg.registry.model_name` as the stable version; other registry models are served on demand.

    Needs a connected Ray. Raises RegistryError for an unknown model or ref, IntegrityError when
    the registry files do not match their checksums.
    """
    version = ModelRegistry(cfg.storage.root).get(cfg.registry.model_name, ref)
    return _bind(cfg, version, weights_ref(cfg.storage.root, version))


def _bind(cfg: PipelineConfig, version: ModelVersion, ref: ray.ObjectRef) -> serve.Application:
    s = cfg.serve
    controller = RolloutController.options(health_check_period_s=s.health_check_period_s).bind(
        root=cfg.storage.root, default_ref=s.model_version, model=version.model, version=version.version,
        weights={"ref": ref}, rollout=s.rollout,
    )
    # A replica never batches more requests than it may hold at once: leave room for a full batch.
    per_replica = max(s.max_batch_size, int(np.ceil(s.target_ongoing_requests)))
    model_server = ModelServer.options(
        autoscaling_config={
            "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests, "downscale_delay_s": s.downscale_delay_s,
        },
        max_ongoing_requests=per_replica, max_queued_requests=s.limits.max_pending_requests,
        ray_actor_options={"num_cpus": s.replica_cpus}, health_check_period_s=s.health_check_period_s,
    ).bind(
        controller, batching=s.batching, max_batch_size=s.max_batch_size,
        batch_wait_timeout_s=s.batch_wait_timeout_s, max_models=s.max_models_per_replica,
    )
    # The ingress admits more than its queue limit so that it, not the proxy, answers 503 + Retry-After.
    ingress = V2Ingress.options(num_replicas=s.ingress_replicas, max_ongoing_requests=s.limits.max_pending_requests + 32,
                                health_check_period_s=s.health_check_period_s)
    keys = keys_url(cfg.storage.root, s.auth.keys_url) if s.auth.enabled else None
    return ingress.bind(model_server, controller, serve_cfg=s, keys=keys, check_model_ready=s.min_replicas > 0)


def run_deploy(cfg: PipelineConfig, ref: Optional[str] = None, *, ready_timeout_s: float = 120.0) -> DeployResult:
    """Deploy version `ref` (default `cfg.serve.model_version`) as Serve app `cfg.serve.app_name` on
    `cfg.serve.host:port`, and wait until its /v2/health/ready answers 200.

    With auth on, the result carries a key (`api_key_for_deploy`). Assumes Ray is connected
    (`orchestrator.runtime.ensure_ray`). Raises RegistryError or IntegrityError as `build_app`
    does, TimeoutError when the app is not ready in time.
    """
    model = cfg.registry.model_name
    # Resolve an alias once, so the app and the result name the same version even if it moves.
    number = ModelRegistry(cfg.storage.root).resolve(model, ref or cfg.serve.model_version)
    app = build_app(cfg, str(number))
    api_key = api_key_for_deploy(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=cfg.serve.app_name, route_prefix="/")
    base_url = f"http://{_client_host(cfg.serve.host)}:{cfg.serve.port}"
    _wait_until_ready(base_url, ready_timeout_s)
    return DeployResult(model=model, version=number, endpoint=f"{base_url}/v2/models/{model}", base_url=base_url, api_key=api_key)


def api_key_for_deploy(cfg: PipelineConfig, *, mint: bool = True) -> Optional[str]:
    """The key a deployment reports: $ORCHESTRATOR_API_KEY if set; else, at first start (no
    active key in the store), a new key with every scope, printed once; else, when `mint`, a new
    'infer' key (the store keeps hashes only, so an older key cannot be handed back). None with
    auth off, after a warning."""
    if not cfg.serve.auth.enabled:
        log.warning("serve.auth.enabled=false: every model and admin route answers without an API key")
        return None
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    store = KeyStore(keys_url(cfg.storage.root, cfg.serve.auth.keys_url))
    if not store.has_active_keys():
        key, record = store.create("default", SCOPES)
        print(f"Created API key {record.id} with scopes {list(record.scopes)} (shown once, stored hashed in {store.url}):\n"
              f"    {key}\nSend it as 'Authorization: Bearer <key>'. Manage keys with `python -m jobs.keys`.", file=sys.stderr, flush=True)
        return key
    if not mint:
        return None
    key, record = store.create(f"deploy:{cfg.serve.app_name}", ["infer"])
    log.info("created 'infer' API key %s for this deployment (revoke with `python -m jobs.keys revoke %s`)", record.id, record.id)
    return key


def serve_config(cfg: PipelineConfig) -> Dict[str, Any]:
    """A Serve config (the format `serve run` / `serve deploy` accept) deploying
    `cfg.serve.model_version` of `cfg.registry.model_name` through `serve.app:app_builder`."""
    s = cfg.serve
    skip = {"host", "port", "model_version", "write_config", "block", "app_name"}
    args = {"storage_root": cfg.storage.root, "model": cfg.registry.model_name, "ref": s.model_version}
    args.update({f.name: _plain(getattr(s, f.name)) for f in dataclasses.fields(s) if f.name not in skip})
    return {
        "http_options": {"host": s.host, "port": s.port},
        "applications": [{"name": s.app_name, "route_prefix": "/", "import_path": "serve.app:app_builder", "args": args}],
    }


def write_serve_config(cfg: PipelineConfig, path: str) -> str:
    """Write `serve_config(cfg)` as YAML to `path`; the path written."""
    header = ("# Written by `python -m jobs.deploy serve.write_config=...`. Deploy with\n"
              "#   PYTHONPATH=<repository root> serve run <this file>\n"
              "#   serve deploy <this file> -a http://<head>:<dashboard port>\n")
    with open(path, "w") as f:
        f.write(header + yaml.safe_dump(serve_config(cfg), sort_keys=False))
    return path


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _client_host(host: str) -> str:
    # A proxy bound to every interface is reached through loopback from this machine.
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _wait_until_ready(base_url: str, timeout_s: float) -> None:
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


def http_json(method: str, url: str, body: Optional[Dict[str, Any]] = None, *, api_key: Optional[str] = None, timeout_s: float = 30.0):
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


def check_endpoint(result: DeployResult, features: np.ndarray) -> Dict[str, Any]:
    """POST `features` (one row per sample) to the deployed infer route with the result's key;
    the parsed v2 response. Raises RuntimeError when the endpoint answers anything but 200."""
    rows = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    body = {"id": "check_endpoint", "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
    status, payload = http_json("POST", f"{result.endpoint}/infer", body, api_key=result.api_key)
    if status != 200:
        raise RuntimeError(f"POST {result.endpoint}/infer answered {status}: {payload}")
    return payload
