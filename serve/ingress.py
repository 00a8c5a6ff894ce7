"""The HTTP front of every registry model: KServe Open Inference Protocol v2 (REST) plus /admin.

API keys, validation against the manifest's signature, limits (body size, timeout, queue), routing
by name, version, alias and canary split, metrics; bad input is a 4xx JSON error, never a 5xx.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the ingress methods
# (a string "Request" in a Serve class-based view is taken for a query parameter).
import asyncio
import logging
import random
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from orchestrator.config import ServeConfig
from serve.auth import Authenticator, KeyStore
from serve.calls import READY_TIMEOUT_S, REPLICA_DEATH_RETRIES, awaited, from_answer, replica_died
from serve.errors import EXCEPTION_HANDLERS, error_response
from serve.metrics import IngressMetrics
from serve.names import INGRESS_DEPLOYMENT, model_id
from serve.protocol import BadRequest, InferRequest, infer_response, parse_infer_request, parse_rollout_body
from serve.rollout import Route

# The ingress methods use imported names only (and `log`), never a helper of this module:
# @serve.ingress copies the class and `api` when it decorates the class, with the module's globals
# as they are at that moment, and replicas run that copy.

log = logging.getLogger(__name__)


def build_api() -> FastAPI:
    """A FastAPI app with the app's error handlers, for the ingress class to add its routes to."""
    return FastAPI(title="orchestrator: Open Inference Protocol v2", exception_handlers=EXCEPTION_HANDLERS)


api = build_api()
"""The ingress's FastAPI app: complete before the class below decorates its methods with its routes."""


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class V2Ingress:
    """HTTP front of every registry model: KServe Open Inference Protocol v2 (REST) plus /admin."""

    def __init__(self, model_server: DeploymentHandle, controller: DeploymentHandle, *, serve_cfg: ServeConfig,
                 keys: Optional[str], check_model_ready: bool):
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
        version, percent = parse_rollout_body(await request.body())
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
        calls = [self._controller.snapshot.remote()]
        if self._check_model_ready:
            calls.append(self._model_server.is_ready.remote())
        try:
            for call in calls:
                await asyncio.wait_for(awaited(call), READY_TIMEOUT_S)
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
            return error_response(err, self._served_headers(name, served))
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

    async def _run_limited(
        self, name: str, version: int, signature: Dict[str, Any], request: Request,
    ) -> Dict[str, Any]:
        limits = self._cfg.limits
        if self._pending >= limits.max_pending_requests:
            raise BadRequest(503,
                             f"{self._pending} requests are already waiting here; retry in {limits.retry_after_s} s",
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
            raise BadRequest(413, f"body of {declared} bytes is larger than "
                                  f"serve.limits.max_body_bytes={limits.max_body_bytes}")
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
                if not replica_died(err):
                    raise
                self._metrics.record_retry(name, version)
                log.warning("model replica died under a request for %s v%d (%s); sending it again",
                            name, version, type(err).__name__)
        return await self._predict_once(name, version, rows, deadline)

    async def _predict_once(self, name: str, version: int, rows: np.ndarray, deadline: float) -> Dict[str, np.ndarray]:
        mid = model_id(name, version)
        if mid not in self._handles:
            self._handles[mid] = self._model_server.options(multiplexed_model_id=mid)
        response = self._handles[mid].predict.remote(rows)
        try:
            return await asyncio.wait_for(awaited(response), deadline - time.monotonic())
        except asyncio.TimeoutError:
            response.cancel()
            timeout = self._cfg.limits.request_timeout_s
            raise BadRequest(504, f"model {name!r} version {version} did not answer within {timeout} s") from None
        except BackPressureError:
            retry = self._cfg.limits.retry_after_s
            raise BadRequest(503, f"the model replicas are full; retry in {retry} s",
                             headers={"Retry-After": str(retry)}) from None

    async def _pick(self, name: str) -> Tuple[int, Dict[str, Any]]:
        version = (await self._route(name)).pick(random.random())
        return version, self._signatures[model_id(name, version)]

    async def _route(self, name: str) -> Route:
        self._ensure_sync()
        if name not in self._routes:
            self._apply(from_answer(await self._controller.serve_model.remote(name)))
        return self._routes[name]

    async def _resolve(self, name: str, ref: str) -> Tuple[int, Dict[str, Any]]:
        # Numbers never change meaning; an alias is trusted for one sync interval.
        cached = self._aliases.get((name, ref))
        if ref.isdigit() and model_id(name, int(ref)) in self._signatures:
            return int(ref), self._signatures[model_id(name, int(ref))]
        if cached is None or cached[1] < time.monotonic():
            found = from_answer(await self._controller.resolve.remote(name, ref))
            self._signatures[model_id(name, found["version"])] = found["signature"]
            cached = (found["version"], time.monotonic() + self._cfg.rollout.sync_interval_s)
            self._aliases[(name, ref)] = cached
        return cached[0], self._signatures[model_id(name, cached[0])]

    async def _admin(self, call) -> JSONResponse:
        status = from_answer(await call)
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
