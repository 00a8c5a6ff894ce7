"""Serving latency and throughput: our endpoint (batching on, batching off) against a plain
FastAPI + uvicorn process serving the same model, and an in-process call.

    PYTHONPATH=. .venv/bin/python bench/serve_latency.py               # about 3 minutes here
    PYTHONPATH=. .venv/bin/python bench/serve_latency.py --requests 200 --cold-starts 0

Every variant answers the same v2 infer body (one digits row) with the same model (default MLP,
random weights) through the same `parse_infer_request` + `build_servable` code; the HTTP variants
are driven by the same client (requests, one keep-alive session per client thread) on this machine,
so the client's CPU is shared with the server's. Our endpoint runs with API keys on (the key is
checked on every request) and 2 model replicas. Prints a table, ratios against the in-process call
and against FastAPI, the cold start of a min_replicas=0 deployment, and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List

import numpy as np
import requests
import torch

from orchestrator.config import PipelineConfig, ServeConfig, StorageConfig, to_config
from orchestrator.flows import connected
from orchestrator.registry import ModelRegistry
from orchestrator.registry.servable import build_servable
from orchestrator.training.models import build_model
from serve.deploy import run_deploy
from serve.names import MODEL_DEPLOYMENT
from serve.protocol import infer_response, parse_infer_request
from tests.integration.serving_support import INPUT_SHAPE, MODEL, register
from tests.support import free_port, infer_body

BODY = json.dumps(infer_body(np.random.default_rng(0).random((1, 64), dtype=np.float32))).encode()

FASTAPI_APP = textwrap.dedent("""
    import sys, uvicorn, torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from serve.protocol import BadRequest, infer_response, parse_infer_request
    from orchestrator.registry import ModelRegistry
    from orchestrator.registry.servable import build_servable

    torch.set_num_threads(1)
    version, arrays = ModelRegistry(sys.argv[1]).load(sys.argv[2], 1)
    forward = build_servable(version.manifest, arrays)
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        parsed = parse_infer_request(await request.body(), version.signature["input_shape"], 1024)
        with torch.inference_mode():
            p = torch.softmax(forward(torch.from_numpy(parsed.rows)), dim=1).numpy()
        result = {"probabilities": p, "label": p.argmax(1)}
        body = infer_response(model=name, version=1, request_id=parsed.request_id, result=result)
        return JSONResponse(body, headers={"X-Model-Version": "1"})

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
""")


def measure(call: Callable[[], None], total: int, concurrency: int) -> Dict[str, float]:
    """p50/p99 latency (ms) and throughput (req/s) of `total` calls from `concurrency` threads."""
    latencies: List[float] = []
    lock = threading.Lock()

    def one(_):
        started = time.perf_counter()
        call()
        with lock:
            latencies.append((time.perf_counter() - started) * 1000)

    for _ in range(min(20, total)):  # warm up: connections, lazily loaded models, JIT-free but cache-cold paths
        call()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(total)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))],
        "rps": total / elapsed,
    }


def http_caller(url: str, key: str | None) -> Callable[[], None]:
    local = threading.local()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def call():
        if not hasattr(local, "session"):
            local.session = requests.Session()
        response = local.session.post(url, data=BODY, headers=headers, timeout=60)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")

    return call


def in_process_caller(cfg: PipelineConfig) -> Callable[[], None]:
    version, arrays = ModelRegistry(cfg.storage.root).load(MODEL, 1)
    forward = build_servable(version.manifest, arrays)
    lock = threading.Lock()  # one model, one thread at a time, as a replica runs it

    def call():
        parsed = parse_infer_request(BODY, INPUT_SHAPE, 1024)
        with lock, torch.inference_mode():
            p = torch.softmax(forward(torch.from_numpy(parsed.rows)), dim=1).numpy()
        json.dumps(
            infer_response(model=MODEL, version=1, request_id=None, result={"probabilities": p, "label": p.argmax(1)})
        )

    return call


def run_variants(cfg: PipelineConfig, total: int) -> Dict[str, Dict[str, Dict[str, float]]]:
    results: Dict[str, Dict[str, Dict[str, float]]] = {}

    def record(name: str, call: Callable[[], None]) -> None:
        results[name] = {f"c{c}": measure(call, total if c == 1 else total * 4, c) for c in (1, 32)}
        print(
            f"{name:<18}"
            + "".join(
                f"  c={c}: p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  {r['rps']:7.1f} req/s"
                for c, r in ((1, results[name]["c1"]), (32, results[name]["c32"]))
            ),
            flush=True,
        )

    torch.set_num_threads(1)
    record("in-process", in_process_caller(cfg))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", FASTAPI_APP, cfg.storage.root, MODEL, str(port)], env={**os.environ})
    try:
        wait_for_port(f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer")
        record("fastapi+uvicorn", http_caller(f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", None))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for batching in (True, False):
        deployed = run_deploy(to_config(cfg, {"serve.batching": batching}))
        record(
            f"serve {'batched' if batching else 'unbatched'}",
            http_caller(f"{deployed.endpoint}/infer", deployed.api_key),
        )
    return results


def wait_for_port(url: str) -> None:
    for _ in range(120):
        try:
            requests.post(url, data=BODY, timeout=5)
            return
        except requests.ConnectionError:
            time.sleep(0.5)
    raise TimeoutError(url)


def cold_starts(cfg: PipelineConfig, repeats: int) -> List[float]:
    """Seconds from a request to its answer when the model deployment has scaled to zero."""
    from ray import serve

    cfg = to_config(cfg, {"serve.min_replicas": 0, "serve.downscale_delay_s": 1.0, "serve.app_name": "coldstart"})
    serve.delete("orchestrator")
    deployed = run_deploy(cfg)
    call = http_caller(f"{deployed.endpoint}/infer", deployed.api_key)
    seconds = []
    for _ in range(repeats):
        wait_for_zero_replicas(cfg.serve.app_name)
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
        print(f"cold start: {seconds[-1]:.2f} s", flush=True)
    return seconds


def wait_for_zero_replicas(app: str, timeout_s: float = 120) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = serve.status().applications[app].deployments[MODEL_DEPLOYMENT].replica_states
        if not any(states.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{MODEL_DEPLOYMENT} did not scale to zero")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300, help="requests at concurrency 1 (4x that at 32)")
    parser.add_argument("--cold-starts", type=int, default=3, help="scale-from-zero measurements")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="serve-bench-")
    cfg = PipelineConfig(
        storage=StorageConfig(root=root),
        serve=ServeConfig(port=free_port(), min_replicas=2, max_replicas=2, block=False),
    )
    torch.manual_seed(0)
    register(cfg, build_model(cfg.model, INPUT_SHAPE, 10), alias="production")
    load_start = os.getloadavg()[0]
    with connected(cfg):
        results = run_variants(cfg, args.requests)
        cold = cold_starts(cfg, args.cold_starts) if args.cold_starts else []
    ratios = {}
    for c in ("c1", "c32"):
        for name in results:
            ratios[f"{name} p50 / in-process ({c})"] = results[name][c]["p50_ms"] / results["in-process"][c]["p50_ms"]
            ratios[f"{name} rps / fastapi ({c})"] = results[name][c]["rps"] / results["fastapi+uvicorn"][c]["rps"]
    for name, ratio in ratios.items():
        print(f"{name:<48} {ratio:7.2f}")
    print(json.dumps({"results": results, "ratios": ratios, "cold_start_s": cold, "loadavg_start": load_start,
                      "loadavg_end": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
