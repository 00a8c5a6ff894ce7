"""The serving replica: the HTTP front of every registry model (KServe Open Inference Protocol v2,
REST; OpenAI-compatible /v1/completions for language models; /admin), and the model itself.

One hop: the replica that parses a request runs the model (an in-process cache of loaded versions,
serve.models, built on the object-store weights, with adaptive batching). The rollout controller
stays off the request path: each replica syncs its routing table in the background.

API keys, validation against the manifest's signature, limits (body size, timeout, queue), routing
by name, version, alias and canary split, metrics; bad input is a 4xx JSON error, never a 5xx.
Language models generate on the replica's engine (serve.generation, continuous batching); the /v1
routes answer every error in OpenAI's error body (serve.openai).
"""

# No `from __future__ import annotations`: FastAPI must see real types on the ingress methods
# (a string "Request" in a Serve class-based view is taken for a query parameter).
import asyncio
import logging
import os
import random
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from orchestrator.config import ServeConfig
from serve.auth import Authenticator, KeyStore
from serve.calls import READY_TIMEOUT_S, awaited, from_answer, within
from serve.errors import EXCEPTION_HANDLERS, error_response
from serve.generation import GenerationEngine
from serve.metrics import BatchMetrics, GenerationMetrics, IngressMetrics
from serve.models import LoadedModel, ModelCache
from serve.names import INGRESS_DEPLOYMENT, model_id
from serve.openai import (
    ClientGone,
    CompletionRequest,
    OpenAIError,
    Timing,
    chat_refusal,
    check_language_model,
    collect,
    completion_body,
    completion_id,
    error_body,
    merged,
    model_list,
    model_reference,
    now,
    parse_completion_request,
    parse_model_field,
    server_error,
    server_sent_events,
    start_sequences,
    unless_disconnected,
)
from serve.protocol import (
    BadRequest,
    InferRequest,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
    parse_rollout_body,
    project_version,
)
from serve.protocol import server_metadata as metadata_of_server
from serve.rollout import Route
from serve.schemas import (
    INFER_RESPONSES,
    LiveResponse,
    ModelListResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ReadyResponse,
    RepositoryIndex,
    ServerMetadataResponse,
    bearer_openapi,
    infer_openapi_extra,
)

# The ingress methods use imported names only (and `log`), never a helper of this module:
# @serve.ingress copies the class and `api` when it decorates the class, with the module's globals
# as they are at that moment, and replicas run that copy.

log = logging.getLogger(__name__)


OPEN_PATHS = ("/v2", "/v2/health/live", "/v2/health/ready")
"""Routes that need no API key (health probes and server metadata)."""


def build_api() -> FastAPI:
    """A FastAPI app with the app's error handlers and its OpenAPI document (Bearer keys), for the
    ingress class to add its routes to."""
    app = FastAPI(title="orchestrator: Open Inference Protocol v2", version=project_version(),
                  description="KServe Open Inference Protocol v2 (REST, with the binary tensor data extension) "
                              "for every registry model, and /admin for rollouts.",
                  exception_handlers=EXCEPTION_HANDLERS)
    app.openapi = bearer_openapi(app, OPEN_PATHS)  # type: ignore[method-assign]
    return app


api = build_api()
"""The ingress's FastAPI app: complete before the class below decorates its methods with its routes."""


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class V2Ingress:
    """HTTP front of every registry model: KServe Open Inference Protocol v2 (REST) plus /admin."""

    def __init__(self, controller: DeploymentHandle, *, serve_cfg: ServeConfig, keys: Optional[str]):
        torch.set_num_threads(1)  # replicas share the node's cores; intra-op threads would fight
        self._controller = controller
        self._cfg = serve_cfg
        self._auth = Authenticator(KeyStore(keys), serve_cfg.auth.cache_ttl_s) if keys else None
        self._routes: Dict[str, Route] = {}
        self._signatures: Dict[str, Dict[str, Any]] = {}
        self._aliases: Dict[Tuple[str, str], Tuple[int, float]] = {}
        self._outcomes: List[Tuple[str, int, bool, float]] = []
        self._pending = 0
        self._metrics = IngressMetrics()
        self._generation = GenerationMetrics()
        batch_metrics = BatchMetrics()
        self._models = ModelCache(
            self._weights_of, max_models=serve_cfg.max_models_per_replica,
            max_batch_size=serve_cfg.max_batch_size if serve_cfg.batching else 1, on_batch=batch_metrics.record,
            generation=serve_cfg.generation, on_step=self._generation.record_step,
        )
        self._index: Tuple[float, List[Dict[str, Any]]] = (0.0, [])
        self._sync_task: Optional[asyncio.Task] = None

    # -- open routes ---------------------------------------------------------------------------

    @api.get("/v2", response_model=ServerMetadataResponse)
    async def server_metadata(self) -> Dict[str, Any]:
        return metadata_of_server(project_version())

    @api.get("/v2/health/live", response_model=LiveResponse)
    async def live(self) -> Dict[str, Any]:
        return {"live": True}

    @api.get("/v2/health/ready", response_model=ReadyResponse)
    async def ready(self) -> JSONResponse:
        return await self._readiness({"ready": True})

    # -- model routes (scope "infer") ----------------------------------------------------------

    @api.get("/v2/models", response_model=ModelListResponse)
    async def model_list(self, request: Request) -> Dict[str, Any]:
        """The registry models this server can serve, by name."""
        self._authorize(request, "infer")
        return {"models": [m["name"] for m in await self._model_index()]}

    @api.post("/v2/repository/index", response_model=RepositoryIndex)
    async def repository_index(self, request: Request) -> List[Dict[str, Any]]:
        """Every version of every registry model (the model repository extension's index): READY, as
        any of them is served on demand; the reason says which ones take unversioned traffic."""
        self._authorize(request, "infer")
        return [
            {"name": m["name"], "version": v, "state": "READY",
             "reason": "routed" if m["serving"] and int(v) in (m["serving"]["stable"], m["serving"]["candidate"])
             else "served on demand"}
            for m in await self._model_index() for v in m["versions"]
        ]

    @api.get("/v2/models/{name}", response_model=ModelMetadataResponse)
    async def model_metadata(self, name: str, request: Request) -> Dict[str, Any]:
        self._authorize(request, "infer")
        route = await self._route(name)
        versions = [route.stable] + ([route.candidate] if route.candidate is not None else [])
        return model_metadata(name, versions, self._signatures[model_id(name, route.stable)])

    @api.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadataResponse)
    async def version_metadata(self, name: str, version: str, request: Request) -> Dict[str, Any]:
        self._authorize(request, "infer")
        number, signature = await self._resolve(name, version)
        return model_metadata(name, [number], signature)

    @api.get("/v2/models/{name}/ready", response_model=ModelReadyResponse)
    async def model_ready(self, name: str, request: Request) -> JSONResponse:
        self._authorize(request, "infer")
        await self._route(name)
        return await self._readiness({"name": name, "ready": True})

    @api.get("/v2/models/{name}/versions/{version}/ready", response_model=ModelReadyResponse)
    async def version_ready(self, name: str, version: str, request: Request) -> JSONResponse:
        self._authorize(request, "infer")
        await self._resolve(name, version)
        return await self._readiness({"name": name, "version": version, "ready": True})

    @api.post("/v2/models/{name}/infer", response_class=Response, responses=INFER_RESPONSES,
              openapi_extra=infer_openapi_extra())
    async def infer(self, name: str, request: Request) -> Response:
        return await self._infer(name, None, request)

    @api.post("/v2/models/{name}/versions/{version}/infer", response_class=Response, responses=INFER_RESPONSES,
              openapi_extra=infer_openapi_extra())
    async def version_infer(self, name: str, version: str, request: Request) -> Response:
        return await self._infer(name, version, request)

    # -- OpenAI-compatible routes (scope "infer"; language models) --------------------------------
    # Left out of /openapi.json: OpenAI's own API reference documents them, and their error body is
    # OpenAI's, not the {"error": message} of the routes documented there.

    @api.get("/v1/models", include_in_schema=False)
    async def openai_models(self, request: Request) -> Response:
        """Every language model, by name (`name:version` and `name@alias` are accepted in requests too)."""
        try:
            self._authorize(request, "infer")
            return Response(orjson.dumps(model_list(await self._model_index())), media_type="application/json")
        except BadRequest as err:
            return self._openai_error(err)

    @api.post("/v1/completions", include_in_schema=False)
    async def completions(self, request: Request) -> Response:
        """Text completions of a language model, whole or streamed as server-sent events (stream=true)."""
        started = time.perf_counter()
        name, served, status, timing, streamed = "unknown", None, 500, None, False
        try:
            self._authorize(request, "infer")
            parsed = parse_completion_request(await self._openai_body(request))
            name, served = await self._language_model(parsed.model)
            timing = self._timing(name, served, started)
            streams, prompt_tokens = await start_sequences(
                await self._engine(name, served), parsed, self._cfg.generation,
                retry_after_s=self._cfg.limits.retry_after_s)
            if parsed.stream:
                streamed = True  # the stream records itself when it ends
                return self._stream(name, served, parsed, streams, prompt_tokens, timing, started)
            choices = await unless_disconnected(collect(merged(streams), timing), request.is_disconnected)
            status = 200
            body = completion_body(id=completion_id(), created=now(), model=parsed.model, choices=choices,
                                   prompt_tokens=prompt_tokens)
            return Response(body, media_type="application/json", headers=self._served_headers(name, served))
        except ClientGone:
            status = 499  # nginx's "client closed request": nobody reads this answer
            return Response(status_code=499)
        except asyncio.CancelledError:  # Serve cancels a request whose client went away
            status = 499
            raise
        except BadRequest as err:
            status = err.status
            return self._openai_error(err, self._served_headers(name, served))
        except Exception as err:  # the model failed: a server fault, counted against its version
            log.exception("completion failed for %s v%s", name, served)
            return Response(orjson.dumps(server_error(err)), status_code=500, media_type="application/json",
                            headers=self._served_headers(name, served))
        finally:
            if not streamed:
                self._record(name, served, status, (time.perf_counter() - started) * 1000,
                             judged_ms=timing.first_token_ms if timing else None)

    @api.post("/v1/chat/completions", include_in_schema=False)
    async def chat_completions(self, request: Request) -> Response:
        """Chat needs the model's chat template, which no registry version carries yet: always a 4xx."""
        try:
            self._authorize(request, "infer")
            model = parse_model_field(await self._openai_body(request))
            name, served = await self._language_model(model)
            raise chat_refusal(model, self._signatures[model_id(name, served)])
        except BadRequest as err:
            return self._openai_error(err)

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

    async def _readiness(self, body: Dict[str, Any]) -> JSONResponse:
        # Ready when the routing table can be had: this replica is answering, so the model can run.
        try:
            await asyncio.wait_for(awaited(self._controller.snapshot.remote()), READY_TIMEOUT_S)
        except Exception as err:  # any failure to answer, whatever its kind, means not ready
            return JSONResponse({"error": f"not ready: {type(err).__name__}: {err}"}, status_code=503)
        return JSONResponse(body)

    async def _model_index(self) -> List[Dict[str, Any]]:
        # The registry's models change rarely: one controller call per sync interval at most.
        expires, index = self._index
        if time.monotonic() > expires:
            index = from_answer(await self._controller.index.remote())["models"]
            self._index = (time.monotonic() + self._cfg.rollout.sync_interval_s, index)
        return index

    async def _infer(self, name: str, version: Optional[str], request: Request) -> Response:
        started = time.perf_counter()
        served: Optional[int] = None
        status = 500
        try:
            self._authorize(request, "infer")
            served, signature = await (self._pick(name) if version is None else self._resolve(name, version))
            body, headers = await self._run_limited(name, served, signature, request)
            status = 200
            return Response(body, headers={**headers, **self._served_headers(name, served)})
        except BadRequest as err:
            status = err.status
            return error_response(err, self._served_headers(name, served))
        except Exception as err:  # the model failed: a server fault, counted against its version
            log.exception("infer failed for %s v%s", name, served)
            return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500,
                                headers=self._served_headers(name, served))
        finally:
            self._record(name, served, status, (time.perf_counter() - started) * 1000)

    @staticmethod
    def _served_headers(name: str, served: Optional[int]) -> Dict[str, str]:
        # Only a name that resolved to a version is echoed: a client's raw path segment may hold
        # characters no HTTP header can carry.
        return {} if served is None else {"X-Model-Name": name, "X-Model-Version": str(served)}

    def _record(self, name: str, served: Optional[int], status: int, latency_ms: float, *,
                judged_ms: Optional[float] = None) -> None:
        """Metrics of one request; its outcome for the rollback policy, judged on `judged_ms` (a
        completion's time to first token) where given, else on its latency."""
        # Requests that named no servable version share one series: a client's made-up names must not
        # become metric tags (Ray refuses non-ASCII tags, and each would be a new series).
        self._metrics.record(name if served is not None else "unknown", served, status, latency_ms)
        if served is not None and status not in (401, 403):
            # Client mistakes say nothing about a version; 5xx (and 504 timeouts) count against it.
            if status < 400 or status >= 500:
                self._outcomes.append((name, served, status < 500, latency_ms if judged_ms is None else judged_ms))

    async def _run_limited(
        self, name: str, version: int, signature: Dict[str, Any], request: Request,
    ) -> Tuple[bytes, Dict[str, str]]:
        limits = self._cfg.limits
        if self._pending >= limits.max_pending_requests:
            raise BadRequest(503,
                             f"{self._pending} requests are already waiting here; retry in {limits.retry_after_s} s",
                             headers={"Retry-After": str(limits.retry_after_s)})
        self._pending += 1
        try:
            parsed = await self._parse(request, signature)
            outputs = await self._predict(name, version, parsed)
        finally:
            self._pending -= 1
        return encode_infer_response(model=name, version=version, request=parsed, outputs=outputs,
                                     signature=signature)

    async def _parse(self, request: Request, signature: Dict[str, Any]) -> InferRequest:
        limits = self._cfg.limits
        declared = request.headers.get("content-length", "")
        # Refused before reading it (ASCII digits only: int() reads other digits differently or not at all).
        if declared.isascii() and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise BadRequest(413, f"body of {declared} bytes is larger than "
                                  f"serve.limits.max_body_bytes={limits.max_body_bytes}")
        return parse_infer_request(
            await request.body(), signature, header_length=request.headers.get("inference-header-content-length"),
            max_rows=self._cfg.max_rows_per_request, allow_non_finite=limits.allow_non_finite,
            max_body_bytes=limits.max_body_bytes,
        )

    async def _predict(self, name: str, version: int, parsed: InferRequest) -> Dict[str, np.ndarray]:
        """The model's outputs for the request, run here; 504 past serve.limits.request_timeout_s."""
        timeout = self._cfg.limits.request_timeout_s
        try:
            return await within(timeout, self._run_model(name, version, parsed))
        except asyncio.TimeoutError:
            raise BadRequest(504, f"model {name!r} version {version} did not answer within {timeout} s") from None

    async def _run_model(self, name: str, version: int, parsed: InferRequest) -> Dict[str, np.ndarray]:
        loaded = await self._models.get(name, version)
        return await loaded.batcher.submit(parsed.inputs)

    async def _openai_body(self, request: Request) -> bytes:
        limit = self._cfg.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise OpenAIError(413, f"body of {declared} bytes is larger than serve.limits.max_body_bytes={limit}")
        body = await request.body()
        if len(body) > limit:
            raise OpenAIError(413, f"body of {len(body)} bytes is larger than serve.limits.max_body_bytes={limit}")
        return body

    async def _language_model(self, model: str) -> Tuple[str, int]:
        """(name, version) a request's `model` names, routed as the v2 routes route it. Raises
        OpenAIError 404 for an unknown model or version, 400 for one that is not a language model."""
        name, ref = model_reference(model)
        try:
            served, signature = await (self._pick(name) if ref is None else self._resolve(name, ref))
        except BadRequest as err:
            if err.status != 404:
                raise
            raise OpenAIError(404, err.message, param="model") from None  # OpenAI names the field at fault
        check_language_model(model, served, signature)
        return name, served

    async def _engine(self, name: str, version: int) -> GenerationEngine:
        engine = (await self._models.get(name, version)).engine
        if engine is None:  # a language model's signature, but loaded without an engine: a fault here
            raise RuntimeError(f"{name} v{version} has no generation engine")
        return engine

    def _timing(self, name: str, served: int, started: float) -> Timing:
        metrics = self._generation
        return Timing(started, on_first=lambda ms: metrics.record_first_token(name, served, ms),
                      on_tokens=lambda tokens, gap_ms: metrics.record_tokens(name, served, tokens, gap_ms))

    def _stream(self, name: str, served: int, parsed: CompletionRequest, streams: List[Any], prompt_tokens: int,
                timing: Timing, started: float) -> StreamingResponse:
        def ended(status: int) -> None:
            self._record(name, served, status, (time.perf_counter() - started) * 1000,
                         judged_ms=timing.first_token_ms)

        events = server_sent_events(merged(streams), timing, id=completion_id(), created=now(), model=parsed.model,
                                    prompt_tokens=prompt_tokens, on_end=ended)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **self._served_headers(name, served)})

    @staticmethod
    def _openai_error(err: BadRequest, headers: Optional[Dict[str, str]] = None) -> Response:
        return Response(orjson.dumps(error_body(err)), status_code=err.status, media_type="application/json",
                        headers={**err.headers, **(headers or {})})

    async def _weights_of(self, name: str, version: int) -> Dict[str, Any]:
        return await self._controller.weights.remote(name, version)

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
        if ref.isascii() and ref.isdigit() and model_id(name, int(ref)) in self._signatures:
            return int(ref), self._signatures[model_id(name, int(ref))]
        if cached is None or cached[1] < time.monotonic():
            found = from_answer(await self._controller.resolve.remote(name, ref))
            self._signatures.setdefault(model_id(name, found["version"]), found["signature"])
            cached = (found["version"], time.monotonic() + self._cfg.rollout.sync_interval_s)
            self._aliases[(name, ref)] = cached
        return cached[0], self._signatures[model_id(name, cached[0])]

    async def _admin(self, call) -> JSONResponse:
        status = from_answer(await call)
        self._apply(await self._controller.snapshot.remote())  # this replica sees its own change at once
        return JSONResponse(status)

    def _apply(self, snapshot: Dict[str, Any]) -> None:
        self._routes = {m: Route(**r) for m, r in snapshot["routes"].items()}
        # A version's signature never changes: keep the object already held, so the protocol's
        # per-signature compilation (cached by identity) is done once, not after every sync.
        for mid, signature in snapshot["signatures"].items():
            self._signatures.setdefault(mid, signature)

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

    # -- handle calls (not HTTP routes) -------------------------------------------------------

    async def weights_info(self, name: str, version: int, hold_s: float = 0.0) -> Dict[str, Any]:
        """Which object-store copy this replica runs `name` v`version` on, to show sharing.
        `hold_s` keeps the call in flight, so a burst of calls fills a replica and reaches the others."""
        loaded: LoadedModel = await self._models.get(name, version)
        await asyncio.sleep(hold_s)
        first = next(iter(loaded.arrays.values()))
        replica = serve.get_replica_context().replica_id.unique_id
        return {"object_ref": loaded.ref_hex, "writeable": bool(first.flags.writeable), "version": loaded.version,
                "replica": replica, "pid": os.getpid()}

    async def generation_stats(self, name: str, version: int) -> Dict[str, Any]:
        """{"running", "waiting", "cut_short", "replica"}: sequences of `name` v`version` in this replica's
        generation engine now, and how many left it before their end because their client went away (zeros
        when the version is not loaded here)."""
        loaded = self._models.find(name, version)
        engine = loaded.engine if loaded is not None else None
        replica = serve.get_replica_context().replica_id.unique_id
        return {"running": engine.running if engine else 0, "waiting": engine.waiting if engine else 0,
                "cut_short": engine.cut_short if engine else 0, "replica": replica}
